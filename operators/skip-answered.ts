import { from, map, mergeMap, of, type Observable, type OperatorFunction } from "rxjs";
import type { InferJob, InferResult, Outcome } from "./types.js";

export interface SkipAnsweredOptions {
  /** Lookups under way at once. */
  concurrency?: number;
  now?: () => number;
}

/** Lookups of redelivered requests under way at once, by default. */
const DEFAULT_SKIP_ANSWERED_CONCURRENCY = 64;

/**
 * Looks a redelivered request up in the results store before it is run again, and answers it
 * from there when an earlier delivery was already answered (the pipeline died, or the
 * acknowledgement was lost, after the result was stored): no worker runs it twice. First
 * deliveries pass through untouched, in order, without a lookup; a lookup that fails lets the
 * request go on (the settle step checks again before publishing).
 *
 * ```
 * input:  a(1st) b(redelivered, answered) c(redelivered, not answered)
 * output: a      B(outcome: already stored)  c
 * ```
 *
 * @param lookup the stored result of a request, or undefined when there is none
 */
export function skipAnswered<J extends InferJob>(
  lookup: (job: J) => Promise<InferResult | undefined>,
  opts: SkipAnsweredOptions = {},
): OperatorFunction<J, J | Outcome> {
  const now = opts.now ?? Date.now;
  const concurrency = opts.concurrency ?? DEFAULT_SKIP_ANSWERED_CONCURRENCY;
  return mergeMap((job: J): Observable<J | Outcome> => {
    if (job.delivery.deliveryCount <= 1) return of(job);
    return from(
      lookup(job).then(
        (stored) => ({ looked: true, stored }),
        () => ({ looked: false, stored: undefined }),
      ),
    ).pipe(
      map(({ looked, stored }): J | Outcome => {
        if (stored !== undefined) return { kind: "result", job, result: stored, alreadyStored: true };
        return looked ? { ...job, storedCheckedAtMs: now() } : job;
      }),
    );
  }, concurrency);
}
