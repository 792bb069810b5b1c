import { catchError, connect, defaultIfEmpty, filter, from, map, merge, mergeMap, of, take, type Observable, type ObservableInput, type OperatorFunction } from "rxjs";
import type { InferResult, Outcome, RoutedJob } from "./types.js";

/** Where cached answers are looked up. */
export interface CachedAnswers<J extends RoutedJob> {
  /**
   * The key the job's answer is cached under, or undefined when it must not be answered from a
   * cache (the model has no cache, or the request is not deterministic).
   */
  keyOf(job: J): string | undefined;
  /** The answer stored under `key`, or undefined when there is none (or it expired). */
  get(key: string, job: J): ObservableInput<InferResult | undefined>;
}

export interface AnswerFromCacheOptions {
  /** Lookups under way at once. */
  concurrency?: number;
  now?: () => number;
}

/** Cache lookups under way at once, by default. */
const DEFAULT_CACHE_LOOKUP_CONCURRENCY = 64;

/**
 * Answers a request from the result cache when the same request (same model, version, inputs
 * and parameters, in the same scope) was answered before: the answer goes out without a worker,
 * marked `timing.cache: "hit"`. A request that may be cached but is not found goes on carrying
 * its `cacheKey` (its result is stored under it once it is ok); a request that may not be cached
 * goes on untouched, without a lookup. A lookup that fails counts as not found.
 *
 * ```
 * input:  a(cached)  b(not cacheable)  c(cacheable, not cached)
 * output: A          b                 c{cacheKey}
 * ```
 * (A: the outcome answering a from the cache.)
 */
export function answerFromCache<J extends RoutedJob>(cache: CachedAnswers<J>, opts: AnswerFromCacheOptions = {}): OperatorFunction<J, J | Outcome> {
  const now = opts.now ?? Date.now;
  const concurrency = opts.concurrency ?? DEFAULT_CACHE_LOOKUP_CONCURRENCY;
  const keyOf = (job: J): string | undefined => {
    if (job.shadow === true || job.stream) return undefined;
    try {
      return cache.keyOf(job);
    } catch {
      return undefined;
    }
  };
  const lookUp = ({ job, key }: { job: J; key: string }): Observable<J | Outcome> => {
    let lookup: Observable<InferResult | undefined>;
    try {
      lookup = from(cache.get(key, job));
    } catch {
      lookup = of(undefined);
    }
    return lookup.pipe(
      catchError(() => of(undefined)),
      take(1),
      defaultIfEmpty(undefined),
      map((stored): J | Outcome => (stored === undefined ? { ...job, cacheKey: key } : { kind: "result", job, result: cachedResult(job, stored, now()) })),
    );
  };
  // Requests that may not be cached never wait behind lookups.
  return (jobs) =>
    jobs.pipe(
      map((job) => ({ job, key: keyOf(job) })),
      connect((keyed) =>
        merge(
          keyed.pipe(
            filter((k) => k.key === undefined),
            map((k) => k.job),
          ),
          keyed.pipe(
            filter((k): k is { job: J; key: string } => k.key !== undefined),
            mergeMap(lookUp, concurrency),
          ),
        ),
      ),
    );
}

/** A stored answer, as the answer to this request. */
export function cachedResult(job: RoutedJob, stored: InferResult, nowMs: number): InferResult {
  const waited = Math.round((nowMs - job.delivery.storedAtMs) * 100) / 100;
  const result: InferResult = {
    id: job.id,
    status: "ok",
    model: job.model,
    version: job.version,
    timing: { queue_ms: waited, batch_size: 0, worker_ms: 0, total_ms: waited, cache: "hit" },
  };
  if (stored.output !== undefined) result.output = stored.output;
  if (stored.usage !== undefined) result.usage = stored.usage;
  return result;
}
