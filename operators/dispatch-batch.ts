import { from, map, mergeMap, of, type OperatorFunction } from "rxjs";
import { retryDelays, type RetryDelayOptions } from "./outcome.js";
import { errorResult, type Batch, type InferResult, type Outcome, type RoutedJob, type Usage } from "./types.js";
import { ERROR_CODES, type ErrorCode } from "../proto/wire.js";

/** One item of a worker's reply, in the order of the batch. */
export interface ItemReply {
  id: string;
  status: string;
  output?: { text?: string; data?: unknown } | null;
  usage?: Usage | null;
  error?: { code: string; message: string } | null;
}

export interface BatchReply {
  results: ItemReply[];
  /** Wall time of the call, ms. */
  workerMs: number;
  /** Which worker answered. */
  worker?: string;
}

/** A failed call. `retriable` failures are delivered again later; others answer every job. */
export class DispatchError extends Error {
  override readonly name = "DispatchError";
  constructor(
    message: string,
    readonly code: ErrorCode,
    readonly retriable: boolean,
    options?: { cause?: unknown; noWorker?: boolean },
  ) {
    super(message, options);
    this.noWorker = options?.noWorker === true;
  }
  /** No worker could take the call at all (none registered, none healthy): worth waiting for one. */
  readonly noWorker: boolean;
}

export interface BatchDispatcher {
  dispatch(batch: Batch): Promise<BatchReply>;
}

export interface DispatchBatchOptions extends RetryDelayOptions {
  now?: () => number;
  /**
   * When no worker can take a batch, its requests wait (redelivered with backoff) until their
   * deadline, or until this long after they were published when they have none.
   */
  waitForWorkerMs?: (model: string) => number;
  /** True when the client cancelled the request: it is answered CANCELLED, not sent (or not kept). */
  isCancelled?: (job: RoutedJob) => boolean;
}

const asCode = (c: string): ErrorCode => ((ERROR_CODES as readonly string[]).includes(c) ? (c as ErrorCode) : "INTERNAL");

/**
 * Sends each batch to a worker and turns the reply into one {@link Outcome} per job: its result,
 * its own error, or a retry when the call failed in a way worth retrying. Jobs whose deadline
 * passed while they waited are answered `DEADLINE_EXCEEDED` and never sent.
 *
 * ```
 * input:  ---[a b c]----------
 * worker:     |--- 40ms ---|
 * output: ----------------(a'b'c')
 * ```
 */
export function dispatchBatch(dispatcher: BatchDispatcher, opts: DispatchBatchOptions = {}): OperatorFunction<Batch, Outcome> {
  const now = opts.now ?? Date.now;
  const retryDelay = retryDelays(opts);

  const timing = (job: RoutedJob, batch: Batch, workerMs: number, sentAt: number) => ({
    queue_ms: round(sentAt - job.delivery.storedAtMs),
    batch_size: batch.jobs.length,
    worker_ms: round(workerMs),
    total_ms: round(now() - job.delivery.storedAtMs),
  });

  return mergeMap((batch: Batch) => {
    const t0 = now();
    const expired: Outcome[] = [];
    const live: RoutedJob[] = [];
    const cancelled = (job: RoutedJob): boolean => {
      try {
        return opts.isCancelled?.(job) === true;
      } catch {
        return false;
      }
    };
    for (const job of batch.jobs) {
      if (cancelled(job)) {
        expired.push({ kind: "result", job, result: errorResult(job, "CANCELLED", "cancelled by the client before it was sent to a worker") });
      } else if (job.deadlineMs !== undefined && job.deadlineMs <= t0) {
        expired.push({
          kind: "result",
          job,
          result: errorResult(job, "DEADLINE_EXCEEDED", "deadline passed while the request waited for a worker"),
        });
      } else live.push(job);
    }
    if (live.length === 0) return of(...expired);
    const sent: Batch = live.length === batch.jobs.length ? batch : { ...batch, jobs: live };
    let call: Promise<BatchReply>;
    try {
      call = dispatcher.dispatch(sent);
    } catch (err) {
      call = Promise.reject(err instanceof Error ? err : new Error(String(err)));
    }
    return from(
      call.then(
        (reply): Outcome[] =>
          live.map((job, i): Outcome => {
            const item = reply.results[i];
            if (cancelled(job)) {
              return { kind: "result", job, result: errorResult(job, "CANCELLED", "cancelled by the client while it ran") };
            }
            if (!item || item.id !== job.id) {
              return { kind: "result", job, result: errorResult(job, "INTERNAL", "the worker returned no result for this request") };
            }
            if (item.status === "ok") {
              const result: InferResult = {
                id: job.id,
                status: "ok",
                model: job.model,
                version: job.version,
                output: { ...(item.output ?? {}) },
                usage: item.usage ?? { prompt_tokens: 0, completion_tokens: 0 },
                timing: timing(job, sent, reply.workerMs, t0),
              };
              return { kind: "result", job, result };
            }
            const code = asCode(item.error?.code ?? "INTERNAL");
            const message = item.error?.message ?? "the worker reported an error";
            if (code === "UNAVAILABLE") {
              return { kind: "retry", job, delayMs: retryDelay(job.delivery.deliveryCount), lastResort: errorResult(job, code, message) };
            }
            const result = errorResult(job, code, message);
            result.timing = timing(job, sent, reply.workerMs, t0);
            return { kind: "result", job, result };
          }),
        (err: unknown): Outcome[] => {
          const e = err instanceof DispatchError ? err : new DispatchError((err as Error)?.message ?? String(err), "INTERNAL", false, { cause: err });
          return live.map((job): Outcome => {
            if (e.code === "DEADLINE_EXCEEDED" && job.deadlineMs !== undefined && job.deadlineMs <= now()) {
              return { kind: "result", job, result: errorResult(job, "DEADLINE_EXCEEDED", "deadline passed while the worker was running the request") };
            }
            if (e.retriable) {
              const retry: Outcome = {
                kind: "retry",
                job,
                delayMs: retryDelay(job.delivery.deliveryCount),
                lastResort: errorResult(job, e.code, e.message),
                ...(e.noWorker && opts.waitForWorkerMs
                  ? { waitUntilMs: job.deadlineMs ?? job.delivery.storedAtMs + opts.waitForWorkerMs(job.model) }
                  : {}),
              };
              return retry;
            }
            return { kind: "result", job, result: errorResult(job, e.code, e.message) };
          });
        },
      ),
    ).pipe(
      mergeMap((outs) => of(...expired, ...outs)),
      map((o) => o),
    );
  });
}

function round(ms: number): number {
  return Math.round(ms * 100) / 100;
}
