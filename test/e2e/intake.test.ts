/**
 * The intake at real tenant counts: a bounded set of consumers on INFER_REQ whatever the number
 * of tenants, every request answered once, and a flooding tenant's lane deleted once drained.
 */
import { expect } from "chai";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import { PRIORITIES, STREAM_REQUESTS } from "../../proto/wire.js";
import { DEFAULT_MAX_LANES } from "../../pipeline/intake/lane-options.js";
import type { PipelineService } from "../../pipeline/service.js";
import { useNats, waitFor, type NatsFixture } from "../support/nats.js";
import { models, startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

/** One shared consumer per priority: the bound when no tenant floods. */
const SHARED = PRIORITIES.length;
const BOUND = SHARED * (1 + DEFAULT_MAX_LANES);

async function publish(nats: NatsFixture, requests: ReadonlyArray<{ tenant: string; id: string }>): Promise<void> {
  const js = jetstream(nats.nc);
  const body = new TextEncoder().encode(JSON.stringify({ prompt: "p" }));
  const inflight = new Set<Promise<unknown>>();
  for (const r of requests) {
    const h = natsHeaders();
    h.set("Content-Type", "application/json");
    const p = js.publish(`infer.req.normal.${r.tenant}.echo`, body, { msgID: r.id, headers: h }).finally(() => inflight.delete(p));
    inflight.add(p);
    if (inflight.size >= 500) await Promise.race(inflight);
  }
  await Promise.all(inflight);
}

async function consumerCount(jsm: JetStreamManager): Promise<number> {
  let n = 0;
  for await (const _ of jsm.consumers.list(STREAM_REQUESTS)) n++;
  return n;
}

describe("intake: bounded consumers at many tenants", function () {
  this.timeout(300_000);
  const nats = useNats();
  let worker: TestWorker;
  let pipeline: PipelineService;
  let jsm: JetStreamManager;
  const answers = new Map<string, number>();

  before(async () => {
    worker = await startWorker();
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: models(["echo"], { batch: { max_size: 32, max_delay_ms: 2 } }),
        workers: [{ model: "echo", version: "v1", endpoint: worker.server.endpoint }],
        consumer: { maxAckPending: 4_096, ackWaitMs: 30_000 },
      }),
    );
    jsm = await jetstreamManager(nats.nc);
    nats.nc.subscribe("infer.res.>", {
      callback: (_e, m) => {
        const id = m.subject.slice(m.subject.lastIndexOf(".") + 1);
        answers.set(id, (answers.get(id) ?? 0) + 1);
      },
    });
    await nats.nc.flush();
  });
  after(async () => {
    await pipeline?.stop();
    await worker?.stop();
  });

  /** Publishes, samples the consumers until every request is answered, and returns the most seen. */
  const run = async (requests: ReadonlyArray<{ tenant: string; id: string }>): Promise<number> => {
    let most = await consumerCount(jsm);
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        most = Math.max(most, await consumerCount(jsm));
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
    await publish(nats, requests);
    await waitFor("every request answered", () => requests.every((r) => (answers.get(r.id) ?? 0) >= 1), 240_000, 100);
    sampling = false;
    await sampler;
    return most;
  };

  it("answers 5,000 tenants x 2 requests exactly once, on one consumer per priority", async () => {
    const requests = Array.from({ length: 10_000 }, (_, i) => ({ tenant: `t${i % 5_000}`, id: `many-${i}` }));
    const most = await run(requests);
    // Let a late duplicate arrive before counting.
    await new Promise((r) => setTimeout(r, 1_000));
    const twice = requests.filter((r) => answers.get(r.id)! > 1).map((r) => r.id);
    expect(twice, "answered more than once").to.deep.equal([]);
    expect(most, "consumers on INFER_REQ while queued").to.be.at.most(BOUND);
    expect(await consumerCount(jsm)).to.equal(SHARED);
    expect(pipeline.stats.settled).to.be.at.least(10_000);
  });

  it("gives a flooding tenant a lane while it floods, and deletes it once drained", async () => {
    // Another tenant served lately: a flood gets a lane only beside others.
    await run([{ tenant: "warm", id: "warm-0" }]);
    const flood = Array.from({ length: 4_000 }, (_, i) => ({ tenant: "flood", id: `flood-${i}` }));
    const others = Array.from({ length: 200 }, (_, i) => ({ tenant: `o${i % 50}`, id: `other-${i}` }));
    const most = await run([...flood, ...others]);
    expect(most, "a lane was opened").to.be.greaterThan(SHARED);
    expect(most).to.be.at.most(BOUND);
    await waitFor("the lane deleted", async () => (await consumerCount(jsm)) === SHARED, 60_000, 200);
    const twice = [...flood, ...others].filter((r) => answers.get(r.id)! > 1).map((r) => r.id);
    expect(twice, "answered more than once").to.deep.equal([]);
  });
});
