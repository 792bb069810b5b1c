import { map, type OperatorFunction } from "rxjs";
import { errorResult, type InferJob, type InferResult, type Outcome } from "./types.js";

/** The limit a request ran into. */
export type TenantLimitName = "rate" | "tokensPerMinute" | "maxConcurrent";

/** What to do with a request over its tenant's limit: answer it at once, or let it wait. */
export type TenantLimitPolicy = "reject" | "delay";

/** The answer of a {@link TenantGate} for one job. */
export type TenantAdmission =
  | {
      readonly ok: true;
      /** Gives back the job's concurrency slot; safe to call more than once. */
      release(): void;
    }
  | {
      readonly ok: false;
      /** When trying again could succeed, ms from now. */
      readonly retryAfterMs: number;
      /** Names the tenant and the limit, for the client. */
      readonly reason: string;
      readonly limit: TenantLimitName;
      readonly policy: TenantLimitPolicy;
      /** Waiting cannot help (the request alone is over the limit): answer it whatever the policy. */
      readonly final: boolean;
    };

/** Decides whether a job fits its tenant's limits now, and takes its share when it does. */
export interface TenantGate {
  check(job: InferJob): TenantAdmission;
}

/** How long a delayed request waits for its tenant's limits at most, by default. */
export const DEFAULT_TENANT_MAX_WAIT_MS = 30_000;

export interface AdmitByTenantLimitsOptions {
  /**
   * A request held back under the `delay` policy waits at most this long after it was
   * published (or until its deadline, when that comes first), then it is answered. Keep it below
   * twice the model's timeout: the pipeline gives up on requests delivered too often for longer.
   */
  maxWaitMs?: number;
  now?: () => number;
}

/**
 * Holds each tenant to its limits (request rate, tokens per minute, requests at once). A job
 * within them passes on unchanged and holds its share until its outcome settles; a job over
 * them becomes an outcome: under the `reject` policy a RESOURCE_EXHAUSTED result naming the
 * limit; under `delay` a retry (nak with the time the limit needs) that waits until the job's
 * deadline or `maxWaitMs` after it was published, whatever its delivery count, and is answered
 * then if it still does not fit (DEADLINE_EXCEEDED at the deadline, RESOURCE_EXHAUSTED otherwise).
 *
 * ```
 * limits: acme 2 requests, then 1/s; policy reject
 * input:  a b c ---- 1s ---- d
 * output: a b C ------------ d      C = result RESOURCE_EXHAUSTED ("... rate limit of 1 requests/s ...")
 * ```
 *
 * @example
 * jobs$.pipe(onJobs(admitByTenantLimits(limiter, { maxWaitMs: 20_000 })))
 */
export function admitByTenantLimits<J extends InferJob>(gate: TenantGate, opts: AdmitByTenantLimitsOptions = {}): OperatorFunction<J, J | Outcome> {
  const now = opts.now ?? Date.now;
  const maxWaitMs = opts.maxWaitMs ?? DEFAULT_TENANT_MAX_WAIT_MS;
  return map((job): J | Outcome => {
    // A shadow copy rides on its request's admission.
    if (job.shadow === true) return job;
    const a = gate.check(job);
    if (a.ok) return job;
    if (a.policy === "reject" || a.final) return answer(job, errorResult(job, "RESOURCE_EXHAUSTED", a.reason));
    const waitEnd = job.delivery.storedAtMs + maxWaitMs;
    const byDeadline = job.deadlineMs !== undefined && job.deadlineMs <= waitEnd;
    const waitUntilMs = byDeadline ? job.deadlineMs : waitEnd;
    const last = byDeadline
      ? errorResult(job, "DEADLINE_EXCEEDED", `deadline passed while the request waited: ${a.reason}`)
      : errorResult(job, "RESOURCE_EXHAUSTED", `${a.reason} (waited ${maxWaitMs} ms, the most a request may wait)`);
    if (now() >= waitUntilMs) return answer(job, last);
    return { kind: "retry", job, delayMs: Math.max(1, Math.ceil(a.retryAfterMs)), lastResort: last, waitUntilMs } satisfies Outcome;
  });
}

function answer(job: InferJob, result: InferResult): Outcome {
  return { kind: "result", job, result };
}
