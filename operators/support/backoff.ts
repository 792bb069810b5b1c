/**
 * One exponential backoff for every retry in sluice: pulls, lanes, worker calls, breakers and
 * redeliveries. The delay doubles per attempt up to a cap; jitter then adds up to a fraction of
 * it at random, so processes that failed together do not retry together. Jitter only ever adds:
 * a retry never comes sooner than the doubling says.
 */

/** Fraction of the delay added at random, by default. */
export const DEFAULT_BACKOFF_JITTER = 0.2;
/** Doublings beyond this change nothing (the cap is reached long before). */
const MAX_DOUBLINGS = 30;

export interface Backoff {
  /** Delay of the first retry (attempt 0). */
  readonly baseMs: number;
  /** Cap of the doubled delay (before jitter). */
  readonly maxMs: number;
  /** Up to this fraction of the delay is added at random; 0 for none. Default {@link DEFAULT_BACKOFF_JITTER}. */
  readonly jitter?: number;
}

/**
 * The delay before retry `attempt` (0 for the first): `min(maxMs, baseMs * 2^attempt)`, plus up
 * to `jitter` of that. `random` is a source in [0, 1) (tests pass their own).
 */
export function backoffMs(attempt: number, b: Backoff, random: () => number = Math.random): number {
  const doublings = Math.max(0, Math.min(Math.floor(attempt), MAX_DOUBLINGS));
  const delay = Math.min(b.maxMs, b.baseMs * 2 ** doublings);
  const jitter = b.jitter ?? DEFAULT_BACKOFF_JITTER;
  return jitter > 0 ? Math.round(delay * (1 + jitter * random())) : delay;
}
