/**
 * LlmSimEngine on virtual time: prefix cache, prefill by uncached tokens, continuous batching,
 * admission by KV capacity, eviction, cancellation and its load report; then the load report
 * over real gRPC (GetLoad), and UNIMPLEMENTED from a worker whose engine has none.
 */
import { expect } from "chai";
import { BLOCK_CHARS, BLOCK_TOKENS, prefixBlockHashes } from "../../proto/prefix-blocks.js";
import { WorkerClient } from "../../pipeline/workers/mod.js";
import { EngineError, type EngineRequest } from "../../worker/engine.js";
import { LlmSimEngine, type LlmSimOptions } from "../../worker/engines/llm-sim.js";
import { createEngine, EngineSpecError } from "../../worker/engines.js";
import { WorkerServer } from "../../worker/server.js";
import { SimulatedEngine } from "../../worker/engines/simulated.js";
import { VirtualClock } from "../support/virtual-clock.js";

const COSTS: LlmSimOptions = { step_ms: 2, step_per_seq_ms: 0.5, prefill_ms_per_token: 0.1 };

function request(id: string, prompt: string, maxTokens = 4): EngineRequest {
  return { id, tenant: "t", model: "llm", version: "v1", prompt, parameters: { max_tokens: maxTokens } };
}

/** A prompt of `blocks` full blocks, distinct per `seed`. */
function text(seed: string, blocks: number): string {
  return seed.repeat(Math.ceil((blocks * BLOCK_CHARS) / seed.length)).slice(0, blocks * BLOCK_CHARS);
}

/** Runs a generation to its end, collecting its text (or its error). */
async function drain(engine: LlmSimEngine, req: EngineRequest, signal = new AbortController().signal): Promise<{ text: string; error?: unknown }> {
  let out = "";
  try {
    for await (const t of engine.generate(req, signal)) out += t.text;
    return { text: out };
  } catch (error) {
    return { text: out, error };
  }
}

function record(engine: LlmSimEngine, id: string) {
  const r = engine.log.find((x) => x.id === id);
  if (!r) throw new Error(`no record of ${id}`);
  return { ...r, ttft: (r.firstTokenAtMs ?? NaN) - r.arrivedAtMs };
}

describe("llm-sim engine (virtual time)", () => {
  it("prefills only the uncached part of a prompt whose prefix it holds", async () => {
    const clock = new VirtualClock();
    const engine = new LlmSimEngine({ ...COSTS, kv_tokens: 4096 }, clock);
    const system = text("You are helpful. ", 20);
    const a = drain(engine, request("a", system + "first question?"));
    await clock.runUntilIdle();
    expect((await a).text).to.equal(" t0 t1 t2 t3");
    const b = drain(engine, request("b", system + "another question"));
    await clock.runUntilIdle();
    await b;
    const ra = record(engine, "a");
    const rb = record(engine, "b");
    expect(ra.cachedTokens).to.equal(0);
    expect(rb.cachedTokens).to.equal(20 * BLOCK_TOKENS);
    // Step cost + prefill of the uncached tokens: exact on virtual time.
    expect(ra.ttft).to.be.closeTo(2 + 0.5 + 0.1 * ra.promptTokens, 1e-9);
    expect(rb.ttft).to.be.closeTo(2 + 0.5 + 0.1 * (rb.promptTokens - 20 * BLOCK_TOKENS), 1e-9);
    expect(engine.counters.cachedTokens).to.equal(20 * BLOCK_TOKENS);
  });

  it("gives every running sequence one token per step (continuous batching)", async () => {
    const clock = new VirtualClock();
    const engine = new LlmSimEngine({ ...COSTS, prefill_ms_per_token: 0 }, clock);
    const runs = [drain(engine, request("a", "x", 8)), drain(engine, request("b", "y", 8)), drain(engine, request("c", "z", 8))];
    await clock.runUntilIdle();
    await Promise.all(runs);
    const recs = ["a", "b", "c"].map((id) => record(engine, id));
    // All three share each step: 8 steps of 2 + 0.5 x 3 ms.
    for (const r of recs) expect(r.finishedAtMs - r.arrivedAtMs).to.be.closeTo(8 * 3.5, 1e-9);
    expect(engine.counters.maxRunning).to.equal(3);
    expect(engine.counters.steps).to.equal(8);
  });

  it("admits a sequence only when its tokens fit the KV capacity, first come first served", async () => {
    const clock = new VirtualClock();
    // Each request: 4 blocks of prompt + 8 tokens of output = 72 tokens; two do not fit in 100.
    const engine = new LlmSimEngine({ ...COSTS, kv_tokens: 100 }, clock);
    const runs = [drain(engine, request("a", text("a", 4), 8)), drain(engine, request("b", text("b", 4), 8))];
    const load = await engine.load({ prefixBlocks: false });
    expect(load.waiting).to.equal(2);
    await clock.runUntilIdle();
    await Promise.all(runs);
    const a = record(engine, "a");
    const b = record(engine, "b");
    expect(b.admittedAtMs).to.be.at.least(a.finishedAtMs);
    expect(engine.counters.maxRunning).to.equal(1);
  });

  it("refuses a request that can never fit, and a bad max_tokens, with INVALID_ARGUMENT", async () => {
    const clock = new VirtualClock();
    const engine = new LlmSimEngine({ kv_tokens: 64 }, clock);
    const tooLong = await drain(engine, request("a", text("a", 5)));
    expect(tooLong.error).to.be.instanceOf(EngineError).with.property("code", "INVALID_ARGUMENT");
    expect((tooLong.error as Error).message).to.match(/exceed the KV capacity of 64 tokens/);
    const bad = await drain(engine, { ...request("b", "x"), parameters: { max_tokens: 0 } });
    expect(bad.error).to.be.instanceOf(EngineError).with.property("code", "INVALID_ARGUMENT");
    expect(clock.pending).to.equal(0);
  });

  it("evicts the least recently used prefix blocks when the KV cache is full", async () => {
    const clock = new VirtualClock();
    // Room for two prompts of 10 blocks (160 tokens) and their output, not three.
    const engine = new LlmSimEngine({ ...COSTS, kv_tokens: 360 }, clock);
    for (const [id, seed] of [["x1", "x"], ["y1", "y"], ["x2", "x"], ["z1", "z"], ["y2", "y"], ["x3", "x"]] as const) {
      const run = drain(engine, request(id, text(seed, 10), 2));
      await clock.runUntilIdle();
      await run;
    }
    const cached = (id: string): number => record(engine, id).cachedTokens;
    expect([cached("x1"), cached("y1"), cached("x2"), cached("z1")]).to.deep.equal([0, 0, 160, 0]);
    // z evicted y (least recently used), so y starts cold and evicts x.
    expect(cached("y2")).to.equal(0);
    expect(cached("x3")).to.equal(0);
  });

  it("stops a sequence when its caller aborts and frees its room", async () => {
    const clock = new VirtualClock();
    const engine = new LlmSimEngine({ ...COSTS, kv_tokens: 100 }, clock);
    const ac = new AbortController();
    const a = drain(engine, request("a", text("a", 4), 30), ac.signal);
    const b = drain(engine, request("b", text("b", 4), 2));
    await clock.runTimers(3);
    ac.abort(new EngineError("CANCELLED", "caller gave up"));
    await clock.runUntilIdle();
    expect((await a).error).to.be.instanceOf(EngineError).with.property("code", "CANCELLED");
    expect((await b).error).to.equal(undefined);
    expect(record(engine, "a").cancelled).to.equal(true);
    expect(record(engine, "a").outputTokens).to.be.below(30);
    // b could not fit beside a: it was admitted only once a had stopped.
    expect(record(engine, "b").admittedAtMs).to.be.at.least(record(engine, "a").finishedAtMs);
    const load = await engine.load({ prefixBlocks: false });
    expect([load.waiting, load.running]).to.deep.equal([0, 0]);
  });

  it("reports waiting, running, KV usage and the prefix blocks it holds", async () => {
    const clock = new VirtualClock();
    const engine = new LlmSimEngine({ ...COSTS, kv_tokens: 1024, max_running: 1 }, clock);
    const prompt = text("p", 3) + "tail";
    const runs = [drain(engine, request("a", prompt, 4)), drain(engine, request("b", "short", 4))];
    await clock.runTimers(2); // admitted a, ran its first step
    const busy = await engine.load({ prefixBlocks: true });
    expect([busy.waiting, busy.running]).to.deep.equal([1, 1]);
    // 3 blocks + own tokens (1 of "tail" + 4 of output).
    expect(busy.kvUsage).to.be.closeTo((3 * BLOCK_TOKENS + 1 + 4) / 1024, 1e-9);
    expect(busy.prefixBlocks).to.deep.equal(prefixBlockHashes(prompt));
    await clock.runUntilIdle();
    await Promise.all(runs);
    const idle = await engine.load({ prefixBlocks: false });
    expect([idle.waiting, idle.running, idle.kvUsage]).to.deep.equal([0, 0, (3 * BLOCK_TOKENS) / 1024]);
    expect(idle.prefixBlocks).to.equal(undefined);
  });

  it("answers a batch through infer, one result per request, a bad one on its own", async () => {
    const clock = new VirtualClock();
    const engine = new LlmSimEngine(COSTS, clock);
    const results = engine.infer(
      { model: "llm", version: "v1", requests: [request("a", "hello", 2), { ...request("b", "x"), parameters: { max_tokens: -1 } }] },
      new AbortController().signal,
    );
    await clock.runUntilIdle();
    const [a, b] = await results;
    expect(a).to.deep.equal({ ok: true, output: { text: " t0 t1" }, usage: { prompt_tokens: 2, completion_tokens: 2 } });
    expect(b?.ok).to.equal(false);
  });
});

describe("load reports over gRPC (GetLoad)", () => {
  it("carries the engine's load, prefix blocks only when asked", async () => {
    const engine = new LlmSimEngine({ kv_tokens: 2048 });
    const server = await WorkerServer.start({ engine });
    const client = new WorkerClient(server.endpoint);
    try {
      const prompt = text("q", 2);
      for await (const _ of client.generate({ model: "llm", version: "v1", request: { id: "a", prompt, parameters: { max_tokens: 2 } } })) {
        // drain
      }
      const withBlocks = await client.load({ prefixBlocks: true });
      expect(withBlocks).to.deep.include({ waiting: 0, running: 0, kvCapacityTokens: 2048, blockTokens: BLOCK_TOKENS });
      expect(withBlocks?.prefixBlocks).to.deep.equal(prefixBlockHashes(prompt));
      expect(withBlocks?.kvUsage).to.be.closeTo((2 * BLOCK_TOKENS) / 2048, 1e-9);
      const without = await client.load();
      expect(without?.prefixBlocks).to.deep.equal([]);
    } finally {
      client.close();
      await server.stop();
      await engine.close();
    }
  });

  it("reads as no report (undefined) from a worker whose engine has none, as from an older worker", async () => {
    const engine = new SimulatedEngine({ base_ms: 0, per_item_ms: 0 });
    const server = await WorkerServer.start({ engine });
    const client = new WorkerClient(server.endpoint);
    try {
      expect(await client.load()).to.equal(undefined);
      // The worker still serves.
      const r = await client.infer({ model: "echo", version: "v1", requests: [{ id: "x", prompt: "hi" }] });
      expect(r.results[0]?.status).to.equal("ok");
    } finally {
      client.close();
      await server.stop();
      await engine.close();
    }
  });
});

describe("createEngine llm-sim", () => {
  it("makes an llm-sim engine from its options and refuses what does not fit it", async () => {
    const engine = createEngine({ engine: "llm-sim", kv_tokens: 1024, max_running: 4 });
    expect(engine).to.be.instanceOf(LlmSimEngine);
    expect(engine.capacity).to.equal(8);
    expect((await engine.load!({ prefixBlocks: false }, new AbortController().signal)).kvCapacityTokens).to.equal(1024);
    await engine.close();
    expect(() => createEngine({ engine: "llm-sim", kv_tokens: 8 })).to.throw(EngineSpecError, /kv_tokens must be an integer >= 16/);
    expect(() => createEngine({ engine: "llm-sim", base_ms: 3 })).to.throw(EngineSpecError, /option 'base_ms' does not apply to engine 'llm-sim'/);
  });
});
