/** Token streaming through the pipeline: order, completeness, cancellation and worker capacity. */
import { expect } from "chai";
import { InferenceClient } from "../../pipeline/client/client.js";
import type { StreamEvent } from "../../pipeline/client/options.js";
import type { PipelineService } from "../../pipeline/service.js";
import type { InferResult } from "../../operators/types.js";
import { useNats, waitFor } from "../support/nats.js";
import { startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

const words = (n: number, tag: string): string => Array.from({ length: n }, (_, i) => `${tag}w${i}`).join(" ");

describe("token streaming", function () {
  this.timeout(120_000);
  const nats = useNats();
  const workers: TestWorker[] = [];
  let pipeline: PipelineService;
  let client: InferenceClient;

  before(async () => {
    pipeline = await startPipeline(testConfig(nats.url, { pipeline: { maxInFlight: 256 } }));
    client = new InferenceClient(nats.nc, "st");
  });
  after(async () => {
    await client?.close();
    await pipeline?.stop();
    for (const w of workers) await w.stop();
  });

  const worker = async (opts: Parameters<typeof startWorker>[0]): Promise<TestWorker> => {
    const w = await startWorker(opts);
    workers.push(w);
    return w;
  };

  const setModel = async (model: string, generate = false): Promise<void> => {
    const rev = pipeline.registry.table.revision;
    await pipeline.registry.put(model, { versions: { v1: { weight: 100 } }, ...(generate ? { generate: true } : {}) });
    await waitFor("registry", () => pipeline.registry.table.revision > rev, 5_000, 2);
  };

  it("streams 200 concurrent generations: every client gets its chunks in order, then one result equal to them joined", async () => {
    const w = await worker({ ttft_ms: 10, token_interval_ms: 2, capacity: 64 });
    await setModel("gen");
    pipeline.pool.add("gen", "v1", w.server.endpoint, 64);
    const finals = new Map<string, number>();
    const sub = nats.nc.subscribe("infer.res.st.>", {
      callback: (_e, m) => {
        const id = m.subject.split(".")[3]!;
        finals.set(id, (finals.get(id) ?? 0) + 1);
      },
    });
    const run = async (i: number): Promise<void> => {
      const prompt = words(10 + (i % 15), `r${i}`);
      const events: StreamEvent[] = [];
      for await (const ev of client.stream("gen", { prompt }, { id: `gen-${i}` })) events.push(ev);
      const chunks = events.filter((e): e is { seq: number; text: string } => "text" in e);
      const last = events[events.length - 1]!;
      expect("result" in last, `gen-${i} ends with its result`).to.equal(true);
      const result = (last as { result: InferResult }).result;
      expect(result.status).to.equal("ok");
      expect(chunks.map((c) => c.seq)).to.deep.equal(chunks.map((_, k) => k));
      expect(chunks.length).to.be.greaterThan(1);
      expect(chunks.map((c) => c.text).join("")).to.equal(result.output?.text);
      expect(result.output?.text).to.equal(`gen@v1: ${prompt}`);
    };
    await Promise.all(Array.from({ length: 200 }, (_, i) => run(i)));
    await new Promise((r) => setTimeout(r, 200));
    sub.unsubscribe();
    for (let i = 0; i < 200; i++) expect(finals.get(`gen-${i}`), `results of gen-${i}`).to.equal(1);
    expect(w.engine.calls.filter((c) => c.kind === "generate").length).to.be.at.least(200);
  });

  it("cancels the worker's generation when the client stops reading, before it produces another chunk", async () => {
    // The engine stalls after two tokens: the generation can only end by the cancel.
    const w = await worker({ ttft_ms: 10, token_interval_ms: 5, capacity: 8, stall_after_tokens: 2 });
    await setModel("slowgen");
    pipeline.pool.add("slowgen", "v1", w.server.endpoint, 8);
    let seen = 0;
    for await (const ev of client.stream("slowgen", { prompt: words(50, "c") }, { id: "leave-early" })) {
      if ("text" in ev) seen++;
      if (seen === 2) break;
    }
    await waitFor("the engine to record the cancel", () => w.engine.counters.cancelledGenerations >= 1, 20_000, 5);
    const call = w.engine.calls.find((c) => c.kind === "generate" && c.ids.includes("leave-early"))!;
    expect(call.cancelled).to.equal(true);
    // Nothing was produced after the chunks the client had read.
    expect(call.tokens, "tokens the engine produced").to.equal(seen);
    // The request is answered CANCELLED, once.
    const r = await client.result("leave-early", { timeoutMs: 5_000 });
    expect(r.error?.code).to.equal("CANCELLED");
  });

  it("never runs more generations on a worker at once than its advertised capacity", async () => {
    const w = await worker({ ttft_ms: 5, token_interval_ms: 5, capacity: 8 });
    await setModel("capped", true);
    pipeline.pool.add("capped", "v1", w.server.endpoint, 8);
    const results = await Promise.all(Array.from({ length: 100 }, (_, i) => client.infer("capped", { prompt: words(8, `k${i}`) })));
    for (const [i, r] of results.entries()) expect(r.output?.text).to.equal(`capped@v1: ${words(8, `k${i}`)}`);
    expect(w.engine.counters.maxConcurrentGenerations).to.equal(8);
  });

  it("lets a client that joins late read the final result of a stream from the results stream", async () => {
    const w = await worker({ ttft_ms: 5, token_interval_ms: 1, capacity: 8 });
    await setModel("late-gen");
    pipeline.pool.add("late-gen", "v1", w.server.endpoint, 8);
    const { id } = await client.publish("late-gen", { prompt: "join me later" }, { stream: true });
    await waitFor("stored", async () => (await client.stored(id)) !== undefined, 10_000);
    const late = new InferenceClient(nats.nc, "st");
    const r = await late.result(id, { timeoutMs: 5_000 });
    expect(r.output?.text).to.equal("late-gen@v1: join me later");
    await late.close();
  });

  it("answers a request cancelled while it waits in the queue with CANCELLED, without running it", async () => {
    const w = await worker({ ttft_ms: 5, token_interval_ms: 1, capacity: 8 });
    await setModel("queued");
    // No worker yet: the request waits.
    const waiting = client.request("queued", { prompt: "never" }, { id: "cancel-queued" });
    await new Promise((r) => setTimeout(r, 300));
    client.cancel("cancel-queued");
    // The worker comes once the pipeline has heard the cancel.
    await waitFor("the pipeline to hear the cancel", () => pipeline.cancels.isCancelled("st", "cancel-queued"));
    pipeline.pool.add("queued", "v1", w.server.endpoint, 8);
    const r = await waiting;
    expect(r.error?.code).to.equal("CANCELLED");
    expect(w.engine.calls.some((c) => c.ids.includes("cancel-queued"))).to.equal(false);
  });
});
