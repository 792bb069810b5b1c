/**
 * The result cache's rules (which requests, which key, which registry values) as pure functions,
 * and its KV bucket against a real nats-server.
 */
import { expect } from "chai";
import { Registry } from "prom-client";
import { isDeterministic, resultCacheKey } from "../../pipeline/cache/cache-key.js";
import { CacheMetrics } from "../../pipeline/cache/cache-metrics.js";
import { CACHE_BUCKET, ResultCache } from "../../pipeline/cache/result-cache.js";
import { loadConfig, ConfigError } from "../../pipeline/config.js";
import { ModelSpecError, ModelTable, parseModelSpec, type ModelSpec } from "../../pipeline/routing/registry.js";
import type { Delivery, InferResult, RoutedJob } from "../../operators/types.js";
import { useNats } from "../support/nats.js";

const delivery = { storedAtMs: 0, deliveryCount: 1 } as Delivery;
const job = (extra: Partial<RoutedJob> = {}): RoutedJob => ({
  id: "r1",
  tenant: "acme",
  model: "emb",
  version: "v1",
  priority: "normal",
  prompt: "hello",
  stream: false,
  delivery,
  ...extra,
});
const cached: ModelSpec = { versions: { v1: { weight: 100 } }, cache: { ttl_ms: 60_000 } };

describe("result cache: registry field `cache`", () => {
  const versions = { v1: { weight: 1 } };

  it("accepts {ttl_ms} and {ttl_ms, shared}", () => {
    expect(parseModelSpec("m", { versions, cache: { ttl_ms: 1000 } }).cache).to.deep.equal({ ttl_ms: 1000 });
    expect(parseModelSpec("m", { versions, cache: { ttl_ms: 5, shared: true } }).cache).to.deep.equal({ ttl_ms: 5, shared: true });
    expect(parseModelSpec("m", { versions }).cache).to.equal(undefined);
  });

  const bad: Array<[string, unknown, RegExp]> = [
    ["not an object", 60000, /'cache' must be an object such as \{"ttl_ms": 60000\}/],
    ["an array", [1], /'cache' must be an object/],
    ["no ttl_ms", {}, /cache\.ttl_ms is required/],
    ["ttl_ms 0", { ttl_ms: 0 }, /cache\.ttl_ms must be an integer number of milliseconds >= 1, got 0/],
    ["ttl_ms negative", { ttl_ms: -5 }, /cache\.ttl_ms must be .* got -5/],
    ["ttl_ms fractional", { ttl_ms: 1.5 }, /cache\.ttl_ms must be an integer/],
    ["ttl_ms a string", { ttl_ms: "60s" }, /cache\.ttl_ms must be .* got "60s"/],
    ["shared not a boolean", { ttl_ms: 10, shared: "yes" }, /cache\.shared must be true or false/],
    ["an unknown field", { ttl_ms: 10, ttl: 5 }, /cache: unknown field 'ttl' \(known: ttl_ms, shared\)/],
  ];
  for (const [what, value, message] of bad) {
    it(`rejects a cache value with ${what}, saying what is wrong`, () => {
      let err: unknown;
      try {
        parseModelSpec("emb", { versions, cache: value });
      } catch (e) {
        err = e;
      }
      expect(err).to.be.instanceOf(ModelSpecError);
      expect((err as ModelSpecError).code).to.equal("INVALID_ARGUMENT");
      expect((err as Error).message).to.match(/^model 'emb': /);
      expect((err as Error).message).to.match(message);
    });
  }

  it("rejects a bad cache bucket bound in the configuration", () => {
    expect(() => loadConfig({ env: {}, overrides: { streams: { cacheMaxAgeMs: 0 } } })).to.throw(ConfigError, /streams\.cacheMaxAgeMs must be a positive number/);
    expect(() => loadConfig({ env: {}, overrides: { streams: { cacheMaxBytes: -1 } } })).to.throw(ConfigError, /streams\.cacheMaxBytes must be a positive number/);
  });
});

describe("result cache: which requests, which key", () => {
  it("non-generative models are deterministic unless a temperature above 0 is asked for", () => {
    expect(isDeterministic({ stream: false }, {})).to.equal(true);
    expect(isDeterministic({ stream: false, parameters: { temperature: 0 } }, {})).to.equal(true);
    expect(isDeterministic({ stream: false, parameters: { temperature: 0.7 } }, {})).to.equal(false);
    expect(isDeterministic({ stream: true }, {})).to.equal(false);
  });

  it("generative models are deterministic only at temperature 0 with an integer seed", () => {
    const gen = { generate: true };
    expect(isDeterministic({ stream: false, parameters: { temperature: 0, seed: 7 } }, gen)).to.equal(true);
    expect(isDeterministic({ stream: false, parameters: { temperature: 0 } }, gen)).to.equal(false);
    expect(isDeterministic({ stream: false, parameters: { seed: 7 } }, gen)).to.equal(false);
    expect(isDeterministic({ stream: false, parameters: { temperature: 0.2, seed: 7 } }, gen)).to.equal(false);
    expect(isDeterministic({ stream: false, parameters: { temperature: 0, seed: "7" } }, gen)).to.equal(false);
    expect(isDeterministic({ stream: false, parameters: { temperature: 0, seed: 1.5 } }, gen)).to.equal(false);
    expect(isDeterministic({ stream: false }, gen)).to.equal(false);
  });

  it("has no key without a cache in the registry, or for a non-deterministic request", () => {
    expect(resultCacheKey(job(), { versions: { v1: { weight: 1 } } })).to.equal(undefined);
    expect(resultCacheKey(job(), undefined)).to.equal(undefined);
    expect(resultCacheKey(job({ parameters: { temperature: 1 } }), cached)).to.equal(undefined);
    expect(resultCacheKey(job({ prompt: "lone \ud800 surrogate" }), cached)).to.equal(undefined);
  });

  it("is the same key for the same request written with its keys in another order", () => {
    const a = resultCacheKey(job({ inputs: { x: 1, y: [1, { b: 2, a: 1 }] }, parameters: { top_k: 3, temperature: 0 } }), cached);
    const b = resultCacheKey(job({ id: "r2", priority: "high", inputs: { y: [1, { a: 1, b: 2 }], x: 1 }, parameters: { temperature: 0, top_k: 3 } }), cached);
    expect(a).to.be.a("string");
    expect(a).to.equal(b);
    expect(a).to.match(/^tenant\.acme\.emb\.[A-Za-z0-9_-]{43}$/);
  });

  it("differs by tenant, version, prompt, inputs and parameters; shared caches drop the tenant", () => {
    const base = resultCacheKey(job(), cached);
    const others = [
      resultCacheKey(job({ tenant: "globex" }), cached),
      resultCacheKey(job({ version: "v2" }), cached),
      resultCacheKey(job({ prompt: "hello!" }), cached),
      resultCacheKey(job({ inputs: [1] }), cached),
      resultCacheKey(job({ parameters: { max_tokens: 5 } }), cached),
    ];
    expect(new Set([base, ...others]).size).to.equal(6);
    const shared: ModelSpec = { ...cached, cache: { ttl_ms: 1000, shared: true } };
    const s1 = resultCacheKey(job(), shared);
    expect(s1).to.match(/^shared\.emb\./);
    expect(resultCacheKey(job({ tenant: "globex" }), shared)).to.equal(s1);
    expect(s1).to.not.equal(base);
  });
});

describe("result cache: the infer_cache bucket", function () {
  this.timeout(30_000);
  const nats = useNats();
  let clock = 1_000_000;
  let table: ModelTable;
  let cache: ResultCache;
  let registry: Registry;

  before(async () => {
    table = new ModelTable();
    table.set("emb", cached);
    registry = new Registry();
    cache = await ResultCache.open(nats.nc, { table, maxAgeMs: 120_000, metrics: new CacheMetrics(registry), now: () => clock });
  });

  const answer: InferResult = { id: "r1", status: "ok", model: "emb", version: "v1", output: { text: "vector" }, usage: { prompt_tokens: 1, completion_tokens: 0 }, timing: { queue_ms: 1, batch_size: 1, worker_ms: 1, total_ms: 2 } };

  it("is created with the configured max age and keeps one value per key", async () => {
    const status = await cache.kv.status();
    expect(status.bucket).to.equal(CACHE_BUCKET);
    expect(status.ttl).to.equal(120_000);
    expect(status.history).to.equal(1);
  });

  it("stores the answer without the fields of one request, and finds it again", async () => {
    const key = cache.keyOf(job())!;
    expect(await cache.get(key, job())).to.equal(undefined);
    await cache.put(key, answer);
    const e = await cache.kv.get(key);
    expect(e?.json()).to.deep.equal({ output: { text: "vector" }, usage: { prompt_tokens: 1, completion_tokens: 0 } });
    clock = (e?.created.getTime() ?? 0) + 10;
    expect(await cache.get(key, job({ id: "other" }))).to.deep.equal({ id: "", status: "ok", output: { text: "vector" }, usage: { prompt_tokens: 1, completion_tokens: 0 } });
  });

  it("never finds one tenant's answer under another tenant's key", async () => {
    const acme = cache.keyOf(job())!;
    const globex = cache.keyOf(job({ tenant: "globex" }))!;
    await cache.put(acme, answer);
    expect(await cache.get(globex, job({ tenant: "globex" }))).to.equal(undefined);
  });

  it("serves an answer for the model's ttl_ms, not after (the bucket keeps it longer)", async () => {
    const key = cache.keyOf(job({ prompt: "ttl" }))!;
    await cache.put(key, answer);
    const created = (await cache.kv.get(key))!.created.getTime();
    clock = created + 60_000;
    expect(await cache.get(key, job({ prompt: "ttl" }))).to.not.equal(undefined);
    clock = created + 60_001;
    expect(await cache.get(key, job({ prompt: "ttl" }))).to.equal(undefined);
    // A shorter TTL set in the registry takes effect on entries already stored.
    table.set("emb", { ...cached, cache: { ttl_ms: 10 } });
    clock = created + 11;
    expect(await cache.get(key, job({ prompt: "ttl" }))).to.equal(undefined);
    table.set("emb", cached);
  });

  it("ignores a stored value that is not an answer, and a model whose cache was turned off", async () => {
    const key = cache.keyOf(job({ prompt: "junk" }))!;
    await cache.kv.put(key, "not json");
    clock = Date.now();
    let err: unknown;
    await cache.get(key, job({ prompt: "junk" })).catch((e: unknown) => (err = e));
    expect(err, "an unreadable entry fails the lookup (run as a miss)").to.be.instanceOf(Error);
    await cache.kv.put(key, JSON.stringify({ usage: {} }));
    expect(await cache.get(key, job({ prompt: "junk" }))).to.equal(undefined);
    table.set("emb", { versions: { v1: { weight: 100 } } });
    expect(cache.keyOf(job())).to.equal(undefined);
    table.set("emb", cached);
  });

  it("counts hits, misses, errors and stores by model", async () => {
    const text = await registry.metrics();
    const value = (re: RegExp): number => Number(re.exec(text)?.[1] ?? NaN);
    expect(value(/sluice_cache_lookups_total\{model="emb",result="hit"\} (\d+)/)).to.equal(2);
    expect(value(/sluice_cache_lookups_total\{model="emb",result="miss"\} (\d+)/)).to.equal(5);
    expect(value(/sluice_cache_lookups_total\{model="emb",result="error"\} (\d+)/)).to.equal(1);
    expect(value(/sluice_cache_stores_total\{model="emb",status="ok"\} (\d+)/)).to.equal(3);
  });
});
