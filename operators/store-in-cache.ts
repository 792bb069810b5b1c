import { catchError, connect, EMPTY, endWith, filter, from, ignoreElements, map, merge, mergeMap, of, type Observable, type ObservableInput, type OperatorFunction } from "rxjs";
import type { InferResult, Outcome } from "./types.js";

/** Where answers are stored for {@link answerFromCache} to find. */
export interface AnswerStore {
  /** Stores an ok result under `key`; may fail (the result goes out all the same). */
  put(key: string, result: InferResult): ObservableInput<unknown>;
}

export interface StoreInCacheOptions {
  /** Stores under way at once. */
  concurrency?: number;
}

/** Result stores under way at once, by default. */
const DEFAULT_CACHE_STORE_CONCURRENCY = 64;

/**
 * Stores the ok result of each request that was looked up in the result cache and not found
 * (it carries a `cacheKey`), then lets the outcome go on marked `timing.cache: "miss"`. Other
 * outcomes pass at once and unchanged: errors, retries, dead letters, requests that may not be
 * cached, answers already stored. A store that fails lets the outcome go on all the same (the
 * next such request runs on a worker again).
 *
 * ```
 * input:  A(ok, cacheKey)  B(error, cacheKey)  c(ok, no cacheKey)
 * store:  |-put-|
 * output: ------A'         B'                  c
 * ```
 * (A': A with `timing.cache: "miss"`, after its put ended; B': B so marked, not stored.)
 */
export function storeInCache(store: AnswerStore, opts: StoreInCacheOptions = {}): OperatorFunction<Outcome, Outcome> {
  const concurrency = opts.concurrency ?? DEFAULT_CACHE_STORE_CONCURRENCY;
  const mark = (o: Outcome): Outcome => {
    if (o.kind !== "result" || o.job.cacheKey === undefined || o.alreadyStored === true || o.job.shadow === true || !o.result.timing) return o;
    return { ...o, result: { ...o.result, timing: { ...o.result.timing, cache: "miss" } } };
  };
  const toStore = (o: Outcome): o is Extract<Outcome, { kind: "result" }> =>
    o.kind === "result" && o.job.cacheKey !== undefined && o.alreadyStored !== true && o.job.shadow !== true && o.result.status === "ok";
  const put = (o: Extract<Outcome, { kind: "result" }>): Observable<Outcome> => {
    let stored: Observable<unknown>;
    try {
      stored = from(store.put(o.job.cacheKey!, o.result));
    } catch {
      return of(mark(o));
    }
    // The outcome, once, when the put ends (whatever it emitted, or if it failed).
    return stored.pipe(
      ignoreElements(),
      catchError(() => EMPTY),
      endWith(mark(o)),
    );
  };
  // Outcomes that are not stored never wait behind stores.
  return (outcomes) =>
    outcomes.pipe(
      connect((shared) =>
        merge(
          shared.pipe(
            filter((o) => !toStore(o)),
            map(mark),
          ),
          shared.pipe(filter(toStore), mergeMap(put, concurrency)),
        ),
      ),
    );
}
