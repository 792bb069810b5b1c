/**
 * The result cache end to end: a real nats-server, the pipeline, a simulated gRPC worker whose
 * call log says which requests reached it.
 */
import { expect } from "chai";
import { nuid } from "@nats-io/transport-node";
import { Kvm } from "@nats-io/kv";
import { InferenceClient } from "../../pipeline/client/client.js";
import { CACHE_BUCKET } from "../../pipeline/cache/result-cache.js";
import type { PipelineService } from "../../pipeline/service.js";
import { useNats } from "../support/nats.js";
import { startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

describe("result cache: answers without a worker", function () {
  this.timeout(60_000);
  const nats = useNats();
  let worker: TestWorker;
  let pipeline: PipelineService;
  let acme: InferenceClient;
  let globex: InferenceClient;

  const v1 = { v1: { weight: 100 } };
  before(async () => {
    worker = await startWorker({ base_ms: 1, per_item_ms: 0 });
    const endpoint = worker.server.endpoint;
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: {
          embed: { versions: v1, cache: { ttl_ms: 60_000 } },
          common: { versions: v1, cache: { ttl_ms: 60_000, shared: true } },
          plain: { versions: v1 },
          chat: { versions: v1, generate: true, cache: { ttl_ms: 60_000 } },
        },
        workers: ["embed", "common", "plain", "chat"].map((model) => ({ model, version: "v1", endpoint })),
      }),
    );
    acme = new InferenceClient(nats.nc, "acme");
    globex = new InferenceClient(nats.nc, "globex");
  });

  after(async () => {
    await acme?.close();
    await globex?.close();
    await pipeline?.stop();
    await worker?.stop();
  });

  /** Ids of the requests the worker ran (batches and generations). */
  const ran = (): string[] => worker.engine.calls.flatMap((c) => c.ids);
  const cacheKeys = async (): Promise<string[]> => {
    const kv = await new Kvm(nats.nc).open(CACHE_BUCKET);
    const keys: string[] = [];
    for await (const k of await kv.keys()) keys.push(k);
    return keys;
  };

  it("answers a repeated request from the cache: the worker runs it once, the answer is the same, marked hit", async () => {
    const body = { inputs: { text: "a sentence", dims: 4 }, prompt: "a sentence", parameters: { normalize: true, pooling: "mean" } };
    const first = await acme.infer("embed", body, { id: `c1-${nuid.next()}` });
    const same = { prompt: "a sentence", parameters: { pooling: "mean", normalize: true }, inputs: { dims: 4, text: "a sentence" } };
    const second = await acme.infer("embed", same, { id: `c2-${nuid.next()}` });
    const third = await acme.infer("embed", body, { id: `c3-${nuid.next()}` });
    expect(first.timing?.cache).to.equal("miss");
    expect(first.timing?.batch_size).to.equal(1);
    for (const r of [second, third]) {
      expect(r.timing?.cache).to.equal("hit");
      expect(r.timing?.batch_size).to.equal(0);
      expect(r.timing?.worker_ms).to.equal(0);
      expect(r.output).to.deep.equal(first.output);
      expect(r.usage).to.deep.equal(first.usage);
      expect(r.model).to.equal("embed");
      expect(r.version).to.equal("v1");
    }
    expect(second.id).to.not.equal(first.id);
    const ranNow = ran();
    expect(ranNow).to.include(first.id);
    expect(ranNow).to.not.include(second.id);
    expect(ranNow).to.not.include(third.id);
    const text = await pipeline.metrics.registry.metrics();
    expect(text).to.match(/sluice_cache_lookups_total\{model="embed",result="hit"\} 2\b/);
    expect(text).to.match(/sluice_cache_lookups_total\{model="embed",result="miss"\} 1\b/);
    expect(text).to.match(/sluice_cache_stores_total\{model="embed",status="ok"\} 1\b/);
  });

  it("never caches a non-deterministic request: sampling, a generation without a seed, a streamed one", async () => {
    const before = (await cacheKeys()).length;
    const ids: string[] = [];
    for (let i = 0; i < 2; i++) {
      const hot = await acme.infer("embed", { prompt: "sampled", parameters: { temperature: 0.8 } });
      const unseeded = await acme.infer("chat", { prompt: "tell me", parameters: { temperature: 0, max_tokens: 4 } });
      ids.push(hot.id, unseeded.id);
      expect(hot.timing?.cache).to.equal(undefined);
      expect(unseeded.timing?.cache).to.equal(undefined);
    }
    for (let i = 0; i < 2; i++) {
      const id = `s-${i}-${nuid.next()}`;
      for await (const ev of acme.stream("chat", { prompt: "stream me", parameters: { temperature: 0, seed: 3, max_tokens: 4 } }, { id })) {
        if ("result" in ev) expect(ev.result.timing?.cache).to.equal(undefined);
      }
      ids.push(id);
    }
    const ranNow = ran();
    for (const id of ids) expect(ranNow, id).to.include(id);
    expect((await cacheKeys()).length).to.equal(before);
  });

  it("caches a generation at temperature 0 with a seed", async () => {
    const body = { prompt: "a seeded story", parameters: { temperature: 0, seed: 42, max_tokens: 6 } };
    const first = await acme.infer("chat", body);
    const second = await acme.infer("chat", body);
    expect(first.timing?.cache).to.equal("miss");
    expect(second.timing?.cache).to.equal("hit");
    expect(second.output?.text).to.equal(first.output?.text);
    expect(ran()).to.include(first.id).and.not.include(second.id);
  });

  it("keeps each tenant's answers to itself: the same request from another tenant runs on the worker", async () => {
    const body = { prompt: "per tenant" };
    const a1 = await acme.infer("embed", body);
    const g1 = await globex.infer("embed", body);
    const a2 = await acme.infer("embed", body);
    const g2 = await globex.infer("embed", body);
    expect([a1, g1, a2, g2].map((r) => r.timing?.cache)).to.deep.equal(["miss", "miss", "hit", "hit"]);
    const ranNow = ran();
    expect(ranNow).to.include(a1.id).and.include(g1.id);
    expect(ranNow).to.not.include(a2.id);
    expect(ranNow).to.not.include(g2.id);
    const keys = await cacheKeys();
    expect(keys.filter((k) => k.startsWith("tenant.acme.embed.")).length).to.be.greaterThan(0);
    expect(keys.filter((k) => k.startsWith("tenant.globex.embed.")).length).to.equal(1);
  });

  it("shares answers between tenants only when the model says cache.shared", async () => {
    const body = { prompt: "for everyone" };
    const a = await acme.infer("common", body);
    const g = await globex.infer("common", body);
    expect(a.timing?.cache).to.equal("miss");
    expect(g.timing?.cache).to.equal("hit");
    expect(g.output).to.deep.equal(a.output);
    expect(ran()).to.include(a.id).and.not.include(g.id);
    expect((await cacheKeys()).filter((k) => k.startsWith("shared.common."))).to.have.length(1);
  });

  it("caches nothing for a model without `cache`, and starts caching when the registry turns it on", async () => {
    const body = { prompt: "switch" };
    const r1 = await acme.infer("plain", body);
    const r2 = await acme.infer("plain", body);
    expect([r1, r2].map((r) => r.timing?.cache)).to.deep.equal([undefined, undefined]);
    expect(ran()).to.include(r1.id).and.include(r2.id);
    const revision = pipeline.registry.table.revision;
    await pipeline.registry.put("plain", { versions: v1, cache: { ttl_ms: 60_000 } });
    while (pipeline.registry.table.revision === revision) await new Promise((r) => setTimeout(r, 10));
    const r3 = await acme.infer("plain", body);
    const r4 = await acme.infer("plain", body);
    expect([r3, r4].map((r) => r.timing?.cache)).to.deep.equal(["miss", "hit"]);
  });

  it("refuses a bad cache value in the registry and keeps the one before", async () => {
    let err: unknown;
    await pipeline.registry.put("plain", { versions: v1, cache: { ttl_ms: 0 } }).catch((e: unknown) => (err = e));
    expect((err as Error)?.message).to.equal("model 'plain': cache.ttl_ms must be an integer number of milliseconds >= 1, got 0");
    expect(pipeline.registry.table.get("plain")?.cache).to.deep.equal({ ttl_ms: 60_000 });
  });
});
