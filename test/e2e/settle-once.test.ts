/**
 * Every request is settled so that the server honours it, on nats-server 2.9 (Debian 12's) as on
 * newer ones: an error result is never followed by a second delivery and a second worker call,
 * and a redelivered request whose result is already stored never reaches a worker.
 */
import { expect } from "chai";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { InferenceClient } from "../../pipeline/client/client.js";
import { honoursTermReason } from "../../pipeline/intake/jetstream.js";
import { STREAM_REQUESTS } from "../../proto/wire.js";
import type { PipelineService } from "../../pipeline/service.js";
import type { InferResult } from "../../operators/types.js";
import { useNats, waitFor, type NatsFixture } from "../support/nats.js";
import { models, startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

const enc = new TextEncoder();

/** Unacknowledged and redelivered messages over every consumer of the request stream. */
async function requestConsumers(nats: NatsFixture): Promise<{ ackPending: number; redelivered: number }> {
  const jsm = await jetstreamManager(nats.nc);
  let ackPending = 0;
  let redelivered = 0;
  for await (const ci of jsm.consumers.list(STREAM_REQUESTS)) {
    ackPending += ci.num_ack_pending;
    redelivered += ci.num_redelivered;
  }
  return { ackPending, redelivered };
}

/** Long enough that a settlement the server ignored would still be pending when the test looks. */
const ACK_WAIT_MS = 120_000;

describe("settling on the server users install", function () {
  this.timeout(120_000);
  const nats = useNats();
  let worker: TestWorker;
  let pipeline: PipelineService;
  let client: InferenceClient;

  before(async () => {
    worker = await startWorker();
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: models(["m"]),
        workers: [{ model: "m", version: "v1", endpoint: worker.server.endpoint }],
        consumer: { ackWaitMs: ACK_WAIT_MS },
        tenants: { limited: { rate: 1, burst: 1, policy: "reject" } },
      }),
    );
    client = new InferenceClient(nats.nc, "errs");
  });

  after(async () => {
    await client?.close();
    await pipeline?.stop();
    await worker?.stop();
  });

  it("settles 1,000 requests answered with errors: each reaches the worker once and none stays unacknowledged", async () => {
    const N = 1_000;
    const ids = Array.from({ length: N }, (_, i) => `err-${i}`);
    const results = await Promise.all(ids.map((id) => client.request("m", { prompt: id, parameters: { simulate_error: "INVALID_ARGUMENT" } }, { id })));
    expect(results.every((r) => r.status === "error" && r.error?.code === "INVALID_ARGUMENT")).to.equal(true);
    // Every one acknowledged by the server: nothing left for a second delivery (the ack wait is
    // two minutes, so a settlement the server ignored would still be pending here).
    await waitFor("no unacknowledged request", async () => (await requestConsumers(nats)).ackPending === 0, 30_000, 100);
    const calls = new Map<string, number>();
    for (const c of worker.engine.calls) for (const id of c.ids) calls.set(id, (calls.get(id) ?? 0) + 1);
    expect(ids.filter((id) => calls.get(id) !== 1), "requests not run exactly once").to.deep.equal([]);
    expect((await requestConsumers(nats)).redelivered).to.equal(0);
  });

  it("settles the error paths that never reach a worker: unknown model, tenant limit, dead letter", async () => {
    const unknown = await client.request("nosuchmodel", { prompt: "x" }, { id: "unknown-1" });
    expect(unknown.error?.code).to.equal("NOT_FOUND");
    const limited = new InferenceClient(nats.nc, "limited");
    const over = await Promise.all([1, 2, 3, 4].map((i) => limited.request("m", { prompt: "x" }, { id: `limited-${i}` })));
    expect(over.some((r) => r.error?.code === "RESOURCE_EXHAUSTED")).to.equal(true);
    await limited.close();
    // No request id: the request cannot be answered and goes to the dead-letter stream.
    const js = jetstream(nats.nc);
    const h = natsHeaders();
    h.set("Content-Type", "application/json");
    await js.publish("infer.req.normal.errs.m", enc.encode(`{"prompt":"no id"}`), { headers: h });
    await waitFor("dead letter", async () => {
      const jsm = await jetstreamManager(nats.nc);
      return (await jsm.streams.info("INFER_DLQ")).state.messages > 0;
    });
    await waitFor("no unacknowledged request", async () => (await requestConsumers(nats)).ackPending === 0, 30_000, 100);
    expect((await requestConsumers(nats)).redelivered).to.equal(0);
  });
});

describe("a redelivered request whose result is stored", function () {
  this.timeout(120_000);
  const nats = useNats();

  it("is acknowledged from the store and never reaches a worker again", async () => {
    const config = (w: TestWorker) =>
      testConfig(nats.url, {
        models: models(["m"]),
        workers: [{ model: "m", version: "v1", endpoint: w.server.endpoint }],
        // Short: the request held by the stopped pipeline comes back soon.
        consumer: { ackWaitMs: 1_500 },
      });
    // The first pipeline's worker takes the request and never finishes it (a device that hangs).
    const hung = await startWorker({ base_ms: 600_000 });
    const first = await startPipeline(config(hung));
    const client = new InferenceClient(nats.nc, "again");
    const id = "again-1";
    await client.publish("m", { prompt: "once" }, { id });
    await waitFor("the first worker has the request", () => hung.engine.inFlightBatches > 0);
    // Meanwhile its result is stored (as when a pipeline published it, then died before its ack).
    const stored: InferResult = { id, status: "ok", model: "m", version: "v1", output: { text: "answered before" } };
    await jetstream(nats.nc).publish(`infer.res.again.${id}`, enc.encode(JSON.stringify(stored)), { msgID: id });
    // The first pipeline goes away without settling; the request is delivered again elsewhere.
    await first.stop(0);
    await hung.stop();
    const fresh = await startWorker();
    const second = await startPipeline(config(fresh));
    try {
      await waitFor("the redelivery acknowledged", async () => (second.stats.byAction["duplicate"] ?? 0) === 1, 30_000, 50);
      expect(fresh.engine.calls.flatMap((c) => c.ids)).to.not.include(id);
      expect(second.stats.byAction["ack"] ?? 0).to.equal(0);
      expect(await client.result(id)).to.deep.equal(stored);
      await waitFor("no unacknowledged request", async () => (await requestConsumers(nats)).ackPending === 0, 30_000, 100);
    } finally {
      await client.close();
      await second.stop();
      await fresh.stop();
    }
  });
});

describe("honoursTermReason", () => {
  it("is true from nats-server 2.10.4 on, false before and for what it cannot read", () => {
    expect(["2.9.10", "2.10.3", "v2.10.3", "", "x"].map(honoursTermReason)).to.deep.equal([false, false, false, false, false]);
    expect(["2.10.4", "2.10.22", "2.11.0", "v2.12.1", "3.0.0"].map(honoursTermReason)).to.deep.equal([true, true, true, true, true]);
  });
});
