import { connect, filter, merge, type OperatorFunction } from "rxjs";
import { isOutcome } from "./outcome.js";
import type { InferJob, Outcome } from "./types.js";

/**
 * Applies `op` to the jobs of a mixed stream and lets outcomes (requests already answered)
 * pass around it, so each step of the pipeline only sees what is still on its way.
 *
 * ```
 * input:        a  X  b      (X an outcome)
 * op:           a'    b'
 * output:       a' X  b'
 * ```
 */
export function onJobs<J extends InferJob, R>(op: OperatorFunction<J, R>): OperatorFunction<J | Outcome, R | Outcome> {
  // connect, not share: both branches are subscribed before the source starts, so a source
  // that emits on subscribe does not give everything to the first branch.
  return connect((shared) => merge(shared.pipe(filter(isOutcome)), shared.pipe(filter((x): x is J => !isOutcome(x)), op)));
}
