/**
 * One worker (one device) serving several models: under a backlog its slots go to full batches
 * of whichever model is most urgent, never to small batches formed ahead of time, and no model
 * starves the others.
 */
import { expect } from "chai";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { defaultConfig } from "../../pipeline/config.js";
import { ensureStreams } from "../../pipeline/intake/jetstream.js";
import type { PipelineService } from "../../pipeline/service.js";
import type { InferResult } from "../../operators/types.js";
import { useNats, waitFor } from "../support/nats.js";
import { models, startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

const MODELS = ["alpha", "beta", "gamma"];
const N = 900;
const MAX_BATCH = 32;

describe("a worker shared by several models", function () {
  this.timeout(120_000);
  const nats = useNats();
  let worker: TestWorker;
  let pipeline: PipelineService | undefined;

  before(async () => {
    worker = await startWorker({ base_ms: 10, per_item_ms: 0.2 });
  });
  after(async () => {
    await pipeline?.stop(1_000);
    await worker?.stop();
  });

  it("runs full batches of every model from a backlog, high priority first", async () => {
    const jsm = await jetstreamManager(nats.nc);
    await ensureStreams(jsm, defaultConfig().streams);
    const js = jetstream(nats.nc);
    const enc = new TextEncoder();
    // The backlog first: models in turn, every tenth request high priority.
    for (let i = 0; i < N; i++) {
      const h = natsHeaders();
      h.set("Content-Type", "application/json");
      const priority = i % 10 === 0 ? "high" : "normal";
      await js.publish(`infer.req.${priority}.shared.${MODELS[i % MODELS.length]}`, enc.encode(JSON.stringify({ prompt: `p${i}` })), { msgID: `shared-${i}` });
    }
    const results: Array<{ r: InferResult; at: number; high: boolean }> = [];
    const sub = nats.nc.subscribe("infer.res.shared.>", {
      callback: (_e, m) => {
        const r = JSON.parse(new TextDecoder().decode(m.data)) as InferResult;
        results.push({ r, at: results.length, high: Number(r.id.split("-")[1]) % 10 === 0 });
      },
    });
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: models(MODELS, { batch: { max_size: MAX_BATCH, max_delay_ms: 5 } }),
        workers: MODELS.map((m) => ({ model: m, version: "v1", endpoint: worker.server.endpoint })),
      }),
    );
    await waitFor("every result", () => results.length >= N, 100_000);
    sub.unsubscribe();

    expect(results.every((x) => x.r.status === "ok")).to.equal(true);
    // Every model was served, and in full batches (with the free slot going to whichever key
    // was named first, batches of a few requests formed while the device was busy).
    const batches = worker.engine.calls.filter((c) => c.kind === "infer");
    const mean = batches.reduce((a, c) => a + c.ids.length, 0) / batches.length;
    expect(mean, `mean batch size over ${batches.length} batches`).to.be.greaterThan(MAX_BATCH * 0.75);
    for (const m of MODELS) expect(batches.some((c) => c.model === m), m).to.equal(true);
    // High priority went first: the high requests are answered, on average, well before the
    // others (were priority ignored, both averages would be about N / 2, within ~30 of each other).
    const avg = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / xs.length;
    const highPositions = results.filter((x) => x.high).map((x) => x.at);
    const highAt = avg(highPositions);
    const normalAt = avg(results.filter((x) => !x.high).map((x) => x.at));
    // Where the time went, should this fail: queue and total ms of each kind (median / max).
    const times = (high: boolean): string => {
      const of = (k: "queue_ms" | "total_ms"): number[] => results.filter((x) => x.high === high).map((x) => x.r.timing?.[k] ?? -1).sort((a, b) => a - b);
      const q = of("queue_ms");
      const t = of("total_ms");
      return `queue ${q[q.length >> 1]}/${q[q.length - 1]} ms, total ${t[t.length >> 1]}/${t[t.length - 1]} ms`;
    };
    expect(
      highAt,
      `mean answer position: high ${highAt.toFixed(0)} (first ${Math.min(...highPositions)}, last ${Math.max(...highPositions)}; ${times(true)}), normal ${normalAt.toFixed(0)} (${times(false)})`,
    ).to.be.lessThan(normalAt - 100);
  });
});
