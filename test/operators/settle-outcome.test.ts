import { expect } from "chai";
import { from, lastValueFrom, Subject, toArray } from "rxjs";
import { TestScheduler } from "rxjs/testing";
import { retryDelayMs } from "../../operators/outcome.js";
import { ResultNotStoredError, ResultTooLargeError, settleOutcomes, type DeadLetter, type ResultSink, type Settled, type SettleOutcomesOptions } from "../../operators/settle-outcome.js";
import { errorResult, type Delivery, type ErrorInfo, type InferJob, type InferResult, type Outcome } from "../../operators/types.js";

// ---- recording doubles -----------------------------------------------------------------------

/** One log for the sink and every delivery, so a test can assert what happened in which order. */
type Log = string[];

interface RecordingDelivery extends Delivery {
  /** What was done to it: "ack", "nak:<delay>", "term:<reason>". */
  readonly calls: string[];
}

function recordingDelivery(log: Log, name: string, deliveryCount = 1, opts: { throwOnAck?: boolean } = {}): RecordingDelivery {
  const calls: string[] = [];
  let settled = false;
  const settle = (what: string): void => {
    calls.push(what);
    log.push(`${what.split(":")[0]}:${name}`);
    settled = true;
  };
  return {
    calls,
    subject: `infer.req.normal.acme.m`,
    data: new TextEncoder().encode(`{"prompt":"${name}"}`),
    header: () => undefined,
    headerEntries: () => [["Nats-Msg-Id", name]],
    seq: 1,
    deliveryCount,
    storedAtMs: 0,
    pulledAtMs: 0,
    get settled() {
      return settled;
    },
    ack: () => {
      if (opts.throwOnAck) throw new Error("connection closed");
      settle("ack");
    },
    nak: (delayMs?: number) => settle(`nak:${delayMs}`),
    term: (reason?: string) => settle(`term:${reason}`),
    working: () => undefined,
  };
}

interface Deferred {
  resolve(): void;
  reject(err: unknown): void;
}

/**
 * A ResultSink that records every call, can fail the next N publishes, and can hold publishes
 * until the test releases them (to prove what waits for what).
 */
class RecordingSink implements ResultSink {
  readonly results: Array<{ job: InferJob; result: InferResult }> = [];
  readonly deadLetters: DeadLetter[] = [];
  readonly hasResultAsked: string[] = [];
  /** Request ids whose result is already stored. */
  readonly stored = new Set<string>();
  /** Publishes being held (hold = true) in the order they began. */
  readonly held: Deferred[] = [];
  hold = false;
  inFlight = 0;
  maxInFlight = 0;
  private failures = 0;
  hasResultFails = false;
  /** Results each client received live, by request id. */
  readonly live = new Map<string, number>();
  /** Results stored without a live delivery (keepResult), by request id. */
  readonly kept: string[] = [];
  /** The next N result publishes reach the client but the store refuses them. */
  refuseNext = 0;
  /** The next N result publishes are stored and reach the client, but their acknowledgement is lost. */
  loseAckNext = 0;
  /** The next N keepResult calls fail. */
  keepFailNext = 0;

  constructor(private readonly log: Log) {}

  failNext(n: number): void {
    this.failures = n;
  }

  private async publish(what: string, store: () => void): Promise<void> {
    this.log.push(`${what}:start`);
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      if (this.hold) {
        await new Promise<void>((resolve, reject) => this.held.push({ resolve, reject }));
      }
      if (this.failures > 0) {
        this.failures--;
        throw new Error(`publish of ${what} failed`);
      }
      store();
      this.log.push(`${what}:stored`);
    } finally {
      this.inFlight--;
    }
  }

  publishResult(job: InferJob, result: InferResult): Promise<void> {
    if (this.refuseNext > 0 || this.loseAckNext > 0) {
      this.live.set(job.id, (this.live.get(job.id) ?? 0) + 1);
      if (this.refuseNext > 0) {
        this.refuseNext--;
        this.log.push(`result:${job.id}:refused`);
        return Promise.reject(new ResultNotStoredError("stream refused it"));
      }
      this.loseAckNext--;
      this.results.push({ job, result });
      this.stored.add(job.id);
      this.log.push(`result:${job.id}:ack-lost`);
      return Promise.reject(new Error("timeout waiting for the acknowledgement"));
    }
    return this.publish(`result:${job.id}`, () => {
      this.live.set(job.id, (this.live.get(job.id) ?? 0) + 1);
      this.results.push({ job, result });
      this.stored.add(job.id);
    });
  }
  async keepResult(job: InferJob): Promise<void> {
    if (this.keepFailNext > 0) {
      this.keepFailNext--;
      this.log.push(`keep:${job.id}:failed`);
      throw new ResultNotStoredError("stream still refuses it");
    }
    this.kept.push(job.id);
    this.stored.add(job.id);
    this.log.push(`keep:${job.id}:stored`);
  }
  async hasResult(job: InferJob): Promise<boolean> {
    this.hasResultAsked.push(job.id);
    if (this.hasResultFails) throw new Error("stream lookup failed");
    return this.stored.has(job.id);
  }
  publishDeadLetter(letter: DeadLetter): Promise<void> {
    return this.publish(`dlq:${letter.id ?? "?"}`, () => this.deadLetters.push(letter));
  }

  /** Releases the oldest held publish. */
  releaseOne(): void {
    const d = this.held.shift();
    if (!d) throw new Error("no publish is being held");
    d.resolve();
  }
}

function job(log: Log, id: string, deliveryCount = 1, opts: { throwOnAck?: boolean } = {}): InferJob & { delivery: RecordingDelivery } {
  return { id, tenant: "acme", model: "m", version: "v1", priority: "normal", prompt: id, stream: false, delivery: recordingDelivery(log, id, deliveryCount, opts) };
}

const ok = (j: InferJob): InferResult => ({ id: j.id, status: "ok", model: j.model, version: j.version, output: { text: `echo ${j.id}` } });
const resultOutcome = (j: InferJob, result: InferResult, deadLetter?: boolean): Outcome =>
  deadLetter === undefined ? { kind: "result", job: j, result } : { kind: "result", job: j, result, deadLetter };
const retryOutcome = (j: InferJob, delayMs: number, lastResort: InferResult): Outcome => ({ kind: "retry", job: j, delayMs, lastResort });
const deadOutcome = (d: Delivery, error: ErrorInfo, who: { tenant?: string; model?: string; id?: string } = {}): Outcome => ({ kind: "dead", delivery: d, error, ...who });

const BASE = 100;
const MAX = 5_000;
const options = (o: Partial<SettleOutcomesOptions> = {}): SettleOutcomesOptions => ({ maxDeliver: 5, retryBaseMs: BASE, retryMaxMs: MAX, retryJitter: 0, ...o });

function settleAll(sink: ResultSink, outcomes: Outcome[], o: Partial<SettleOutcomesOptions> = {}): Promise<Settled[]> {
  return lastValueFrom(from(outcomes).pipe(settleOutcomes(sink, options(o)), toArray()));
}

/** Lets every pending promise callback and timer of this turn run. */
const turn = (): Promise<void> => new Promise((r) => setImmediate(r));
async function turns(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await turn();
}

describe("settleOutcomes", () => {
  let log: Log;
  let sink: RecordingSink;
  beforeEach(() => {
    log = [];
    sink = new RecordingSink(log);
  });

  describe("result", () => {
    it("publishes an ok result, then acks", async () => {
      const a = job(log, "a");
      const r = ok(a);
      const out = await settleAll(sink, [resultOutcome(a, r)]);
      expect(out).to.deep.equal([{ outcome: resultOutcome(a, r), action: "ack", result: r, deadLettered: false }]);
      expect(sink.results).to.deep.equal([{ job: a, result: r }]);
      expect(a.delivery.calls).to.deep.equal(["ack"]);
      expect(log).to.deep.equal(["result:a:start", "result:a:stored", "ack:a"]);
      // A first delivery never asks whether the result exists.
      expect(sink.hasResultAsked).to.deep.equal([]);
    });

    it("publishes an error result, then terms with the code and message as reason", async () => {
      const a = job(log, "a");
      const r = errorResult(a, "INVALID_ARGUMENT", "prompt too long");
      const out = await settleAll(sink, [resultOutcome(a, r)]);
      expect(out).to.deep.equal([{ outcome: resultOutcome(a, r), action: "term", result: r, deadLettered: false }]);
      expect(sink.results).to.deep.equal([{ job: a, result: r }]);
      expect(sink.deadLetters).to.deep.equal([]);
      expect(a.delivery.calls).to.deep.equal(["term:INVALID_ARGUMENT: prompt too long"]);
    });

    it("with deadLetter, stores the dead letter, then the result, then terms", async () => {
      const a = job(log, "a", 2);
      const r = errorResult(a, "UNAVAILABLE", "no worker");
      const out = await settleAll(sink, [resultOutcome(a, r, true)]);
      expect(out[0]).to.deep.include({ action: "term", deadLettered: true, result: r });
      expect(sink.deadLetters).to.deep.equal([{ delivery: a.delivery, tenant: "acme", model: "m", id: "a", error: r.error }]);
      expect(log).to.deep.equal(["dlq:a:start", "dlq:a:stored", "result:a:start", "result:a:stored", "term:a"]);
    });

    it("does not ack or term before the publish has resolved", async () => {
      sink.hold = true;
      const a = job(log, "a");
      const b = job(log, "b");
      const input = new Subject<Outcome>();
      const settled: Settled[] = [];
      input.pipe(settleOutcomes(sink, options())).subscribe((s) => settled.push(s));
      input.next(resultOutcome(a, ok(a)));
      input.next(resultOutcome(b, errorResult(b, "NOT_FOUND", "unknown model")));
      await turns(5);
      expect(a.delivery.settled, "a settled while its publish was pending").to.equal(false);
      expect(b.delivery.settled, "b settled while its publish was pending").to.equal(false);
      expect(settled).to.deep.equal([]);

      sink.releaseOne();
      await turns(3);
      expect(a.delivery.calls).to.deep.equal(["ack"]);
      expect(b.delivery.settled).to.equal(false);
      sink.releaseOne();
      await turns(3);
      expect(b.delivery.calls).to.deep.equal(["term:NOT_FOUND: unknown model"]);
      expect(log).to.deep.equal(["result:a:start", "result:b:start", "result:a:stored", "ack:a", "result:b:stored", "term:b"]);
      expect(settled.map((s) => s.action)).to.deep.equal(["ack", "term"]);
    });

    it("naks with the backoff of its delivery count when the publish fails, and publishes on the next try", async () => {
      sink.failNext(2);
      const first = job(log, "first", 1);
      const third = job(log, "third", 3);
      const out = await settleAll(sink, [resultOutcome(first, ok(first)), resultOutcome(third, ok(third))], { concurrency: 1 });
      expect(out.map((s) => s.action)).to.deep.equal(["nak", "nak"]);
      expect((out[0]!.error as Error).message).to.equal("publish of result:first failed");
      expect(first.delivery.calls).to.deep.equal([`nak:${retryDelayMs(1, BASE, MAX, 0)}`]);
      expect(third.delivery.calls).to.deep.equal([`nak:${retryDelayMs(3, BASE, MAX, 0)}`]);
      expect(retryDelayMs(3, BASE, MAX, 0)).to.equal(4 * BASE);
      expect(sink.results).to.deep.equal([]);

      const again = job(log, "first", 2);
      const [s] = await settleAll(sink, [resultOutcome(again, ok(again))]);
      expect(s!.action).to.equal("ack");
      expect(sink.results.map((x) => x.job.id)).to.deep.equal(["first"]);
    });

    it("naks and does not publish the result when the dead letter fails", async () => {
      sink.failNext(1);
      const a = job(log, "a", 5);
      const r = errorResult(a, "UNAVAILABLE", "no worker");
      const [s] = await settleAll(sink, [resultOutcome(a, r, true)]);
      expect(s).to.deep.include({ action: "nak", deadLettered: false });
      expect(sink.results).to.deep.equal([]);
      expect(a.delivery.calls).to.deep.equal([`nak:${retryDelayMs(5, BASE, MAX, 0)}`]);
    });
  });

  describe("a failed result publish, tried again in place (publishRetryMs)", () => {
    const fast = { publishRetryMs: 2_000, retryBaseMs: 1, retryMaxMs: 4 };

    it("publishes the same result again and acks once it is stored: no nak, no second run", async () => {
      sink.failNext(2);
      const a = job(log, "a");
      const r = ok(a);
      const [s] = await settleAll(sink, [resultOutcome(a, r)], fast);
      expect(s).to.deep.include({ action: "ack", result: r, publishFailures: 2 });
      expect(a.delivery.calls).to.deep.equal(["ack"]);
      expect(sink.results).to.deep.equal([{ job: a, result: r }]);
      // Before each new attempt: was the failed one stored after all?
      expect(sink.hasResultAsked).to.deep.equal(["a", "a"]);
    });

    it("does not publish again when the failed publish was stored after all (its acknowledgement was lost)", async () => {
      sink.loseAckNext = 1;
      const a = job(log, "a");
      const [s] = await settleAll(sink, [resultOutcome(a, ok(a))], fast);
      expect(s).to.deep.include({ action: "ack", publishFailures: 1 });
      expect(sink.live.get("a")).to.equal(1);
      expect(sink.results).to.have.length(1);
      expect(log).to.deep.equal(["result:a:ack-lost", "ack:a"]);
    });

    it("stores a result the client got but the store refused without sending it again (keepResult)", async () => {
      sink.refuseNext = 1;
      sink.keepFailNext = 2;
      const a = job(log, "a");
      const r = errorResult(a, "INVALID_ARGUMENT", "bad parameters");
      const [s] = await settleAll(sink, [resultOutcome(a, r)], fast);
      expect(s).to.deep.include({ action: "term", result: r, publishFailures: 3 });
      expect(sink.live.get("a"), "results the client received").to.equal(1);
      expect(sink.kept).to.deep.equal(["a"]);
      expect(log).to.deep.equal(["result:a:refused", "keep:a:failed", "keep:a:failed", "keep:a:stored", "term:a"]);
    });

    it("dead-letters (with the reason) and settles a result the client got but that cannot be stored in time", async () => {
      sink.refuseNext = 1;
      sink.keepFailNext = 1_000;
      const a = job(log, "a");
      const [s] = await settleAll(sink, [resultOutcome(a, ok(a))], { publishRetryMs: 30, retryBaseMs: 5, retryMaxMs: 5 });
      expect(s).to.deep.include({ action: "ack", deadLettered: true, notStored: true });
      expect(sink.live.get("a")).to.equal(1);
      expect(sink.deadLetters).to.have.length(1);
      expect(sink.deadLetters[0]!.error.code).to.equal("INTERNAL");
      expect(sink.deadLetters[0]!.error.message).to.match(/reached the client but .* refused to store it for 30 ms: stream still refuses it/);
      expect(a.delivery.calls).to.deep.equal(["ack"]);
    });

    it("naks when neither the result nor its dead letter can be stored in time", async () => {
      sink.refuseNext = 1;
      sink.keepFailNext = 1_000;
      const a = job(log, "a");
      const publishDeadLetter = sink.publishDeadLetter.bind(sink);
      sink.publishDeadLetter = () => Promise.reject(new Error("DLQ down"));
      const [s] = await settleAll(sink, [resultOutcome(a, ok(a))], { publishRetryMs: 20, retryBaseMs: 5, retryMaxMs: 5 });
      sink.publishDeadLetter = publishDeadLetter;
      expect(s).to.deep.include({ action: "nak", deadLettered: false });
      expect(a.delivery.calls).to.have.length(1);
      expect(a.delivery.calls[0]).to.match(/^nak:/);
    });

    it("naks with the last error when publishes keep failing for publishRetryMs", async () => {
      sink.failNext(1_000);
      const a = job(log, "a");
      const [s] = await settleAll(sink, [resultOutcome(a, ok(a))], { publishRetryMs: 20, retryBaseMs: 5, retryMaxMs: 5 });
      expect(s!.action).to.equal("nak");
      expect((s!.error as Error).message).to.equal("publish of result:a failed");
      expect(s!.publishFailures).to.be.greaterThan(1);
      expect(a.delivery.calls).to.deep.equal([`nak:${retryDelayMs(1, 5, 5, 0)}`]);
      expect(sink.results).to.deep.equal([]);
    });

    it("answers INTERNAL, saying why, when the result is larger than the broker takes (nothing was sent)", async () => {
      const a = job(log, "a");
      const publish = sink.publishResult.bind(sink);
      let calls = 0;
      sink.publishResult = (j, r) => (calls++ === 0 ? Promise.reject(new ResultTooLargeError("max_payload size exceeded", 2_000_000)) : publish(j, r));
      const [s] = await settleAll(sink, [resultOutcome(a, ok(a))], fast);
      expect(s!.action).to.equal("term");
      expect(s!.result?.error?.code).to.equal("INTERNAL");
      expect(s!.result?.error?.message).to.match(/2000000 bytes\) is larger than the largest message the broker takes/);
      expect(sink.results.map((x) => x.result.status)).to.deep.equal(["error"]);
      expect(a.delivery.calls[0]).to.match(/^term:INTERNAL/);
    });

    it("without keepResult, stores a refused result through publishResult again", async () => {
      const plain: ResultSink = { publishResult: sink.publishResult.bind(sink), hasResult: sink.hasResult.bind(sink), publishDeadLetter: sink.publishDeadLetter.bind(sink) };
      sink.refuseNext = 1;
      const a = job(log, "a");
      const [s] = await settleAll(plain, [resultOutcome(a, ok(a))], fast);
      expect(s).to.deep.include({ action: "ack", publishFailures: 1 });
      expect(sink.live.get("a")).to.equal(2);
    });
  });

  describe("duplicate after a redelivery", () => {
    it("acks without publishing when the result is already stored", async () => {
      sink.stored.add("a");
      const a = job(log, "a", 2);
      const out = await settleAll(sink, [resultOutcome(a, ok(a))]);
      expect(out).to.deep.equal([{ outcome: resultOutcome(a, ok(a)), action: "duplicate", deadLettered: false }]);
      expect(sink.hasResultAsked).to.deep.equal(["a"]);
      expect(sink.results).to.deep.equal([]);
      expect(a.delivery.calls).to.deep.equal(["ack"]);
    });

    it("acks an error result that is already stored too (no term, no second answer)", async () => {
      sink.stored.add("a");
      const a = job(log, "a", 3);
      const [s] = await settleAll(sink, [resultOutcome(a, errorResult(a, "INTERNAL", "boom"))]);
      expect(s!.action).to.equal("duplicate");
      expect(a.delivery.calls).to.deep.equal(["ack"]);
      expect(sink.results).to.deep.equal([]);
    });

    it("publishes as usual when a redelivered request has no stored result", async () => {
      const a = job(log, "a", 2);
      const [s] = await settleAll(sink, [resultOutcome(a, ok(a))]);
      expect(s!.action).to.equal("ack");
      expect(sink.hasResultAsked).to.deep.equal(["a"]);
      expect(sink.results).to.have.length(1);
    });

    it("does not look up a first delivery, even if a result with its id exists", async () => {
      sink.stored.add("a");
      const a = job(log, "a", 1);
      const [s] = await settleAll(sink, [resultOutcome(a, ok(a))]);
      expect(s!.action).to.equal("ack");
      expect(sink.hasResultAsked).to.deep.equal([]);
      expect(sink.results).to.have.length(1);
    });

    it("acks an outcome found stored before dispatch, without a lookup or a publish", async () => {
      const a = job(log, "a", 2);
      const o: Outcome = { kind: "result", job: a, result: ok(a), alreadyStored: true };
      const out = await settleAll(sink, [o]);
      expect(out).to.deep.equal([{ outcome: o, action: "duplicate", deadLettered: false }]);
      expect(sink.hasResultAsked).to.deep.equal([]);
      expect(sink.results).to.deep.equal([]);
      expect(a.delivery.calls).to.deep.equal(["ack"]);
    });

    it("does not look up again a redelivery looked up before dispatch, unless that was long ago", async () => {
      let t = 10_000;
      const recent = { ...job(log, "recent", 2), storedCheckedAtMs: 9_000 };
      const old = { ...job(log, "old", 2), storedCheckedAtMs: 1_000 };
      const out = await settleAll(sink, [resultOutcome(recent, ok(recent)), resultOutcome(old, ok(old))], { recheckStoredAfterMs: 5_000, now: () => t++ });
      expect(out.map((s) => s.action)).to.deep.equal(["ack", "ack"]);
      expect(sink.hasResultAsked).to.deep.equal(["old"]);
    });

    it("naks when the lookup fails", async () => {
      sink.hasResultFails = true;
      const a = job(log, "a", 2);
      const [s] = await settleAll(sink, [resultOutcome(a, ok(a))]);
      expect(s!.action).to.equal("nak");
      expect((s!.error as Error).message).to.equal("stream lookup failed");
      expect(a.delivery.calls).to.deep.equal([`nak:${retryDelayMs(2, BASE, MAX, 0)}`]);
      expect(sink.results).to.deep.equal([]);
    });
  });

  describe("retry", () => {
    it("naks with the outcome's delay while deliveries are left, publishing nothing", async () => {
      const a = job(log, "a", 1);
      const d = job(log, "d", 4);
      const last = (j: InferJob): InferResult => errorResult(j, "UNAVAILABLE", "no worker");
      const out = await settleAll(sink, [retryOutcome(a, 250, last(a)), retryOutcome(d, 2_000, last(d))]);
      expect(out.map((s) => [s.action, s.deadLettered])).to.deep.equal([
        ["nak", false],
        ["nak", false],
      ]);
      expect(a.delivery.calls).to.deep.equal(["nak:250"]);
      expect(d.delivery.calls).to.deep.equal(["nak:2000"]);
      expect(log).to.deep.equal(["nak:a", "nak:d"]);
    });

    it("at maxDeliver, dead-letters and publishes the last-resort error, then terms", async () => {
      const a = job(log, "a", 5);
      const last = errorResult(a, "UNAVAILABLE", "no worker");
      const [s] = await settleAll(sink, [retryOutcome(a, 250, last)], { maxDeliver: 5 });
      const final = errorResult(a, "UNAVAILABLE", "no worker (gave up after 5 deliveries)");
      expect(s).to.deep.include({ action: "term", deadLettered: true, result: final });
      expect(sink.results).to.deep.equal([{ job: a, result: final }]);
      expect(sink.deadLetters).to.deep.equal([{ delivery: a.delivery, tenant: "acme", model: "m", id: "a", error: final.error }]);
      expect(log).to.deep.equal(["dlq:a:start", "dlq:a:stored", "result:a:start", "result:a:stored", "term:a"]);
      expect(a.delivery.calls).to.deep.equal(["term:UNAVAILABLE: no worker (gave up after 5 deliveries)"]);
    });

    it("gives up beyond maxDeliver too, and still naks at maxDeliver - 1", async () => {
      const before = job(log, "before", 2);
      const beyond = job(log, "beyond", 7);
      const last = (j: InferJob): InferResult => errorResult(j, "RESOURCE_EXHAUSTED", "busy");
      const out = await settleAll(sink, [retryOutcome(before, 10, last(before)), retryOutcome(beyond, 10, last(beyond))], { maxDeliver: 3 });
      expect(out.map((s) => s.action)).to.deep.equal(["nak", "term"]);
      expect(before.delivery.calls).to.deep.equal(["nak:10"]);
      expect(beyond.delivery.calls).to.deep.equal(["term:RESOURCE_EXHAUSTED: busy (gave up after 7 deliveries)"]);
    });

    it("at maxDeliver, naks (to try the answer again) when publishing the last resort fails", async () => {
      sink.failNext(1);
      const a = job(log, "a", 5);
      const [s] = await settleAll(sink, [retryOutcome(a, 250, errorResult(a, "UNAVAILABLE", "no worker"))]);
      expect(s!.action).to.equal("nak");
      expect(a.delivery.calls).to.deep.equal([`nak:${retryDelayMs(5, BASE, MAX, 0)}`]);
    });

    it("at maxDeliver, does not answer twice when the last resort was already stored", async () => {
      sink.stored.add("a");
      const a = job(log, "a", 5);
      const [s] = await settleAll(sink, [retryOutcome(a, 250, errorResult(a, "UNAVAILABLE", "no worker"))]);
      expect(s!.action).to.equal("duplicate");
      expect(sink.results).to.deep.equal([]);
      expect(a.delivery.calls).to.deep.equal(["ack"]);
    });
  });

  describe("retry while waiting for a worker (waitUntilMs)", () => {
    const waiting = (j: InferJob, delayMs: number, waitUntilMs: number): Outcome => ({
      kind: "retry",
      job: j,
      delayMs,
      lastResort: errorResult(j, "UNAVAILABLE", "no worker for m@v1"),
      waitUntilMs,
    });

    it("naks past maxDeliver until the wait ends, never beyond its end", async () => {
      const many = job(log, "many", 9);
      const near = job(log, "near", 9);
      const edge = job(log, "edge", 1);
      const out = await settleAll(sink, [waiting(many, 100, 1_300), waiting(near, 500, 1_300), waiting(edge, 500, 1_000.4)], {
        maxDeliver: 5,
        now: () => 1_000,
      });
      expect(out.map((s) => s.action)).to.deep.equal(["nak", "nak", "nak"]);
      // The outcome's delay while it fits; the time left when it does not; never 0.
      expect(many.delivery.calls).to.deep.equal(["nak:100"]);
      expect(near.delivery.calls).to.deep.equal(["nak:300"]);
      expect(edge.delivery.calls).to.deep.equal(["nak:1"]);
      expect(sink.results).to.deep.equal([]);
    });

    it("once the wait is over, answers with the last resort and dead-letters, whatever the delivery count", async () => {
      const a = job(log, "a", 1);
      const [s] = await settleAll(sink, [waiting(a, 100, 1_000)], { maxDeliver: 5, now: () => 1_000 });
      const final = errorResult(a, "UNAVAILABLE", "no worker for m@v1 (gave up after 1 deliveries)");
      expect(s).to.deep.include({ action: "term", deadLettered: true, result: final });
      expect(log).to.deep.equal(["dlq:a:start", "dlq:a:stored", "result:a:start", "result:a:stored", "term:a"]);
    });
  });

  describe("dead", () => {
    it("stores the dead letter, then terms", async () => {
      const d = recordingDelivery(log, "x", 1);
      const error: ErrorInfo = { code: "INVALID_ARGUMENT", message: "missing Nats-Msg-Id" };
      const o = deadOutcome(d, error, { tenant: "acme", model: "m" });
      const [s] = await settleAll(sink, [o]);
      expect(s).to.deep.equal({ outcome: o, action: "term", deadLettered: true });
      expect(sink.deadLetters).to.have.length(1);
      expect(sink.deadLetters[0]).to.deep.include({ delivery: d, tenant: "acme", model: "m", error });
      expect(sink.results).to.deep.equal([]);
      expect(log).to.deep.equal(["dlq:?:start", "dlq:?:stored", "term:x"]);
      expect(d.calls).to.deep.equal(["term:INVALID_ARGUMENT: missing Nats-Msg-Id"]);
    });

    it("does not term before the dead letter is stored", async () => {
      sink.hold = true;
      const d = recordingDelivery(log, "x", 1);
      const input = new Subject<Outcome>();
      input.pipe(settleOutcomes(sink, options())).subscribe();
      input.next(deadOutcome(d, { code: "INVALID_ARGUMENT", message: "bad subject" }));
      await turns(5);
      expect(d.settled).to.equal(false);
      sink.releaseOne();
      await turns(3);
      expect(d.calls).to.deep.equal(["term:INVALID_ARGUMENT: bad subject"]);
    });

    it("naks with backoff when the dead letter cannot be stored", async () => {
      sink.failNext(1);
      const d = recordingDelivery(log, "x", 2);
      const [s] = await settleAll(sink, [deadOutcome(d, { code: "INVALID_ARGUMENT", message: "bad" })]);
      expect(s).to.deep.include({ action: "nak", deadLettered: false });
      expect(d.calls).to.deep.equal([`nak:${retryDelayMs(2, BASE, MAX, 0)}`]);
    });
  });

  describe("as a stream", () => {
    it("never has more than `concurrency` publishes under way", async () => {
      sink.hold = true;
      const jobs = Array.from({ length: 10 }, (_, i) => job(log, `j${i}`));
      const input = new Subject<Outcome>();
      const settled: Settled[] = [];
      let completed = false;
      input.pipe(settleOutcomes(sink, options({ concurrency: 3 }))).subscribe({ next: (s) => settled.push(s), complete: () => (completed = true) });
      for (const j of jobs) input.next(resultOutcome(j, ok(j)));
      input.complete();
      await turns(3);
      expect(sink.inFlight).to.equal(3);
      while (settled.length < jobs.length) {
        expect(sink.held.length, "publishes held").to.be.greaterThan(0);
        sink.releaseOne();
        await turns(3);
        expect(sink.inFlight).to.be.at.most(3);
      }
      expect(sink.maxInFlight).to.equal(3);
      expect(jobs.every((j) => j.delivery.calls.join() === "ack")).to.equal(true);
      expect(completed).to.equal(true);
    });

    it("does not take a throwing ack for a failed publish, even when publishes are retried in place", async () => {
      const bad = job(log, "bad", 1, { throwOnAck: true });
      const out = await settleAll(sink, [resultOutcome(bad, ok(bad))], { publishRetryMs: 2_000, retryBaseMs: 1, retryMaxMs: 4 });
      expect(out[0]).to.deep.include({ action: "nak", deadLettered: false });
      expect((out[0]!.error as Error).message).to.equal("connection closed");
      // Published once, never looked up or published again.
      expect(sink.results).to.have.length(1);
      expect(sink.hasResultAsked).to.deep.equal([]);
    });

    it("keeps going when an ack throws (the queue redelivers what was not acked)", async () => {
      const bad = job(log, "bad", 1, { throwOnAck: true });
      const good = job(log, "good");
      const out = await settleAll(sink, [resultOutcome(bad, ok(bad)), resultOutcome(good, ok(good))], { concurrency: 1 });
      expect(out).to.have.length(2);
      expect(out[0]).to.deep.include({ action: "nak", deadLettered: false });
      expect((out[0]!.error as Error).message).to.equal("connection closed");
      expect(out[1]).to.deep.include({ action: "ack" });
      expect(good.delivery.calls).to.deep.equal(["ack"]);
    });

    it("waits for settlements under way before completing", async () => {
      sink.hold = true;
      const a = job(log, "a");
      let completed = false;
      from([resultOutcome(a, ok(a))])
        .pipe(settleOutcomes(sink, options()))
        .subscribe({ complete: () => (completed = true) });
      await turns(3);
      expect(completed).to.equal(false);
      sink.releaseOne();
      await turns(3);
      expect(completed).to.equal(true);
    });

    it("still settles a delivery whose publish was under way when unsubscribed", async () => {
      sink.hold = true;
      const a = job(log, "a");
      const settled: Settled[] = [];
      const sub = from([resultOutcome(a, ok(a))])
        .pipe(settleOutcomes(sink, options()))
        .subscribe((s) => settled.push(s));
      await turns(2);
      sub.unsubscribe();
      sink.releaseOne();
      await turns(3);
      // The result is stored, so the ack must not be lost; nothing is emitted any more.
      expect(a.delivery.calls).to.deep.equal(["ack"]);
      expect(settled).to.deep.equal([]);
    });

    it("ends the retries of a failed publish when unsubscribed, and naks", async () => {
      sink.refuseNext = 1;
      sink.keepFailNext = 100;
      const a = job(log, "a");
      const sub = from([resultOutcome(a, ok(a))])
        .pipe(settleOutcomes(sink, options({ publishRetryMs: 60_000, retryBaseMs: 50, retryMaxMs: 50 })))
        .subscribe();
      await new Promise((r) => setTimeout(r, 120));
      expect(a.delivery.settled).to.equal(false);
      sub.unsubscribe();
      await turns(5);
      expect(a.delivery.calls).to.have.length(1);
      expect(a.delivery.calls[0]).to.match(/^nak:/);
    });

    it("forwards an error of the source and unsubscribes from it (marbles)", () => {
      const ts = new TestScheduler((actual, expected) => {
        expect(actual).to.deep.equal(expected);
      });
      ts.run(({ cold, expectObservable, expectSubscriptions, flush }) => {
        const a = job(log, "a");
        // A retry below maxDeliver is naked at once; its Settled comes on a promise, which a
        // virtual run never reaches, so only the error shows in the marble.
        const o = retryOutcome(a, 10, errorResult(a, "UNAVAILABLE", "x"));
        const source = cold<Outcome>("-r-#", { r: o }, new Error("upstream"));
        expectObservable(source.pipe(settleOutcomes(sink, options()))).toBe("---#", {}, new Error("upstream"));
        expectSubscriptions(source.subscriptions).toBe("^--!");
        flush();
        expect(a.delivery.calls).to.deep.equal(["nak:10"]);
      });
    });

    it("unsubscribes from the source when unsubscribed (marbles)", () => {
      const ts = new TestScheduler((actual, expected) => {
        expect(actual).to.deep.equal(expected);
      });
      ts.run(({ cold, expectObservable, expectSubscriptions }) => {
        const a = job(log, "a");
        const source = cold<Outcome>("-r-r-r-|", { r: retryOutcome(a, 10, errorResult(a, "UNAVAILABLE", "x")) });
        expectObservable(source.pipe(settleOutcomes(sink, options())), "^--!").toBe("---");
        expectSubscriptions(source.subscriptions).toBe("^--!");
      });
    });
  });
});
