/**
 * Model registry, version routing and the health-checked worker pool, against a real nats-server
 * and real gRPC workers.
 */
import { expect } from "chai";
import { nuid } from "@nats-io/transport-node";
import { Kvm } from "@nats-io/kv";
import { InferenceClient } from "../../pipeline/client/client.js";
import type { ModelSpec } from "../../pipeline/routing/registry.js";
import type { PipelineService } from "../../pipeline/service.js";
import { WorkerRegistration } from "../../pipeline/workers/directory.js";
import { WORKERS_BUCKET } from "../../proto/wire.js";
import type { InferResult } from "../../operators/types.js";
import { useNats, waitFor } from "../support/nats.js";
import { startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe("registry and worker pool", function () {
  this.timeout(120_000);
  const nats = useNats();
  const workers: TestWorker[] = [];
  let pipeline: PipelineService;
  let client: InferenceClient;

  const worker = async (opts: Parameters<typeof startWorker>[0] = {}): Promise<TestWorker> => {
    const w = await startWorker(opts);
    workers.push(w);
    return w;
  };

  before(async () => {
    pipeline = await startPipeline(
      testConfig(nats.url, {
        pipeline: { healthIntervalMs: 100, workerTtlMs: 1_500, maxInFlight: 128 },
        consumer: { maxDeliver: 5 },
      }),
    );
    client = new InferenceClient(nats.nc, "reg");
  });
  after(async () => {
    await client?.close();
    await pipeline?.stop();
    for (const w of workers) await w.stop().catch(() => undefined);
  });

  const setModel = async (model: string, spec: ModelSpec): Promise<void> => {
    const rev = pipeline.registry.table.revision;
    await pipeline.registry.put(model, spec);
    await waitFor(`registry update of ${model}`, () => pipeline.registry.table.revision > rev, 5_000, 2);
  };

  it("follows a weight change from 100/0 to 0/100 as soon as the pipeline has it, with no failed request", async () => {
    const w1 = await worker({ base_ms: 1 });
    const w2 = await worker({ base_ms: 1 });
    pipeline.pool.add("flip", "v1", w1.server.endpoint);
    pipeline.pool.add("flip", "v2", w2.server.endpoint);
    await setModel("flip", { versions: { v1: { weight: 100 }, v2: { weight: 0 } } });
    const table = pipeline.registry.table;
    const pipelineHasFlip = (): boolean => (table.get("flip")?.versions["v2"]?.weight ?? 0) === 100;

    // Each request notes whether the registry write had started when it was sent and answered,
    // and whether the pipeline (in this process) had the new weights when it was sent.
    let writeStarted = false;
    const results: Array<{ answeredBeforeWrite: boolean; sentAfterFlip: boolean; r: InferResult }> = [];
    let running = true;
    const traffic = (async () => {
      let i = 0;
      while (running) {
        const batch = Array.from({ length: 10 }, () => {
          const sentAfterFlip = pipelineHasFlip();
          return client.request("flip", { prompt: `t${i++}` }).then((r) => results.push({ answeredBeforeWrite: !writeStarted, sentAfterFlip, r }));
        });
        await Promise.all(batch);
        await sleep(5);
      }
    })();
    await waitFor("traffic before the change", () => results.length >= 50);
    const kvm = new Kvm(nats.nc);
    const kv = await kvm.open("infer_models");
    writeStarted = true;
    await kv.put("flip", JSON.stringify({ versions: { v1: { weight: 0 }, v2: { weight: 100 } } }));
    await waitFor("the pipeline to have the new weights", pipelineHasFlip);
    await waitFor("traffic after the change", () => results.filter((x) => x.sentAfterFlip).length >= 50);
    running = false;
    await traffic;

    for (const { r } of results) expect(r.status, JSON.stringify(r)).to.equal("ok");
    // Routing happens when the pipeline takes a request: one answered before the write went to
    // v1; one sent once the pipeline had the new weights went to v2. (One in between, sent before
    // and answered after, may go either way.)
    const before = results.filter((x) => x.answeredBeforeWrite);
    const after = results.filter((x) => x.sentAfterFlip);
    expect(before.length).to.be.at.least(50);
    for (const x of before) expect(x.r.version).to.equal("v1");
    for (const x of after) expect(x.r.version).to.equal("v2");
    expect(after[0]!.r.output?.text).to.match(/^flip@v2: /);
  });

  it("keeps a request on its version across retries (stable hash of the id)", async () => {
    await setModel("split", { versions: { a: { weight: 50 }, b: { weight: 50 } } });
    const w = await worker();
    pipeline.pool.add("split", "a", w.server.endpoint);
    pipeline.pool.add("split", "b", w.server.endpoint);
    const ids = Array.from({ length: 200 }, (_, i) => `split-${i}`);
    const first = await Promise.all(ids.map((id) => client.request("split", { prompt: id }, { id })));
    const versions = new Set(first.map((r) => r.version));
    expect(versions).to.deep.equal(new Set(["a", "b"]));
    // Routing is a function of the id: the same ids route the same way again.
    for (const r of first) expect(pipeline.registry.table.resolve("split", undefined, r.id)).to.deep.equal({ ok: true, version: r.version });
  });

  it("retries the requests of a worker killed mid-batch on another worker: none lost, none twice", async () => {
    const a = await worker({ base_ms: 40, per_item_ms: 1 });
    const b = await worker({ base_ms: 40, per_item_ms: 1 });
    await setModel("kill", { versions: { v1: { weight: 100 } }, batch: { max_size: 16, max_delay_ms: 5 } });
    pipeline.pool.add("kill", "v1", a.server.endpoint);
    pipeline.pool.add("kill", "v1", b.server.endpoint);
    const seen = new Map<string, number>();
    const sub = nats.nc.subscribe("infer.res.reg.>", {
      callback: (_e, m) => {
        const id = m.subject.split(".")[3]!;
        if (id.startsWith("kill-")) seen.set(id, (seen.get(id) ?? 0) + 1);
      },
    });
    const N = 400;
    const all = Promise.all(Array.from({ length: N }, (_, i) => client.request("kill", { prompt: `k${i}` }, { id: `kill-${i}`, timeoutMs: 60_000 })));
    await waitFor("worker a busy", () => a.engine.counters.batches > 2, 10_000, 1);
    a.server.kill();
    const results = await all;
    await sleep(300);
    sub.unsubscribe();
    for (const [i, r] of results.entries()) {
      expect(r.status, JSON.stringify(r)).to.equal("ok");
      expect(r.output?.text).to.equal(`kill@v1: k${i}`);
    }
    expect(seen.size).to.equal(N);
    for (const [id, n] of seen) expect(n, id).to.equal(1);
    expect(b.engine.counters.items).to.be.greaterThan(0);
  });

  it("sends no traffic to a worker that fails its health checks until it recovers", async () => {
    const good = await worker();
    const sick = await worker();
    await setModel("health", { versions: { v1: { weight: 100 } } });
    pipeline.pool.add("health", "v1", good.server.endpoint);
    pipeline.pool.add("health", "v1", sick.server.endpoint);
    sick.server.setServing(false);
    await waitFor("sick marked unhealthy", () => pipeline.pool.snapshot().some((w) => w.endpoint === sick.server.endpoint && !w.healthy), 5_000);
    const before = sick.engine.counters.items;
    await Promise.all(Array.from({ length: 100 }, (_, i) => client.infer("health", { prompt: `h${i}` })));
    expect(sick.engine.counters.items).to.equal(before);
    sick.server.setServing(true);
    await waitFor("sick healthy again", () => pipeline.pool.snapshot().some((w) => w.endpoint === sick.server.endpoint && w.healthy), 5_000);
    // Keep both busy so the least-loaded choice uses the recovered worker.
    await Promise.all(Array.from({ length: 300 }, (_, i) => client.infer("health", { prompt: `r${i}` })));
    expect(sick.engine.counters.items).to.be.greaterThan(before);
  });

  it("sends a copy of every request to the shadow version, never to the client", async () => {
    const live = await worker();
    const shadow = await worker();
    await setModel("shadowed", { versions: { v1: { weight: 100 } }, shadow: "v2" });
    pipeline.pool.add("shadowed", "v1", live.server.endpoint);
    pipeline.pool.add("shadowed", "v2", shadow.server.endpoint);
    const shadowResults = new Map<string, InferResult>();
    const sub = nats.nc.subscribe("infer.shadow.reg.>", {
      callback: (_e, m) => {
        const r = JSON.parse(new TextDecoder().decode(m.data)) as InferResult;
        shadowResults.set(r.id, r);
      },
    });
    const ids = Array.from({ length: 50 }, () => `sh-${nuid.next()}`);
    const results = await Promise.all(ids.map((id) => client.infer("shadowed", { prompt: id }, { id })));
    for (const r of results) {
      expect(r.version).to.equal("v1");
      expect(r.output?.text).to.equal(`shadowed@v1: ${r.id}`);
    }
    await waitFor("all shadow results", () => ids.every((id) => shadowResults.has(id)), 10_000);
    for (const id of ids) expect(shadowResults.get(id)!.output?.text).to.equal(`shadowed@v2: ${id}`);
    const shadowIds = new Set(shadow.engine.calls.flatMap((c) => c.ids));
    for (const id of ids) expect(shadowIds.has(id), id).to.equal(true);
    sub.unsubscribe();
  });

  it("changes nothing for clients when the shadow version fails", async () => {
    const live = await worker();
    await setModel("shadowfail", { versions: { v1: { weight: 100 } }, shadow: "broken", timeout_ms: 2_000 });
    pipeline.pool.add("shadowfail", "v1", live.server.endpoint);
    // "broken" has no worker at all: every copy fails.
    const results = await Promise.all(Array.from({ length: 50 }, (_, i) => client.request("shadowfail", { prompt: `s${i}` })));
    for (const r of results) {
      expect(r.status).to.equal("ok");
      expect(r.version).to.equal("v1");
    }
  });

  it("makes requests for a model with no worker wait up to their deadline, then answers them", async () => {
    await setModel("orphan", { versions: { v1: { weight: 100 } }, timeout_ms: 1_500 });
    const t0 = Date.now();
    const deadlineMs = t0 + 1_000;
    const answeredAt = (r: InferResult): { r: InferResult; at: number } => ({ r, at: Date.now() });
    const [withDeadline, withoutDeadline] = await Promise.all([
      client.request("orphan", { prompt: "x" }, { deadlineMs }).then(answeredAt),
      client.request("orphan", { prompt: "y" }).then(answeredAt),
    ]);
    expect(withDeadline.r.error?.code).to.equal("DEADLINE_EXCEEDED");
    expect(withoutDeadline.r.error?.code).to.equal("UNAVAILABLE");
    // Answered once their wait was over, not before: at the deadline, and at the model's
    // timeout after the request was published.
    expect(withDeadline.at).to.be.at.least(deadlineMs);
    expect(withoutDeadline.at).to.be.at.least(t0 + 1_500 - 1);
  });

  it("serves a request that waited for a worker as soon as one registers", async () => {
    await setModel("late", { versions: { v1: { weight: 100 } }, timeout_ms: 20_000 });
    const pending = client.request("late", { prompt: "patience" });
    await sleep(700);
    const w = await worker();
    const reg = await WorkerRegistration.start(nats.nc, {
      workerId: "late-1",
      endpoint: w.server.endpoint,
      capacity: 8,
      serves: [{ model: "late", version: "v1" }],
      ttlMs: 1_500,
    });
    const r = await pending;
    expect(r.status).to.equal("ok");
    expect(r.output?.text).to.equal("late@v1: patience");
    await reg.stop();
    await waitFor("deregistered", () => !pipeline.pool.keys().includes("late@v1"), 5_000);
  });

  it("drops a registered worker that stops refreshing its entry", async () => {
    const kv = await new Kvm(nats.nc).open(WORKERS_BUCKET);
    const w = await worker();
    await kv.put("ghost.v1.g1", JSON.stringify({ endpoint: w.server.endpoint, capacity: 4 }));
    await waitFor("registered", () => pipeline.pool.keys().includes("ghost@v1"), 5_000);
    // No refresh: gone after the TTL (1.5 s here).
    await waitFor("expired", () => !pipeline.pool.keys().includes("ghost@v1"), 5_000);
    expect(pipeline.directory.list().some((e) => e.model === "ghost")).to.equal(false);
  });
});
