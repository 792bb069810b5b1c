import type { InferJob, Outcome } from "./types.js";
import { backoffMs } from "./support/backoff.js";

/** True for an {@link Outcome}; false for a job still on its way (jobs have no `kind`). */
export function isOutcome<J extends InferJob>(x: J | Outcome): x is Outcome {
  return "kind" in x;
}

/**
 * Redelivery delay after a retriable failure: doubles per delivery, capped, without jitter (the
 * queue's redelivery timing spreads them; settling and its tests rely on the exact figure).
 */
export function retryDelayMs(deliveryCount: number, baseMs: number, maxMs: number): number {
  return backoffMs(deliveryCount - 1, { baseMs, maxMs, jitter: 0 });
}
