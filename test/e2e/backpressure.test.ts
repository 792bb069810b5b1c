/**
 * Backpressure is demand, not buffering: with a slow worker and a deep backlog the pipeline
 * holds no more than its bound of unacknowledged messages, and its heap does not grow with the
 * backlog (the backlog waits in JetStream).
 */
import { expect } from "chai";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { ensureStreams } from "../../pipeline/intake/jetstream.js";
import { STREAM_REQUESTS } from "../../proto/wire.js";
import { defaultConfig } from "../../pipeline/config.js";
import type { PipelineService } from "../../pipeline/service.js";
import { useNats, waitFor } from "../support/nats.js";
import { models, startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

function heapMb(): number {
  gc();
  gc();
  return process.memoryUsage().heapUsed / 1024 / 1024;
}

describe("backpressure: a 20,000-request backlog and a slow worker", function () {
  this.timeout(300_000);
  const nats = useNats();
  let worker: TestWorker;
  let pipeline: PipelineService | undefined;
  const BOUND = 64;
  const N = 20_000;

  before(async () => {
    worker = await startWorker({ base_ms: 4, per_item_ms: 0.1 });
  });
  after(async () => {
    await pipeline?.stop();
    await worker?.stop();
  });

  it("never holds more than its bound unacknowledged, keeps a flat heap, and answers everything", async () => {
    const jsm = await jetstreamManager(nats.nc);
    await ensureStreams(jsm, defaultConfig().streams);
    const js = jetstream(nats.nc);
    const body = new TextEncoder().encode(JSON.stringify({ prompt: "queued behind a burst" }));
    const inflight = new Set<Promise<unknown>>();
    for (let i = 0; i < N; i++) {
      const h = natsHeaders();
      h.set("Content-Type", "application/json");
      const p = js.publish("infer.req.normal.bp.echo", body, { msgID: `bp-${i}`, headers: h }).finally(() => inflight.delete(p));
      inflight.add(p);
      if (inflight.size >= 1_000) await Promise.race(inflight);
    }
    await Promise.all(inflight);
    expect((await jsm.streams.info(STREAM_REQUESTS)).state.messages).to.equal(N);

    let answered = 0;
    const sub = nats.nc.subscribe("infer.res.bp.>", { callback: () => void answered++ });
    const heapBefore = heapMb();
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: models(["echo"], { batch: { max_size: 32, max_delay_ms: 5 } }),
        workers: [{ model: "echo", version: "v1", endpoint: worker.server.endpoint }],
        pipeline: { maxInFlight: BOUND },
        // One pipeline process: the server-side bound equals the process's bound.
        consumer: { maxAckPending: BOUND, ackWaitMs: 30_000 },
      }),
    );
    let maxAckPending = 0;
    let maxPendingInStream = 0;
    let maxHeldByPipeline = 0;
    const heaps: number[] = [];
    const sampler = setInterval(() => {
      maxHeldByPipeline = Math.max(maxHeldByPipeline, pipeline!.stats.unsettled["normal"] ?? 0);
      // The consumers the pipeline pulls this priority from: the shared one, and the tenant's
      // lane while it has one.
      void (async () => {
        for await (const ci of jsm.consumers.list(STREAM_REQUESTS)) {
          if (!ci.name.startsWith(`${defaultConfig().consumer.durablePrefix}-normal`)) continue;
          maxAckPending = Math.max(maxAckPending, ci.num_ack_pending);
          maxPendingInStream = Math.max(maxPendingInStream, ci.num_pending);
        }
      })().catch(() => undefined);
    }, 25);
    for (const mark of [0.2, 0.5, 0.8]) {
      await waitFor(`${mark * 100}% answered`, () => answered >= N * mark, 240_000);
      heaps.push(heapMb());
    }
    await waitFor("all answered", () => answered >= N, 240_000);
    clearInterval(sampler);
    sub.unsubscribe();

    expect(maxHeldByPipeline, "unsettled held by the pipeline").to.be.at.most(BOUND);
    expect(pipeline.stats.maxUnsettled["normal"]).to.be.at.most(BOUND);
    expect(maxAckPending, "ack-pending at the server").to.be.at.most(BOUND);
    expect(maxHeldByPipeline).to.be.greaterThan(BOUND / 2); // the bound was actually reached
    // The backlog waited in the stream, not in the pipeline.
    expect(maxPendingInStream).to.be.greaterThan(N / 2);
    // The heap at 20%, 50% and 80% of the backlog is flat: it does not follow the backlog.
    const spread = Math.max(...heaps) - Math.min(...heaps);
    expect(spread, `heap samples ${heaps.map((h) => h.toFixed(1)).join(", ")} MB (before ${heapBefore.toFixed(1)})`).to.be.lessThan(8);
    expect(answered).to.equal(N);
  });
});
