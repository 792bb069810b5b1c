import { map, type OperatorFunction } from "rxjs";
import { errorResult, type InferJob, type Outcome } from "./types.js";

export interface AdmitByDeadlineOptions {
  now?: () => number;
}

/**
 * Answers a request whose `Infer-Deadline` has passed with `DEADLINE_EXCEEDED` instead of
 * letting it go on; other jobs pass through unchanged.
 *
 * ```
 * input:  a(live) b(expired) c(live)
 * output: a       B(outcome) c
 * ```
 */
export function admitByDeadline<J extends InferJob>(opts: AdmitByDeadlineOptions = {}): OperatorFunction<J, J | Outcome> {
  const now = opts.now ?? Date.now;
  return map((job) => {
    if (job.deadlineMs !== undefined && job.deadlineMs <= now()) {
      return {
        kind: "result",
        job,
        result: errorResult(job, "DEADLINE_EXCEEDED", `deadline ${new Date(job.deadlineMs).toISOString()} passed before the request was served`),
      } satisfies Outcome;
    }
    return job;
  });
}
