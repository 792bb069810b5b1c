/** The result cache: which requests it answers, their keys, the `infer_cache` bucket, its metrics. */
export { isDeterministic, resultCacheKey } from "./cache-key.js";
export { CacheMetrics, type CacheLookupResult } from "./cache-metrics.js";
export { CACHE_BUCKET, DEFAULT_CACHE_MAX_AGE_MS, DEFAULT_CACHE_MAX_BYTES, ResultCache, type ResultCacheOptions } from "./result-cache.js";
