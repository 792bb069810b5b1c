/**
 * Prefix- and load-aware routing end to end: a real pipeline and real gRPC workers running the
 * llm-sim engine. Requests sharing a prompt prefix land on the worker that holds it; a
 * round-robin model on the same workers spreads them; a worker that reports overload gets
 * none; a session follows its worker; a worker without load reports still serves.
 */
import { expect } from "chai";
import { InferenceClient } from "../../pipeline/client/client.js";
import type { PipelineService } from "../../pipeline/service.js";
import { BLOCK_CHARS, BLOCK_TOKENS } from "../../proto/prefix-blocks.js";
import type { Engine, EngineLoad } from "../../worker/engine.js";
import { LlmSimEngine } from "../../worker/engines/llm-sim.js";
import { WorkerServer } from "../../worker/server.js";
import { SimulatedEngine } from "../../worker/engines/simulated.js";
import { useNats, waitFor } from "../support/nats.js";
import { startPipeline, testConfig } from "../support/stack.js";

interface SimWorker {
  engine: LlmSimEngine;
  server: WorkerServer;
}

const SIM = { kv_tokens: 16_384, step_ms: 1, step_per_seq_ms: 0, prefill_ms_per_token: 0.001 };

async function simWorker(loadOverride?: EngineLoad): Promise<SimWorker> {
  const engine = new LlmSimEngine(SIM);
  // An engine that always reports overload (its KV cache full, requests waiting).
  const served: Engine = loadOverride
    ? { capacity: engine.capacity, infer: (b, s) => engine.infer(b, s), generate: (r, s) => engine.generate(r, s), close: () => engine.close(), load: () => Promise.resolve(loadOverride) }
    : engine;
  return { engine, server: await WorkerServer.start({ engine: served }) };
}

/** A system prompt of `blocks` full blocks, distinct per seed. */
function systemPrompt(seed: string, blocks: number): string {
  const s = `You are assistant ${seed}. Answer briefly and cite sources. `;
  return s.repeat(Math.ceil((blocks * BLOCK_CHARS) / s.length)).slice(0, blocks * BLOCK_CHARS);
}

/** Which worker ran request `id` (by the engines' logs). */
function ranOn(workers: readonly SimWorker[], id: string): number {
  const i = workers.findIndex((w) => w.engine.log.some((r) => r.id === id));
  if (i < 0) throw new Error(`no worker ran ${id}`);
  return i;
}

describe("prefix- and load-aware routing (llm-sim workers over gRPC)", function () {
  this.timeout(60_000);
  const nats = useNats();
  let workers: SimWorker[] = [];
  let extra: Array<{ stop(): Promise<void> }> = [];
  let pipeline: PipelineService | undefined;

  afterEach(async () => {
    await pipeline?.stop(1_000);
    pipeline = undefined;
    for (const w of workers) {
      await w.server.stop();
      await w.engine.close();
    }
    for (const x of extra) await x.stop();
    workers = [];
    extra = [];
  });

  it("sends requests sharing a prefix to the worker holding it; round-robin spreads them", async () => {
    workers = [await simWorker(), await simWorker(), await simWorker()];
    const endpoints = workers.map((w) => w.server.endpoint);
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: {
          chat: { versions: { v1: { weight: 100 } }, generate: true },
          "chat-rr": { versions: { v1: { weight: 100 } }, generate: true, routing: "round-robin" },
        },
        workers: endpoints.flatMap((endpoint) => ["chat", "chat-rr"].map((model) => ({ model, version: "v1", endpoint, capacity: 8 }))),
      }),
    );
    const client = new InferenceClient(nats.nc, "acme");
    const prompts = ["a", "b", "c"].map((seed) => systemPrompt(seed, 40));
    const TURNS = 6;
    // One conversation turn at a time per system prompt: each request finds the pool idle.
    for (let t = 0; t < TURNS; t++) {
      for (const [p, prompt] of prompts.entries()) {
        await client.infer("chat", { prompt: `${prompt} Question ${t}?`, parameters: { max_tokens: 2 } }, { id: `chat-${p}-${t}` });
      }
    }
    for (const p of prompts.keys()) {
      const first = ranOn(workers, `chat-${p}-0`);
      const all = Array.from({ length: TURNS }, (_, t) => ranOn(workers, `chat-${p}-${t}`));
      expect(all, `prefix ${p}`).to.deep.equal(Array(TURNS).fill(first));
      // Every turn after the first found the system prompt cached there.
      for (let t = 1; t < TURNS; t++) {
        const rec = workers[first]!.engine.log.find((r) => r.id === `chat-${p}-${t}`)!;
        expect(rec.cachedTokens, `prefix ${p} turn ${t}`).to.be.at.least(40 * BLOCK_TOKENS);
      }
    }
    // Conversations through the round-robin model (new system prompts, so no worker holds them
    // yet): each worker takes a third, whatever it holds.
    const rrPrompts = ["d", "e"].map((seed) => systemPrompt(seed, 40));
    for (let t = 0; t < TURNS; t++) {
      for (const [p, prompt] of rrPrompts.entries()) {
        await client.infer("chat-rr", { prompt: `${prompt} Question ${t}?`, parameters: { max_tokens: 2 } }, { id: `rr-${p}-${t}` });
      }
    }
    const rrCounts = [0, 0, 0];
    for (const p of rrPrompts.keys()) for (let t = 0; t < TURNS; t++) rrCounts[ranOn(workers, `rr-${p}-${t}`)]!++;
    expect(rrCounts).to.deep.equal([4, 4, 4]);
    const hits = (prefix: string): number => {
      const recs = workers.flatMap((w) => w.engine.log.filter((r) => r.id.startsWith(prefix)));
      return recs.reduce((a, r) => a + r.cachedTokens, 0) / recs.reduce((a, r) => a + r.promptTokens, 0);
    };
    expect(hits("chat-")).to.be.greaterThan(hits("rr-"));
  });

  it("gives a worker that reports overload none of the requests, even the ones whose prefix it would hold", async () => {
    workers = [await simWorker({ waiting: 12, running: 32, kvUsage: 1 }), await simWorker(), await simWorker()];
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: { chat: { versions: { v1: { weight: 100 } }, generate: true } },
        workers: workers.map((w) => ({ model: "chat", version: "v1", endpoint: w.server.endpoint, capacity: 8 })),
      }),
    );
    const pool = pipeline.pool;
    await waitFor("the overload report", () => pool.snapshot().some((s) => s.load !== undefined && s.load.kvUsage === 1), 10_000);
    const client = new InferenceClient(nats.nc, "acme");
    const prompt = systemPrompt("hot", 30);
    await Promise.all(Array.from({ length: 12 }, (_, i) => client.infer("chat", { prompt: `${prompt} q${i}`, parameters: { max_tokens: 2 } }, { id: `o-${i}` })));
    const counts = workers.map((w) => w.engine.log.length);
    expect(counts[0]).to.equal(0);
    expect(counts[1]! + counts[2]!).to.equal(12);
  });

  it("keeps a session on its worker, and serves through a worker without load reports", async () => {
    workers = [await simWorker(), await simWorker()];
    // An older kind of worker: its engine has no load report (GetLoad answers UNIMPLEMENTED).
    const plain = new SimulatedEngine({ base_ms: 0, per_item_ms: 0, ttft_ms: 0, token_interval_ms: 0 });
    const plainServer = await WorkerServer.start({ engine: plain });
    extra.push({ stop: async () => (await plainServer.stop(), await plain.close()) });
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: { chat: { versions: { v1: { weight: 100 } }, generate: true } },
        workers: [...workers.map((w) => w.server.endpoint), plainServer.endpoint].map((endpoint) => ({ model: "chat", version: "v1", endpoint, capacity: 8 })),
      }),
    );
    const client = new InferenceClient(nats.nc, "acme");
    // Short prompts (no full block): only the session can keep them together.
    for (let i = 0; i < 8; i++) {
      await client.infer("chat", { prompt: `hi ${i}`, parameters: { max_tokens: 2 } }, { id: `s1-${i}`, session: "user-1" });
    }
    const where = Array.from({ length: 8 }, (_, i) => workers.findIndex((w) => w.engine.log.some((r) => r.id === `s1-${i}`)));
    expect(new Set(where).size, `workers of the session: ${where.join(",")}`).to.equal(1);
    // Without a session, short prompts go by load: all three workers serve, the old one too.
    await Promise.all(Array.from({ length: 30 }, (_, i) => client.infer("chat", { prompt: `x ${i}` , parameters: { max_tokens: 2 } }, { id: `n-${i}` })));
    const plainServed = plain.calls.filter((c) => c.ids.some((id) => id.startsWith("n-"))).length;
    expect(plainServed).to.be.greaterThan(0);
    const sims = workers.map((w) => w.engine.log.filter((r) => r.id.startsWith("n-")).length);
    expect(plainServed + sims[0]! + sims[1]!).to.equal(30);
  });
});
