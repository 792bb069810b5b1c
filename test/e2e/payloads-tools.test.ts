/**
 * The tools with large bodies: replay reads a request's body and its recorded result from the
 * object store and compares them whole; a large request dead-lettered keeps its reference (not
 * its body) and `dlq requeue` puts it back, answered with the whole body.
 */
import { expect } from "chai";
import { nuid } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { InferenceClient } from "../../pipeline/client/client.js";
import { listDeadLetters } from "../../pipeline/tools/dlq.js";
import { requeueDeadLetters } from "../../pipeline/tools/dlq-requeue.js";
import { STREAM_DLQ } from "../../proto/wire.js";
import { BODY_REF_HEADER } from "../../pipeline/payloads/names.js";
import { replay } from "../../pipeline/tools/replay/mod.js";
import type { SluiceConfig } from "../../pipeline/config.js";
import type { PipelineService } from "../../pipeline/service.js";
import { EngineError, type Engine, type EngineBatch, type EngineGeneration, type EngineItemResult, type EngineRequest } from "../../worker/engine.js";
import { WorkerServer } from "../../worker/server.js";
import { SimulatedEngine } from "../../worker/engines/simulated.js";
import { useNats, waitFor } from "../support/nats.js";
import { models, startPipeline, testConfig } from "../support/stack.js";

const DUPLICATE_WINDOW_MS = 2_500;

/** The simulated engine; model `flaky` fails with UNAVAILABLE while `failing` is set. */
class FlakyEngine implements Engine {
  failing = true;
  private readonly inner = new SimulatedEngine({ base_ms: 0, per_item_ms: 0 });
  get capacity(): number {
    return this.inner.capacity;
  }
  async infer(batch: EngineBatch, signal: AbortSignal): Promise<EngineItemResult[]> {
    if (this.failing && batch.model === "flaky") throw new EngineError("UNAVAILABLE", "device lost");
    return this.inner.infer({ ...batch, model: "echo" }, signal);
  }
  generate(request: EngineRequest, signal: AbortSignal): EngineGeneration {
    return this.inner.generate(request, signal);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

describe("replay and dlq requeue of large requests", function () {
  this.timeout(180_000);
  const nats = useNats();
  let engine: FlakyEngine;
  let worker: WorkerServer;
  let pipeline: PipelineService;
  let client: InferenceClient;
  let config: SluiceConfig;
  const prompt = "x".repeat(3 * 1024 * 1024 - 7) + " tail!!";

  before(async () => {
    engine = new FlakyEngine();
    worker = await WorkerServer.start({ engine });
    config = testConfig(nats.url, {
      models: models(["echo", "flaky"], { timeout_ms: 1_000 }),
      workers: [
        { model: "echo", version: "v1", endpoint: worker.endpoint },
        { model: "flaky", version: "v1", endpoint: worker.endpoint },
      ],
      consumer: { maxDeliver: 2 },
      streams: { duplicateWindowMs: DUPLICATE_WINDOW_MS },
      pipeline: { priorities: ["normal"], healthIntervalMs: 200 },
      payloads: { sweepIntervalMs: 0 },
    });
    pipeline = await startPipeline(config);
    client = new InferenceClient(nats.nc, "tools");
  });
  after(async () => {
    await client?.close();
    await pipeline?.stop();
    await worker?.stop();
    await engine?.close();
  });

  it("replays a 3 MB request: body and recorded result read from the object store, compared whole (equal)", async () => {
    const id = `rp-${nuid.next()}`;
    const r = await client.infer("echo", { prompt }, { id, timeoutMs: 60_000 });
    expect(r.output?.text === prompt).to.equal(true);
    const report = await replay(nats.nc, { selection: { ids: [id] }, config, table: pipeline.registry.table });
    expect(report.selected).to.equal(1);
    expect(report.counts).to.deep.equal({ equal: 1, different: 0, missing: 0, error: 0 });
  });

  it("dead-letters a 3 MB request with its reference (not its body), and requeue gets it answered whole", async () => {
    const id = `dl-${nuid.next()}`;
    const failed = await client.request("flaky", { prompt }, { id, timeoutMs: 30_000 });
    expect(failed.error?.code).to.equal("UNAVAILABLE");
    let letters = await listDeadLetters(nats.nc, { model: "flaky" });
    await waitFor("the dead letter", async () => (letters = await listDeadLetters(nats.nc, { model: "flaky" })).some((e) => e.requestId === id), 10_000);
    const letter = letters.find((e) => e.requestId === id)!;
    const jsm = await jetstreamManager(nats.nc);
    const stored = await jsm.streams.getMessage(STREAM_DLQ, { seq: letter.seq });
    expect(stored!.header.get(BODY_REF_HEADER)).to.equal(`req/${id}`);
    expect(stored!.data.length).to.equal(0);

    engine.failing = false;
    await new Promise((r) => setTimeout(r, DUPLICATE_WINDOW_MS + 500));
    const answer = client.result(id, { timeoutMs: 60_000, checkStored: false });
    const report = await requeueDeadLetters(nats.nc, { ids: [id] });
    expect(report.requeued, JSON.stringify(report.items)).to.equal(1);
    const r = await answer;
    expect(r.status).to.equal("ok");
    expect(r.output?.text === prompt, "the requeued request ran on its whole body").to.equal(true);
  });
});
