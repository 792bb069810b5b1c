/**
 * Per-tenant limits: request rate (a token bucket with a burst), model tokens per minute
 * (`parameters.max_tokens` of each request, or a default when it has none) and requests at once,
 * each with a policy for what happens over the limit (`reject` at once, or `delay`).
 *
 * - Limits come from configuration (`tenants: { "acme": {...}, "*": {...} }`) and from the NATS
 *   KV bucket `infer_tenants` (key: the tenant, value: its limits as JSON), which
 *   `TenantRegistry` (tenant-registry.ts) watches: a KV write changes the limits of every running pipeline
 *   without a restart. `"*"` (key `_default` in the bucket) applies to each tenant without its
 *   own entry, with its own buckets per tenant (the default is not a shared pool).
 * - Limits hold per pipeline process: N processes let a tenant through N times as much.
 * - A request delivered again after it was admitted once (a worker retry) is not charged rate
 *   or tokens again; it still needs a concurrency slot.
 * - A concurrency slot is held from admission until the request's delivery settles. The
 *   pipeline calls {@link TenantLimiter.released} with the delivery of each settled outcome;
 *   as a safety net, slots whose delivery is already settled are reclaimed when a tenant is at
 *   its limit, so a missed release can only delay, never block for good.
 *
 * ```ts
 * const tenants = await TenantRegistry.open(nc, { seed: config.tenants });   // tenant-registry.ts
 * jobs$.pipe(onJobs(admitByTenantLimits(tenants.limiter)));
 * settled$.pipe(tap((s) => tenants.limiter.releasedOutcome(s.outcome)));
 * ```
 */
import type { TenantAdmission, TenantGate, TenantLimitName, TenantLimitPolicy } from "../../operators/admit-by-tenant-limits.js";
import type { Delivery, InferJob, Outcome } from "../../operators/types.js";
import { TOKEN_RE } from "../../proto/wire.js";

/** The tenant name that stands for every tenant without limits of its own (configuration). */
export const ANY_TENANT = "*";
/** Key of the default limits in bucket `infer_tenants` (a KV key cannot be `*`). */
export const DEFAULT_TENANT_KEY = "_default";
/** Tokens a request without `parameters.max_tokens` counts against `tokensPerMinute`. */
export const DEFAULT_REQUEST_TOKENS = 256;
/** Retry delay of a request held back by `maxConcurrent` (when a slot frees is not known ahead). */
const DEFAULT_CONCURRENCY_RETRY_MS = 250;
/** How long a request id admitted once is remembered, so its redeliveries are not charged again. */
const DEFAULT_REMEMBER_ADMITTED_MS = 10 * 60_000;
/** Request ids remembered at most (oldest forgotten first). */
const MAX_REMEMBERED = 50_000;
/** Tenants whose state is kept before idle ones are forgotten. */
const MAX_TENANT_STATES = 10_000;
/** Held slots of a tenant above which settled ones are swept even below its limit. */
const SWEEP_ABOVE = 1_024;
/** Slack for floating point refills (1000 × 0.001 is not always 1). */
const EPSILON = 1e-9;

/** The limits of one tenant (docs/protocol.md suggestion: bucket `infer_tenants`, key `<tenant>`). */
export interface TenantLimits {
  /** Requests per second, refilled continuously. */
  rate?: number;
  /** Requests that may arrive at once after a quiet spell; default `max(1, rate)`. Needs `rate`. */
  burst?: number;
  /** Model tokens per minute: `parameters.max_tokens` of each request, or a default. */
  tokensPerMinute?: number;
  /** Requests of the tenant in the pipeline at once (admitted and not yet settled). */
  maxConcurrent?: number;
  /** Over a limit: `reject` answers RESOURCE_EXHAUSTED at once; `delay` lets the request wait. */
  policy: TenantLimitPolicy;
}

export class TenantLimitsError extends Error {
  override readonly name = "TenantLimitsError";
  readonly code = "INVALID_ARGUMENT" as const;
}

const FIELDS = ["rate", "burst", "tokensPerMinute", "maxConcurrent", "policy"];

/**
 * Checks the limits of one tenant (`"*"` or `_default` for the default); returns them typed or
 * throws a {@link TenantLimitsError} saying what is wrong. `policy` defaults to `reject`.
 */
export function parseTenantLimits(tenant: string, value: unknown): TenantLimits {
  const fail = (msg: string): never => {
    throw new TenantLimitsError(`tenant '${tenant}': ${msg}`);
  };
  if (tenant !== ANY_TENANT && tenant !== DEFAULT_TENANT_KEY && !TOKEN_RE.test(tenant)) fail("name must be 1-64 of a-z 0-9 _ -, or '*'");
  if (typeof value !== "object" || value === null || Array.isArray(value)) return fail("limits must be a JSON object");
  const v = value as Record<string, unknown>;
  for (const k of Object.keys(v)) if (!FIELDS.includes(k)) fail(`unknown field '${k}' (known: ${FIELDS.join(", ")})`);
  const policy = v["policy"] ?? "reject";
  if (policy !== "reject" && policy !== "delay") fail("policy must be 'reject' or 'delay'");
  const out: TenantLimits = { policy: policy as TenantLimitPolicy };
  const positive = (k: "rate" | "tokensPerMinute"): void => {
    const x = v[k];
    if (x === undefined) return;
    if (typeof x !== "number" || !Number.isFinite(x) || x <= 0) fail(`${k} must be a number > 0`);
    out[k] = x as number;
  };
  positive("rate");
  positive("tokensPerMinute");
  if (v["burst"] !== undefined) {
    const b = v["burst"];
    if (typeof b !== "number" || !Number.isFinite(b) || b < 1) fail("burst must be a number >= 1");
    if (out.rate === undefined) fail("burst needs rate");
    out.burst = b as number;
  }
  if (v["maxConcurrent"] !== undefined) {
    const c = v["maxConcurrent"];
    if (!Number.isSafeInteger(c) || (c as number) < 1) fail("maxConcurrent must be an integer >= 1");
    out.maxConcurrent = c as number;
  }
  return out;
}

/** Checks a `tenants` configuration section; `"*"` is the default. */
export function parseTenantsConfig(value: unknown): Record<string, TenantLimits> {
  if (value === undefined) return {};
  if (typeof value !== "object" || value === null || Array.isArray(value)) throw new TenantLimitsError("tenants must be an object of tenant → limits");
  const out: Record<string, TenantLimits> = {};
  for (const [t, l] of Object.entries(value as Record<string, unknown>)) out[t === DEFAULT_TENANT_KEY ? ANY_TENANT : t] = parseTenantLimits(t, l);
  return out;
}

export interface TenantLimiterOptions {
  /** Limits by tenant; `"*"` for every other tenant. A tenant with none is not limited. */
  tenants?: Record<string, TenantLimits>;
  now?: () => number;
  /** Tokens a request without `parameters.max_tokens` counts; default {@link DEFAULT_REQUEST_TOKENS}. */
  defaultRequestTokens?: number;
  /** Retry delay when held back by `maxConcurrent`; default {@link DEFAULT_CONCURRENCY_RETRY_MS}. */
  concurrencyRetryMs?: number;
  /** How long an admitted request id is remembered; default {@link DEFAULT_REMEMBER_ADMITTED_MS}. */
  rememberAdmittedMs?: number;
}

/** A token bucket; its size and rate are passed on each use, so a limit change applies at once. */
class Bucket {
  private last: number;
  constructor(
    private tokens: number,
    now: number,
  ) {
    this.last = now;
  }
  /** Tokens now, after refilling at `perMs` up to `size`. */
  level(now: number, size: number, perMs: number): number {
    if (now > this.last) this.tokens += (now - this.last) * perMs;
    this.last = Math.max(this.last, now);
    if (this.tokens > size) this.tokens = size;
    return this.tokens;
  }
  take(n: number): void {
    this.tokens -= n;
  }
}

interface TenantState {
  requests?: Bucket;
  tokens?: Bucket;
  /** Deliveries holding a concurrency slot. */
  held: Set<Delivery>;
}

interface Denial {
  limit: TenantLimitName;
  reason: string;
  retryAfterMs: number;
  final: boolean;
}

/** Per-tenant admission: the {@link TenantGate} of `admitByTenantLimits`. */
export class TenantLimiter implements TenantGate {
  private readonly limits = new Map<string, TenantLimits>();
  private readonly states = new Map<string, TenantState>();
  private readonly slots = new WeakMap<Delivery, () => void>();
  /** `<tenant>/<id>` → when to forget it; insertion order is age order. */
  private readonly admitted = new Map<string, number>();
  private readonly listeners = new Set<(tenant: string, limits: TenantLimits | undefined) => void>();
  private readonly now: () => number;
  private readonly defaultRequestTokens: number;
  private readonly concurrencyRetryMs: number;
  private readonly rememberMs: number;
  /** Counts each applied change (tests wait on it). */
  revision = 0;

  constructor(opts: TenantLimiterOptions = {}) {
    this.now = opts.now ?? Date.now;
    this.defaultRequestTokens = opts.defaultRequestTokens ?? DEFAULT_REQUEST_TOKENS;
    this.concurrencyRetryMs = opts.concurrencyRetryMs ?? DEFAULT_CONCURRENCY_RETRY_MS;
    this.rememberMs = opts.rememberAdmittedMs ?? DEFAULT_REMEMBER_ADMITTED_MS;
    for (const [t, l] of Object.entries(opts.tenants ?? {})) this.set(t, parseTenantLimits(t, l));
  }

  /** Sets (or with undefined removes) the limits of a tenant, or of `"*"`; applies to the next check. */
  set(tenant: string, limits: TenantLimits | undefined): void {
    const key = tenant === DEFAULT_TENANT_KEY ? ANY_TENANT : tenant;
    if (limits === undefined) this.limits.delete(key);
    else this.limits.set(key, limits);
    this.revision++;
    for (const f of this.listeners) {
      try {
        f(key, limits);
      } catch {
        // a listener's failure is its own
      }
    }
  }

  /** The limits that apply to a tenant (its own, else the default), or undefined. */
  limitsOf(tenant: string): TenantLimits | undefined {
    return this.limits.get(tenant) ?? this.limits.get(ANY_TENANT);
  }

  /** Tenants with limits of their own (and `"*"`). */
  list(): Array<[string, TenantLimits]> {
    return [...this.limits.entries()];
  }

  onChange(f: (tenant: string, limits: TenantLimits | undefined) => void): () => void {
    this.listeners.add(f);
    return () => this.listeners.delete(f);
  }

  /** Requests of the tenant holding a slot now. */
  inFlight(tenant: string): number {
    return this.states.get(tenant)?.held.size ?? 0;
  }

  check(job: InferJob): TenantAdmission {
    const limits = this.limitsOf(job.tenant);
    if (limits === undefined) return this.admit(job, this.stateOf(job.tenant, this.now()), undefined);
    const now = this.now();
    const state = this.stateOf(job.tenant, now);
    const charged = this.wasAdmitted(job, now);
    const cost = this.costOf(job);
    const denials: Denial[] = [];

    if (limits.maxConcurrent !== undefined) {
      if (state.held.size >= limits.maxConcurrent) sweep(state.held);
      if (state.held.size >= limits.maxConcurrent) {
        denials.push({
          limit: "maxConcurrent",
          reason: `tenant '${job.tenant}' is at its limit of ${limits.maxConcurrent} request${limits.maxConcurrent === 1 ? "" : "s"} at once (maxConcurrent)`,
          retryAfterMs: this.concurrencyRetryMs,
          final: false,
        });
      }
    }
    if (limits.rate !== undefined && !charged) {
      const size = limits.burst ?? Math.max(1, limits.rate);
      const perMs = limits.rate / 1000;
      state.requests ??= new Bucket(size, now);
      const level = state.requests.level(now, size, perMs);
      if (level + EPSILON < 1) {
        const wait = waitMs(1 - level, perMs);
        denials.push({
          limit: "rate",
          reason: `tenant '${job.tenant}' is over its rate limit of ${limits.rate} requests/s (burst ${size}); retry in ${wait} ms`,
          retryAfterMs: wait,
          final: false,
        });
      }
    }
    if (limits.tokensPerMinute !== undefined && !charged) {
      const size = limits.tokensPerMinute;
      const perMs = size / 60_000;
      state.tokens ??= new Bucket(size, now);
      const level = state.tokens.level(now, size, perMs);
      const what = `${cost.tokens} tokens (${cost.from})`;
      if (cost.tokens > size) {
        denials.push({
          limit: "tokensPerMinute",
          reason: `request counts ${what}, more than tenant '${job.tenant}''s limit of ${size} tokens per minute`,
          retryAfterMs: 0,
          final: true,
        });
      } else if (level + EPSILON < cost.tokens) {
        const wait = waitMs(cost.tokens - level, perMs);
        denials.push({
          limit: "tokensPerMinute",
          reason: `tenant '${job.tenant}' is over its limit of ${size} tokens per minute (this request counts ${what}); retry in ${wait} ms`,
          retryAfterMs: wait,
          final: false,
        });
      }
    }

    if (denials.length > 0) {
      const first = denials.find((d) => d.final) ?? denials[0]!;
      return {
        ok: false,
        limit: first.limit,
        reason: first.reason,
        // Trying again earlier than every limit allows would only fail again.
        retryAfterMs: Math.max(...denials.map((d) => d.retryAfterMs)),
        policy: limits.policy,
        final: denials.some((d) => d.final),
      };
    }
    if (!charged) {
      if (limits.rate !== undefined) state.requests?.take(1);
      if (limits.tokensPerMinute !== undefined) state.tokens?.take(cost.tokens);
    }
    return this.admit(job, state, now);
  }

  /** Gives back the slot of a settled delivery (no-op when it holds none). */
  released(delivery: Delivery): void {
    const release = this.slots.get(delivery);
    if (release) release();
  }

  /** {@link released} for the delivery of a settled outcome. */
  releasedOutcome(o: Outcome): void {
    this.released(o.kind === "dead" ? o.delivery : o.job.delivery);
  }

  /** Takes a slot for the job; `chargedAt`: remember it as charged (a limited tenant). */
  private admit(job: InferJob, s: TenantState, chargedAt: number | undefined): TenantAdmission {
    const d = job.delivery;
    if (chargedAt !== undefined) this.remember(job, chargedAt);
    if (s.held.size > SWEEP_ABOVE) sweep(s.held);
    this.slots.get(d)?.();
    s.held.add(d);
    let done = false;
    const release = (): void => {
      if (done) return;
      done = true;
      s.held.delete(d);
      if (this.slots.get(d) === release) this.slots.delete(d);
    };
    this.slots.set(d, release);
    return { ok: true, release };
  }

  private stateOf(tenant: string, now: number): TenantState {
    let s = this.states.get(tenant);
    if (!s) {
      if (this.states.size >= MAX_TENANT_STATES) this.forgetIdle(now);
      s = { held: new Set() };
      this.states.set(tenant, s);
    }
    return s;
  }

  /** Drops tenants with nothing held and full buckets: forgetting them changes nothing. */
  private forgetIdle(now: number): void {
    for (const [t, s] of this.states) {
      sweep(s.held);
      if (s.held.size > 0) continue;
      const l = this.limitsOf(t);
      const full = (b: Bucket | undefined, size: number, perMs: number): boolean => b === undefined || b.level(now, size, perMs) >= size - EPSILON;
      const rateFull = l?.rate === undefined || full(s.requests, l.burst ?? Math.max(1, l.rate), l.rate / 1000);
      const tokensFull = l?.tokensPerMinute === undefined || full(s.tokens, l.tokensPerMinute, l.tokensPerMinute / 60_000);
      if (rateFull && tokensFull) this.states.delete(t);
    }
  }

  private costOf(job: InferJob): { tokens: number; from: string } {
    const m = job.parameters?.["max_tokens"];
    if (typeof m === "number" && Number.isFinite(m) && m > 0) return { tokens: Math.ceil(m), from: "parameters.max_tokens" };
    return { tokens: this.defaultRequestTokens, from: "the default for a request without parameters.max_tokens" };
  }

  private wasAdmitted(job: InferJob, now: number): boolean {
    if (job.delivery.deliveryCount <= 1) return false;
    const until = this.admitted.get(`${job.tenant}/${job.id}`);
    return until !== undefined && until > now;
  }

  private remember(job: InferJob, now: number): void {
    const key = `${job.tenant}/${job.id}`;
    this.admitted.delete(key);
    this.admitted.set(key, now + this.rememberMs);
    for (const [k, until] of this.admitted) {
      if (this.admitted.size <= MAX_REMEMBERED && until > now) break;
      this.admitted.delete(k);
    }
  }
}

/** Time to refill `missing` at `perMs`, rounded up (but not for float dust: 998.0000001 is 998). */
function waitMs(missing: number, perMs: number): number {
  return Math.max(1, Math.ceil(missing / perMs - 1e-6));
}

function sweep(held: Set<Delivery>): void {
  for (const d of held) if (d.settled) held.delete(d);
}
