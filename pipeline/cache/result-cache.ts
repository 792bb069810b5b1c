/**
 * The result cache: answers of deterministic requests kept in the NATS KV bucket `infer_cache`,
 * for models whose registry entry has `cache` (docs/protocol.md, "Registry").
 *
 * NATS 2.9 has no per-message TTL, so the bucket's max age bounds every entry (configuration
 * `streams.cacheMaxAgeMs`) and a model's shorter `cache.ttl_ms` is enforced when reading: an
 * entry older than the model's TTL is a miss (and is overwritten by the next answer).
 *
 * ```ts
 * const cache = await ResultCache.open(nc, { table: registry.table, maxAgeMs: 3_600_000 });
 * const key = cache.keyOf(job);                  // undefined: not cacheable
 * const hit = key && (await cache.get(key, job));
 * ```
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { Kvm, type KV } from "@nats-io/kv";
import type { CachedAnswers } from "../../operators/answer-from-cache.js";
import type { AnswerStore } from "../../operators/store-in-cache.js";
import type { InferResult, RoutedJob } from "../../operators/types.js";
import { CACHE_BUCKET } from "../../proto/wire.js";
import type { ModelTable } from "../routing/registry.js";
import { resultCacheKey } from "./cache-key.js";
import type { CacheMetrics } from "./cache-metrics.js";

export { CACHE_BUCKET };
/** Longest any answer is kept (the bucket's max age), by default. */
export const DEFAULT_CACHE_MAX_AGE_MS = 60 * 60_000;
/** Size bound of the bucket, by default; when full, new answers are not stored until old ones expire. */
export const DEFAULT_CACHE_MAX_BYTES = 1024 * 1024 * 1024;

export interface ResultCacheOptions {
  /** The models' registry entries (whether and how long each caches). */
  table: ModelTable;
  replicas?: number;
  maxAgeMs?: number;
  maxBytes?: number;
  metrics?: CacheMetrics;
  now?: () => number;
}

/** What is stored: the answer without the fields that belong to one request. */
interface StoredAnswer {
  output?: InferResult["output"];
  usage?: InferResult["usage"];
}

export class ResultCache implements CachedAnswers<RoutedJob>, AnswerStore {
  private constructor(
    readonly kv: KV,
    private readonly table: ModelTable,
    private readonly metrics: CacheMetrics | undefined,
    private readonly now: () => number,
  ) {}

  /** Opens the bucket, creating it when missing (an existing bucket keeps its settings). */
  static async open(nc: NatsConnection, opts: ResultCacheOptions): Promise<ResultCache> {
    const kv = await new Kvm(nc).create(CACHE_BUCKET, {
      history: 1,
      replicas: opts.replicas ?? 1,
      ttl: opts.maxAgeMs ?? DEFAULT_CACHE_MAX_AGE_MS,
      max_bytes: opts.maxBytes ?? DEFAULT_CACHE_MAX_BYTES,
    });
    return new ResultCache(kv, opts.table, opts.metrics, opts.now ?? Date.now);
  }

  keyOf(job: RoutedJob): string | undefined {
    return resultCacheKey(job, this.table.get(job.model));
  }

  async get(key: string, job: RoutedJob): Promise<InferResult | undefined> {
    const ttlMs = this.table.get(job.model)?.cache?.ttl_ms;
    if (ttlMs === undefined) return undefined;
    let found: InferResult | undefined;
    try {
      const e = await this.kv.get(key);
      if (e !== null && e.operation === "PUT" && this.now() - e.created.getTime() <= ttlMs) found = asAnswer(e.json<unknown>());
    } catch (err) {
      this.metrics?.lookup(job.model, "error");
      throw err;
    }
    this.metrics?.lookup(job.model, found ? "hit" : "miss");
    return found;
  }

  async put(key: string, result: InferResult): Promise<void> {
    const model = result.model ?? key.split(".").at(-2) ?? "";
    const stored: StoredAnswer = {};
    if (result.output !== undefined) stored.output = result.output;
    if (result.usage !== undefined) stored.usage = result.usage;
    try {
      await this.kv.put(key, JSON.stringify(stored));
    } catch (err) {
      this.metrics?.stored(model, false);
      throw err;
    }
    this.metrics?.stored(model, true);
  }
}

/** A stored value as an answer, or undefined when it is not one (written by something else). */
function asAnswer(v: unknown): InferResult | undefined {
  if (typeof v !== "object" || v === null || Array.isArray(v)) return undefined;
  const s = v as StoredAnswer;
  const r: InferResult = { id: "", status: "ok" };
  if (typeof s.output === "object" && s.output !== null) r.output = s.output;
  if (typeof s.usage === "object" && s.usage !== null) r.usage = s.usage;
  return r.output === undefined ? undefined : r;
}
