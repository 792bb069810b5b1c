/**
 * Flow control with a saturated simulated worker: priorities, fair share between tenants,
 * tenant limits, deadlines, cancellation storms and a full queue.
 *
 * The test, the pipeline and the simulated worker run in this one process, so the order in which
 * things happen here is exact: the assertions are about that order (who reached the pipeline
 * before whom, which batch left first), never about how many milliseconds something took.
 */
import { expect } from "chai";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { jetstream } from "@nats-io/jetstream";
import { InferenceClient } from "../../pipeline/client/client.js";
import { InferenceError } from "../../pipeline/client/errors.js";
import type { PipelineService } from "../../pipeline/service.js";
import type { InferResult } from "../../operators/types.js";
import type { Priority } from "../../proto/wire.js";
import { useNats, waitFor, type NatsFixture } from "../support/nats.js";
import { startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Publishes n requests fast (no waiting for results); returns their ids. */
async function publishMany(nats: NatsFixture, tenant: string, priority: Priority, n: number, tag: string): Promise<string[]> {
  const js = jetstream(nats.nc);
  const body = new TextEncoder().encode(JSON.stringify({ prompt: tag }));
  const ids: string[] = [];
  const inflight = new Set<Promise<unknown>>();
  for (let i = 0; i < n; i++) {
    const id = `${tag}-${i}`;
    ids.push(id);
    const h = natsHeaders();
    h.set("Content-Type", "application/json");
    const p = js.publish(`infer.req.${priority}.${tenant}.m`, body, { msgID: id, headers: h }).finally(() => inflight.delete(p));
    inflight.add(p);
    if (inflight.size >= 500) await Promise.race(inflight);
  }
  await Promise.all(inflight);
  return ids;
}

/** One batch handed to the worker pool. */
interface SentBatch {
  /** Position in the {@link Sequence}. */
  readonly at: number;
  readonly ids: readonly string[];
  /** When the batch closed (epoch ms): it left only with requests still within their deadline then. */
  readonly closedAtMs: number;
  /** Batches already in flight at the workers when this one was handed over. */
  readonly inFlight: number;
}

/**
 * What happened, in the order it happened in this process: requests published by the test, each
 * request reaching the pipeline's routing step (the last step before batching; everything from
 * the delivery to there runs in one go), and each batch handed to the worker pool. Positions,
 * not times: a busy machine stretches the clock, not the order.
 */
class Sequence {
  private next = 0;
  readonly published = new Map<string, number>();
  readonly received = new Map<string, number>();
  readonly batches: SentBatch[] = [];
  /** The index in `batches` of each request's first batch. */
  readonly batchOf = new Map<string, number>();

  mark(): number {
    return this.next++;
  }

  publishing(id: string): void {
    this.published.set(id, this.mark());
  }

  static record(pipeline: PipelineService): Sequence {
    const seq = new Sequence();
    const table = pipeline.registry.table;
    const resolve = table.resolve.bind(table);
    table.resolve = (model, pinned, id) => {
      if (!seq.received.has(id)) seq.received.set(id, seq.mark());
      return resolve(model, pinned, id);
    };
    const pool = pipeline.pool;
    const dispatch = pool.dispatch.bind(pool);
    pool.dispatch = (batch) => {
      const inFlight = pool.snapshot().reduce((n, w) => n + w.inflightBatches, 0);
      const index = seq.batches.length;
      seq.batches.push({ at: seq.mark(), ids: batch.jobs.map((j) => j.id), closedAtMs: batch.closedAtMs, inFlight });
      for (const j of batch.jobs) if (!seq.batchOf.has(j.id)) seq.batchOf.set(j.id, index);
      return dispatch(batch);
    };
    return seq;
  }

  /**
   * How request `id` fared against `others` (requests that were queued ahead of it): whether it
   * left in the first batch after it reached the pipeline, and how many of the others it passed
   * in the pipeline and on the way from the stream.
   */
  overtaking(id: string, others: readonly string[]): Overtaking {
    const published = this.published.get(id);
    const received = this.received.get(id);
    const own = this.batchOf.get(id);
    if (published === undefined || received === undefined || own === undefined) throw new Error(`${id} was not published, received and sent`);
    let batchesBetween = 0;
    for (let i = own - 1; i >= 0 && this.batches[i]!.at > received; i--) batchesBetween++;
    let waitingInPipeline = 0;
    let passedInPipeline = 0;
    let waitingAtPublish = 0;
    let passedOnTheWay = 0;
    for (const o of others) {
      const r = this.received.get(o) ?? Number.POSITIVE_INFINITY;
      const b = this.batchOf.get(o);
      if (r < received && (b === undefined || this.batches[b]!.at > received)) {
        waitingInPipeline++;
        if (b === undefined || b > own) passedInPipeline++;
      }
      if (r > published) {
        waitingAtPublish++;
        if (r > received) passedOnTheWay++;
      }
    }
    return { id, batchesBetween, aheadAtWorker: this.batches[own]!.inFlight, waitingInPipeline, passedInPipeline, waitingAtPublish, passedOnTheWay };
  }
}

interface Overtaking {
  readonly id: string;
  /** Batches handed to the workers after the pipeline received the request and before its own: 0 when it rode the first one. */
  readonly batchesBetween: number;
  /** Batches in flight at the workers when its batch was handed over: its batch runs after them. */
  readonly aheadAtWorker: number;
  /** Others that had reached the pipeline before it and had not left for a worker yet. */
  readonly waitingInPipeline: number;
  /** Of those, the ones that went to a worker after it (the rest rode its batch). */
  readonly passedInPipeline: number;
  /** Others that had not reached the pipeline yet when it was published. */
  readonly waitingAtPublish: number;
  /** Of those, the ones that reached the pipeline after it did. */
  readonly passedOnTheWay: number;
}

/**
 * The order a favoured request (high priority, or a tenant's trickle beside another's burst) must
 * keep against the requests queued ahead of it, on a device that runs one batch at a time with
 * `batchesPerWorker` handed to it at once:
 * - once in the pipeline, it rides the first batch that leaves, behind at most the
 *   `batchesPerWorker - 1` batches already handed to the worker: it waits for the batch in service
 *   and the ones queued at the device, never for the backlog in the pipeline (which it passes,
 *   all but the few that share its batch);
 * - it reaches the pipeline ahead of most of the requests still in the stream when it was
 *   published (a first-in-first-out queue would give it none of them): checked while at least
 *   1,000 were waiting, so that a slow round trip to the broker costs a few batches of them, not half;
 * - the backlog was really there: most favoured requests found more than a batch of others
 *   waiting in the pipeline (the first ones may arrive before the backlog does).
 */
function expectOvertakes(
  seq: Sequence,
  favoured: readonly string[],
  others: readonly string[],
  opts: { batchesPerWorker: number; maxBatch: number; transitionBatches?: number },
): Overtaking[] {
  const all = favoured.map((id) => seq.overtaking(id, others));
  const show = JSON.stringify(all);
  // A request that arrives while its tenant's lane is being opened or closed is held for that
  // stage (docs/protocol.md, "Lane stages"): it may wait up to `transitionBatches` batches, and
  // rides the first batch after that; at least half ride the first batch after their arrival.
  const allowance = opts.transitionBatches ?? 0;
  const rodeFirst = all.filter((o) => o.batchesBetween === 0).length;
  expect(rodeFirst, `favoured requests that rode the first batch after their arrival; all: ${show}`).to.be.at.least(allowance === 0 ? all.length : all.length / 2);
  for (const o of all) {
    expect(o.batchesBetween, `${o.id}: batches that left between its arrival in the pipeline and its own; all: ${show}`).to.be.at.most(allowance);
    expect(o.aheadAtWorker, `${o.id}: batches ahead of it at the worker; all: ${show}`).to.be.at.most(opts.batchesPerWorker - 1);
    expect(o.waitingInPipeline - o.passedInPipeline, `${o.id}: requests queued ahead of it in the pipeline that did not go after it; all: ${show}`).to.be.at.most(
      opts.maxBatch * (1 + o.batchesBetween) - 1,
    );
    if (o.waitingAtPublish >= 1_000) {
      expect(o.passedOnTheWay, `${o.id}: of ${o.waitingAtPublish} still in the stream at its publish, reached the pipeline after it; all: ${show}`).to.be.at.least(
        o.waitingAtPublish / 2,
      );
    }
  }
  const metBacklog = all.filter((o) => o.waitingInPipeline > opts.maxBatch).length;
  expect(metBacklog, `favoured requests that found more than a batch waiting in the pipeline; all: ${show}`).to.be.at.least(all.length / 2);
  return all;
}

/** Sends one request every `everyMs`, `count` times, noting each publish in `seq`; resolves with the ids. */
async function trickleOn(client: InferenceClient, priority: Priority, count: number, everyMs: number, tag: string, seq?: Sequence): Promise<string[]> {
  const runs: Array<Promise<InferResult>> = [];
  const ids: string[] = [];
  for (let i = 0; i < count; i++) {
    const id = `${tag}-${i}`;
    ids.push(id);
    seq?.publishing(id);
    runs.push(client.infer("m", { prompt: id }, { id, priority, timeoutMs: 60_000 }));
    await sleep(everyMs);
  }
  for (const r of await Promise.all(runs)) expect(r.status).to.equal("ok");
  return ids;
}

/** Counts the results published for a tenant, per request id. */
function countResults(nats: NatsFixture, tenant: string): { counts: Map<string, InferResult[]>; stop: () => void } {
  const counts = new Map<string, InferResult[]>();
  const sub = nats.nc.subscribe(`infer.res.${tenant}.>`, {
    callback: (_e, m) => {
      const r = JSON.parse(new TextDecoder().decode(m.data)) as InferResult;
      counts.set(r.id, [...(counts.get(r.id) ?? []), r]);
    },
  });
  return { counts, stop: () => sub.unsubscribe() };
}

describe("flow control under saturation", function () {
  this.timeout(180_000);
  const nats = useNats();
  let worker: TestWorker;
  let pipeline: PipelineService;
  let seq: Sequence;

  before(async () => {
    // One batch at a time, 10 ms + 0.5 ms per item, batches of up to 16: about 900 requests/s.
    worker = await startWorker({ base_ms: 10, per_item_ms: 0.5 });
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: { m: { versions: { v1: { weight: 100 } }, batch: { max_size: 16, max_delay_ms: 5 } } },
        workers: [{ model: "m", version: "v1", endpoint: worker.server.endpoint }],
        tenants: { limited: { rate: 5, burst: 5, policy: "reject" } },
        pipeline: { maxInFlight: 256 },
        consumer: { maxAckPending: 4_096, ackWaitMs: 30_000 },
      }),
    );
    seq = Sequence.record(pipeline);
  });
  after(async () => {
    await pipeline?.stop();
    await worker?.stop();
  });

  const flood = (tenant: string, priority: Priority, n: number, tag: string): Promise<string[]> => publishMany(nats, tenant, priority, n, tag);
  const trickle = trickleOn;

  it("serves a tenant's steady requests ahead of another tenant's 10,000-request burst", async () => {
    const b = new InferenceClient(nats.nc, "steady");
    // The steady tenant's lane exists and has served before the burst.
    await trickle(b, "normal", 10, 30, "warm");
    const burstIds = await flood("bursty", "normal", 10_000, "burst");
    const steadyIds = await trickle(b, "normal", 30, 100, "steady", seq);
    // Each steady request rode the first batch after it reached the pipeline, passed burst
    // requests that were waiting there, and reached the pipeline ahead of the burst queued in
    // the stream before it (its own lane): it did not wait behind the burst (about 11 s of work).
    expectOvertakes(seq, steadyIds, burstIds, { batchesPerWorker: pipeline.config.pipeline.batchesPerWorker, maxBatch: 16 });
    await b.close();
  });

  it("answers a tenant over its rate with RESOURCE_EXHAUSTED at once, naming the limit", async () => {
    const c = new InferenceClient(nats.nc, "limited");
    const t0 = Date.now();
    const results = await Promise.all(Array.from({ length: 20 }, (_, i) => c.request("m", { prompt: `l${i}` })));
    const elapsedMs = Date.now() - t0;
    const ok = results.filter((r) => r.status === "ok");
    const refused = results.filter((r) => r.error?.code === "RESOURCE_EXHAUSTED");
    expect(ok.length + refused.length).to.equal(20);
    // The burst of 5, plus what the rate (5/s) refilled while these requests were on their way.
    expect(ok.length).to.be.at.least(5);
    expect(ok.length, `admitted in ${elapsedMs} ms`).to.be.at.most(5 + Math.ceil((5 * elapsedMs) / 1_000));
    expect(refused[0]!.error!.message).to.match(/rate/);
    await c.close();
  });

  it("never sends a request that expired in the queue or a batch window to the worker", async () => {
    const c = new InferenceClient(nats.nc, "expiring");
    await flood("expiring-load", "normal", 3_000, "load");
    const ids = Array.from({ length: 100 }, (_, i) => `exp-${i}`);
    const deadlines = new Map<string, number>();
    const results = await Promise.all(
      ids.map((id) => {
        const deadlineMs = Date.now() + 40;
        deadlines.set(id, deadlineMs);
        return c.request("m", { prompt: id }, { id, deadlineMs });
      }),
    );
    // Behind 3,000 others on a device that takes 18 ms a batch, most expire before their turn.
    const expired = results.filter((r) => r.error?.code === "DEADLINE_EXCEEDED");
    expect(expired.length).to.be.greaterThan(50);
    for (const r of results) expect(r.status === "ok" || r.error?.code === "DEADLINE_EXCEEDED", JSON.stringify(r)).to.equal(true);
    // Whatever reached the worker left in a batch that closed before the request's deadline; the
    // rest never reached it.
    const sent = new Set(worker.engine.calls.flatMap((call) => call.ids));
    for (const id of ids) {
      const b = seq.batchOf.get(id);
      if (b === undefined) {
        expect(sent.has(id), `${id} reached the worker without being sent`).to.equal(false);
        continue;
      }
      expect(seq.batches[b]!.closedAtMs, `${id} was sent after its deadline`).to.be.below(deadlines.get(id)!);
    }
    await c.close();
  });

  it("answers 1,000 cancellations during load with exactly one CANCELLED each, and keeps serving", async () => {
    const c = new InferenceClient(nats.nc, "cancels");
    const { counts, stop } = countResults(nats, "cancels");
    // Load on the shared worker, and a model whose worker comes later, so the requests are
    // still queued (waiting for a worker) when their cancels arrive.
    await flood("cancel-load", "normal", 2_000, "cl");
    const rev = pipeline.registry.table.revision;
    await pipeline.registry.put("later", { versions: { v1: { weight: 100 } }, timeout_ms: 60_000 });
    await waitFor("registry", () => pipeline.registry.table.revision > rev, 5_000, 2);
    const ids = Array.from({ length: 2_000 }, (_, i) => `cx-${i}`);
    await Promise.all(ids.map((id) => c.publish("later", { prompt: id }, { id })));
    const cancelled = ids.filter((_, i) => i % 2 === 0);
    for (const id of cancelled) c.cancel(id);
    // The worker comes once the pipeline has heard every cancel.
    await waitFor("the pipeline to hear every cancel", () => cancelled.every((id) => pipeline.cancels.isCancelled("cancels", id)), 30_000);
    pipeline.pool.add("later", "v1", worker.server.endpoint);
    await waitFor(`every request answered (${counts.size})`, () => ids.every((id) => counts.has(id)), 120_000, 100);
    // Time for a second answer to show up, if there were one.
    await sleep(500);
    stop();
    for (const id of ids) expect(counts.get(id)!.length, `results for ${id}`).to.equal(1);
    for (const id of cancelled) expect(counts.get(id)![0]!.error?.code, id).to.equal("CANCELLED");
    for (const id of ids.filter((_, i) => i % 2 === 1)) expect(counts.get(id)![0]!.status, JSON.stringify(counts.get(id)![0])).to.equal("ok");
    const sentToWorker = new Set(worker.engine.calls.flatMap((call) => call.ids));
    for (const id of cancelled) expect(sentToWorker.has(id), `${id} reached the worker`).to.equal(false);
    const after = await c.infer("m", { prompt: "still serving" });
    expect(after.output?.text).to.equal("m@v1: still serving");
    await c.close();
  });
});

describe("priorities under saturation", function () {
  this.timeout(120_000);
  const nats = useNats();
  let worker: TestWorker;
  let pipeline: PipelineService;
  let seq: Sequence;

  before(async () => {
    worker = await startWorker({ base_ms: 10, per_item_ms: 0.5 });
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: { m: { versions: { v1: { weight: 100 } }, batch: { max_size: 16, max_delay_ms: 5 } } },
        workers: [{ model: "m", version: "v1", endpoint: worker.server.endpoint }],
        consumer: { maxAckPending: 4_096, ackWaitMs: 30_000 },
      }),
    );
    seq = Sequence.record(pipeline);
  });
  after(async () => {
    await pipeline?.stop();
    await worker?.stop();
  });

  const flood = (tenant: string, priority: Priority, n: number, tag: string): Promise<string[]> => publishMany(nats, tenant, priority, n, tag);
  const trickle = trickleOn;

  it("serves each high-priority request ahead of a mixed backlog of 4,000 queued before it, and still completes low and normal", async () => {
    const c = new InferenceClient(nats.nc, "prio");
    // The high lane exists and has served before the backlog.
    await trickle(c, "high", 10, 30, "warm");
    const low = countResults(nats, "prio-low");
    const normal = countResults(nats, "prio-normal");
    const lowIds = await flood("prio-low", "low", 2_000, "low");
    const normalIds = await flood("prio-normal", "normal", 2_000, "normal");
    const highIds = await trickle(c, "high", 20, 50, "high", seq);
    // Each high request waited for the batch in service and the one queued at the device, not
    // for the 4,000 (about 4.5 s of work on this device).
    expectOvertakes(seq, highIds, [...lowIds, ...normalIds], { batchesPerWorker: pipeline.config.pipeline.batchesPerWorker, maxBatch: 16 });
    // Low and normal are not starved: each is answered, once.
    await waitFor(`all low and normal answered (${low.counts.size}, ${normal.counts.size})`, () => low.counts.size >= lowIds.length && normal.counts.size >= normalIds.length, 60_000, 100);
    await sleep(200);
    low.stop();
    normal.stop();
    for (const [ids, { counts }] of [[lowIds, low], [normalIds, normal]] as const) {
      for (const id of ids) {
        expect(counts.get(id)?.length, `results for ${id}`).to.equal(1);
        expect(counts.get(id)![0]!.status, id).to.equal("ok");
      }
    }
    await c.close();
  });
});

describe("a full request queue", function () {
  this.timeout(60_000);
  const nats = useNats();
  let worker: TestWorker;
  let pipeline: PipelineService;

  before(async () => {
    worker = await startWorker({ base_ms: 1 });
    pipeline = await startPipeline(
      testConfig(nats.url, {
        streams: { requestsMaxMsgs: 50 },
        models: { m: { versions: { v1: { weight: 100 } } } },
        workers: [{ model: "m", version: "v1", endpoint: worker.server.endpoint }],
      }),
    );
  });
  after(async () => {
    await pipeline?.stop();
    await worker?.stop();
  });

  it("rejects publishes with RESOURCE_EXHAUSTED, and loses nothing it accepted", async () => {
    const c = new InferenceClient(nats.nc, "full");
    const accepted = await Promise.all(Array.from({ length: 50 }, (_, i) => c.publish("m", { prompt: `f${i}` }, { id: `full-${i}` })));
    const err = await c.publish("m", { prompt: "one too many" }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).to.be.instanceOf(InferenceError);
    expect((err as InferenceError).code).to.equal("RESOURCE_EXHAUSTED");
    expect((err as InferenceError).message).to.match(/queue is full/);
    for (const { id } of accepted) {
      const r = await c.result(id, { timeoutMs: 20_000 });
      expect(r.status).to.equal("ok");
    }
    await c.close();
  });
});
