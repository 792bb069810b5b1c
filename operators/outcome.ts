import type { InferJob, Outcome } from "./types.js";
import { backoffMs, DEFAULT_BACKOFF_JITTER } from "./support/backoff.js";

/** True for an {@link Outcome}; false for a job still on its way (jobs have no `kind`). */
export function isOutcome<J extends InferJob>(x: J | Outcome): x is Outcome {
  return "kind" in x;
}

/** The backoff of redeliveries, as the operators that nak take it. */
export interface RetryDelayOptions {
  retryBaseMs?: number;
  retryMaxMs?: number;
  /**
   * Up to this fraction of a redelivery delay is added at random (default
   * {@link DEFAULT_BACKOFF_JITTER}), so that messages naked together do not come back together;
   * 0 for the exact doubling.
   */
  retryJitter?: number;
}

export const DEFAULT_RETRY_BASE_MS = 250;
export const DEFAULT_RETRY_MAX_MS = 10_000;

/**
 * Redelivery delay after a retriable failure: doubles per delivery up to the cap, plus up to
 * `jitter` of it at random (the one backoff of operators/support/backoff.ts).
 */
export function retryDelayMs(deliveryCount: number, baseMs: number, maxMs: number, jitter: number = DEFAULT_BACKOFF_JITTER, random?: () => number): number {
  return backoffMs(deliveryCount - 1, { baseMs, maxMs, jitter }, random);
}

/** {@link retryDelayMs} by a delivery count, with the options' backoff (defaults where unset). */
export function retryDelays(opts: RetryDelayOptions): (deliveryCount: number) => number {
  const base = opts.retryBaseMs ?? DEFAULT_RETRY_BASE_MS;
  const max = opts.retryMaxMs ?? DEFAULT_RETRY_MAX_MS;
  const jitter = opts.retryJitter ?? DEFAULT_BACKOFF_JITTER;
  return (deliveryCount) => retryDelayMs(deliveryCount, base, max, jitter);
}
