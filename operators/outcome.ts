import type { InferJob, Outcome } from "./types.js";

/** True for an {@link Outcome}; false for a job still on its way (jobs have no `kind`). */
export function isOutcome<J extends InferJob>(x: J | Outcome): x is Outcome {
  return "kind" in x;
}

/** Redelivery delay after a retriable failure: doubles per delivery, capped. */
export function retryDelayMs(deliveryCount: number, baseMs: number, maxMs: number): number {
  return Math.min(maxMs, baseMs * 2 ** Math.max(0, Math.min(deliveryCount - 1, 20)));
}
