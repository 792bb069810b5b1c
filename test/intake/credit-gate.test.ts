import { expect } from "chai";
import { Subject, tap, type Observable, type Subscription } from "rxjs";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { defaultConfig } from "../../pipeline/config.js";
import { ConsumerPullSource, JsDelivery, durableName, ensureConsumers, ensureStreams } from "../../pipeline/intake/jetstream.js";
import { STREAM_REQUESTS } from "../../proto/wire.js";
import { creditGate } from "../../pipeline/intake/credit-gate.js";
import { pullFromAsync, type AsyncPull } from "../../pipeline/intake/pull-source.js";
import type { Delivery } from "../../operators/types.js";
import { useNats, waitFor } from "../support/nats.js";

// ---- one lane through the gate, as a single-queue consumer sees it -------------------------------

/** A pull source opened with a promise (a JetStream fetch, a scripted queue). */
interface PullSource {
  pull(max: number, expiresMs: number): Promise<PullBatch<Delivery>>;
}
type PullBatch<M> = AsyncPull & AsyncIterable<M>;

interface PullWithCreditsOptions {
  maxUnsettled: number;
  expiresMs?: number;
  minPull?: number;
  workingIntervalMs?: number;
  onPullError?: (err: unknown) => void;
  drain?: Observable<unknown>;
  onUnsettledChange?: (unsettled: number) => void;
  onHeldChange?: (subject: string, delta: 1 | -1) => void;
}

/** The gate with one lane: pulls all its free credits at once, again from minPull free. */
function pullWithCredits(source: PullSource, o: PullWithCreditsOptions) {
  const max = Math.max(1, Math.floor(o.maxUnsettled));
  const minPull = Math.max(1, Math.min(max, o.minPull ?? Math.ceil(max / 4)));
  return creditGate({
    lanes: [{ key: "q", priority: "normal", source: pullFromAsync((n, e) => source.pull(n, e)) }],
    maxUnsettled: max,
    reserveFraction: 1,
    minPullFraction: minPull / max,
    ...(o.expiresMs !== undefined ? { expiresMs: o.expiresMs, backlogExpiresMs: o.expiresMs } : { backlogExpiresMs: 5_000 }),
    ...(o.workingIntervalMs !== undefined ? { workingIntervalMs: o.workingIntervalMs } : {}),
    ...(o.drain ? { drain: o.drain } : {}),
    onPullError: (_lane, err) => o.onPullError?.(err),
    onUnsettledChange: (_p, n) => o.onUnsettledChange?.(n),
    ...(o.onHeldChange ? { onHeldChange: (_p: string, subject: string, delta: 1 | -1) => o.onHeldChange?.(subject, delta) } : {}),
  });
}

// ---- a scripted in-memory queue ------------------------------------------------------------------

/** A message of the scripted queue: records how it was settled and how often it was kept alive. */
class FakeMsg implements Delivery {
  readonly calls: string[] = [];
  workingCalls = 0;
  /** Told once, at the first settlement. */
  onSettled?: () => void;
  readonly subject = "infer.req.normal.acme.m";
  readonly data = new Uint8Array();
  readonly storedAtMs = 0;
  constructor(
    readonly seq: number,
    readonly deliveryCount = 1,
    readonly pulledAtMs = Date.now(),
  ) {}
  get settled(): boolean {
    return this.calls.length > 0;
  }
  header(): string | undefined {
    return undefined;
  }
  headerEntries(): Array<[string, string]> {
    return [];
  }
  private record(call: string): void {
    this.calls.push(call);
    if (this.calls.length === 1) this.onSettled?.();
  }
  ack(): void {
    this.record("ack");
  }
  nak(delayMs?: number): void {
    this.record(delayMs === undefined ? "nak" : `nak:${delayMs}`);
  }
  term(reason?: string): void {
    this.record(reason === undefined ? "term" : `term:${reason}`);
  }
  working(): void {
    this.workingCalls++;
  }
}

/** What the queue knows of one pull request. */
interface PullRecord {
  readonly max: number;
  readonly expiresMs: number;
  readonly atMs: number;
  delivered: number;
  /** Ended: it will deliver nothing more (filled, expired, closed or failed). */
  ended: boolean;
  closed: boolean;
  expired: boolean;
  /** Throw this from the batch once `n` messages were delivered. */
  failAfter?: { n: number; err: Error };
  wake?: () => void;
}

/**
 * A PullSource over an in-memory queue. Records every pull(max) call, hands out pushed
 * messages to the open pulls, and checks, at each pull call, that it asks for no more than
 * the free credits: `outstanding requested + delivered-and-unsettled + max <= bound`.
 */
class ScriptedSource implements PullSource {
  readonly pulls: PullRecord[] = [];
  /** Every message handed to a pull, in order. */
  readonly delivered: FakeMsg[] = [];
  /** The last message handed out for each stream sequence. */
  readonly lastBySeq = new Map<number, FakeMsg>();
  /** When true, close() lets a pull hand out what is already queued before it ends (as a
   * client that has messages in its buffer may). */
  lazyClose = false;
  private unsettledCount = 0;
  readonly violations: string[] = [];
  /** Extra setImmediate turns before a pull call resolves (a network round trip). */
  latency: () => number = () => 0;
  /** While true, pull calls wait until releasePulls(). */
  holdPulls = false;
  private readonly queue: FakeMsg[] = [];
  private readonly failPulls: Error[] = [];
  private failBatch: { n: number; err: Error } | undefined;
  private readonly heldPulls: Array<() => void> = [];

  constructor(
    private readonly bound: number,
    private readonly minPull = 1,
  ) {}

  /** Requested and not yet delivered, over the pulls that can still deliver. */
  outstanding(): number {
    return this.pulls.reduce((n, p) => n + (p.ended ? 0 : p.max - p.delivered), 0);
  }
  unsettled(): number {
    return this.unsettledCount;
  }
  open(): PullRecord[] {
    return this.pulls.filter((p) => !p.ended);
  }

  push(...msgs: FakeMsg[]): void {
    this.queue.push(...msgs);
    for (const p of this.pulls) p.wake?.();
  }
  /** Ends every open pull as if its expiry passed with nothing more to deliver. */
  expireAll(): void {
    for (const p of this.pulls) {
      if (p.ended) continue;
      p.expired = true;
      p.ended = true;
      p.wake?.();
    }
  }
  failNextPulls(...errs: Error[]): void {
    this.failPulls.push(...errs);
  }
  failNextBatchAfter(n: number, err: Error): void {
    this.failBatch = { n, err };
  }
  releasePulls(): void {
    for (const r of this.heldPulls.splice(0)) r();
  }

  async pull(max: number, expiresMs: number): Promise<PullBatch<Delivery>> {
    const outstanding = this.outstanding();
    const unsettled = this.unsettled();
    if (max < 1) this.violations.push(`pull(${max})`);
    if (outstanding + unsettled + max > this.bound) {
      this.violations.push(`pull(${max}) with ${outstanding} outstanding and ${unsettled} unsettled, bound ${this.bound}`);
    }
    if (outstanding > 0 && max < this.minPull) {
      this.violations.push(`pull(${max}) below minPull ${this.minPull} while ${outstanding} were outstanding`);
    }
    const rec: PullRecord = { max, expiresMs, atMs: Date.now(), delivered: 0, ended: false, closed: false, expired: false };
    if (this.failBatch) {
      rec.failAfter = this.failBatch;
      this.failBatch = undefined;
    }
    this.pulls.push(rec);
    const failure = this.failPulls.shift();
    if (failure) {
      rec.ended = true;
      throw failure;
    }
    for (let i = this.latency(); i > 0; i--) await turn();
    if (this.holdPulls) await new Promise<void>((r) => this.heldPulls.push(r));
    return this.batch(rec);
  }

  private batch(rec: PullRecord): PullBatch<Delivery> {
    const take = (): FakeMsg | undefined => {
      const m = this.queue.shift();
      if (m) {
        this.delivered.push(m);
        this.lastBySeq.set(m.seq, m);
        this.unsettledCount++;
        m.onSettled = () => this.unsettledCount--;
      }
      return m;
    };
    const lazy = this.lazyClose;
    const queued = (): number => this.queue.length;
    return {
      close: async () => {
        rec.closed = true;
        if (!lazy) rec.ended = true;
        rec.wake?.();
      },
      async *[Symbol.asyncIterator]() {
        try {
          for (;;) {
            if ((rec.closed && !(lazy && queued() > 0)) || rec.expired || rec.delivered >= rec.max) return;
            if (rec.failAfter && rec.delivered >= rec.failAfter.n) throw rec.failAfter.err;
            const m = take();
            if (m) {
              rec.delivered++;
              if (rec.delivered >= rec.max) rec.ended = true;
              yield m;
              continue;
            }
            await new Promise<void>((r) => (rec.wake = r));
            rec.wake = undefined;
          }
        } finally {
          rec.ended = true;
        }
      },
    };
  }
}

const turn = (): Promise<void> => new Promise((r) => setImmediate(r));
async function turns(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await turn();
}
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function msgs(from: number, count: number): FakeMsg[] {
  return Array.from({ length: count }, (_, i) => new FakeMsg(from + i));
}

/** A small seeded generator, so a failing random run can be repeated. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Subscribes and keeps what was emitted, the unsettled counts reported, and whether it ended. */
function consume(source: PullSource, opts: PullWithCreditsOptions) {
  const got: Delivery[] = [];
  const unsettledSeen: number[] = [];
  const state = { completed: false, error: undefined as unknown };
  const sub: Subscription = pullWithCredits(source, {
    ...opts,
    onUnsettledChange: (n) => {
      unsettledSeen.push(n);
      opts.onUnsettledChange?.(n);
    },
  }).subscribe({
    next: (d) => got.push(d),
    error: (err: unknown) => (state.error = err),
    complete: () => (state.completed = true),
  });
  return { got, unsettledSeen, state, sub };
}

describe("credit gate (one lane)", () => {
  describe("with a scripted queue", () => {
    const runs: Array<{ max: number; minPull?: number; seed: number }> = [
      { max: 1, seed: 1 },
      { max: 7, minPull: 3, seed: 2 },
      { max: 16, seed: 3 },
      { max: 16, minPull: 1, seed: 4 },
      { max: 64, minPull: 16, seed: 5 },
    ];
    for (const { max, minPull, seed } of runs) {
      it(`never holds more than ${max} unsettled nor asks for more than the free credits (${3_000} random settlements, minPull ${minPull ?? "default"}, seed ${seed})`, async () => {
        const N = 3_000;
        const rnd = mulberry32(seed);
        const src = new ScriptedSource(max, minPull ?? Math.ceil(max / 4));
        src.latency = () => Math.floor(rnd() * 3);
        const backlog = msgs(1, N);
        const finished = new Set<number>();
        const held: Delivery[] = [];
        let unsettled = 0;
        let maxUnsettled = 0;
        const problems: string[] = [];
        const opts: PullWithCreditsOptions = { maxUnsettled: max, expiresMs: 1_000, ...(minPull === undefined ? {} : { minPull }) };
        // Each delivery is told held (+1) once and released (-1) once, with its subject: their sum
        // is the unsettled count at every change.
        let heldSum = 0;
        const sub = pullWithCredits(src, {
          ...opts,
          onHeldChange: (subject, delta) => {
            heldSum += delta;
            if (subject !== "infer.req.normal.acme.m") problems.push(`onHeldChange(${subject})`);
          },
          onUnsettledChange: (n) => {
            if (n > max || n < 0) problems.push(`onUnsettledChange(${n})`);
            if (heldSum !== n) problems.push(`held deltas sum to ${heldSum}, unsettled ${n}`);
          },
        }).subscribe((d) => {
          unsettled++;
          maxUnsettled = Math.max(maxUnsettled, unsettled);
          if (unsettled > max) problems.push(`${unsettled} unsettled at emission of seq ${d.seq}`);
          if (src.unsettled() > max) problems.push(`queue sees ${src.unsettled()} unsettled`);
          held.push(d);
          // Some are settled at once, inside the emission.
          if (rnd() < 0.1) settleOne(held.length - 1);
        });

        function settleOne(i: number): void {
          const [d] = held.splice(i, 1);
          if (!d) return;
          const m = src.lastBySeq.get(d.seq)!;
          const r = rnd();
          if (r < 0.6) d.ack();
          else if (r < 0.8) d.nak(10);
          else d.term("bad");
          unsettled--;
          // A second settlement must not give back a second credit.
          if (rnd() < 0.2) d.ack();
          if (m.calls.length !== 1) problems.push(`seq ${d.seq} settled as ${JSON.stringify(m.calls)}`);
          if (m.calls[0]!.startsWith("nak")) {
            // The queue gives a naked message back, as JetStream would.
            src.push(new FakeMsg(m.seq, m.deliveryCount + 1));
          } else finished.add(m.seq);
        }

        let steps = 0;
        while (finished.size < N) {
          if (++steps > 200_000) expect.fail(`stuck: ${finished.size} of ${N} finished, ${held.length} held, pulls open ${src.open().length}`);
          const r = rnd();
          if (r < 0.3 && backlog.length > 0) src.push(...backlog.splice(0, 1 + Math.floor(rnd() * max * 2)));
          else if (r < 0.35) src.expireAll();
          const k = Math.floor(rnd() * (held.length + 1));
          for (let i = 0; i < k && held.length > 0; i++) settleOne(Math.floor(rnd() * held.length));
          if (problems.length > 0 || src.violations.length > 0) break;
          await turn();
        }
        sub.unsubscribe();
        // Pulls still being opened are closed as they open.
        await turns(5);
        expect(problems).to.deep.equal([]);
        expect(src.violations).to.deep.equal([]);
        expect(maxUnsettled).to.equal(max);
        expect(src.open(), "pulls left open after unsubscribe").to.deep.equal([]);
        // Every pull stayed within the bound, even counting what was requested and not yet delivered.
        expect(Math.max(...src.pulls.map((p) => p.max))).to.be.at.most(max);
      });
    }

    it("asks for maxUnsettled at start, and for more only as deliveries are settled", async () => {
      const src = new ScriptedSource(5, 2);
      src.push(...msgs(1, 20));
      const c = consume(src, { maxUnsettled: 5, minPull: 2 });
      await turns(5);
      expect(c.got.map((d) => d.seq)).to.deep.equal([1, 2, 3, 4, 5]);
      expect(src.pulls.map((p) => p.max)).to.deep.equal([5]);
      c.got[0]!.ack();
      await turns(5);
      // One credit free: below minPull 2, but no pull is outstanding, so it asks for that one.
      expect(src.pulls.map((p) => p.max)).to.deep.equal([5, 1]);
      expect(c.got).to.have.length(6);
      c.sub.unsubscribe();
    });

    it("gives back exactly one credit per delivery, whether acked, naked or termed, and only once", async () => {
      const src = new ScriptedSource(3, 1);
      src.push(...msgs(1, 3));
      const c = consume(src, { maxUnsettled: 3, minPull: 1 });
      await turns(5);
      const [a, b, d] = c.got as [Delivery, Delivery, Delivery];
      expect(c.unsettledSeen).to.deep.equal([1, 2, 3]);
      expect(src.pulls.map((p) => p.max)).to.deep.equal([3]);

      a.ack();
      a.ack();
      a.nak();
      await turns(3);
      expect(c.unsettledSeen).to.deep.equal([1, 2, 3, 2]);
      expect(src.pulls.map((p) => p.max)).to.deep.equal([3, 1]);
      expect(src.delivered[0]!.calls).to.deep.equal(["ack"]);
      expect(a.settled).to.equal(true);

      b.nak(500);
      b.term();
      await turns(3);
      expect(c.unsettledSeen).to.deep.equal([1, 2, 3, 2, 1]);
      expect(src.pulls.map((p) => p.max)).to.deep.equal([3, 1, 1]);
      expect(src.delivered[1]!.calls).to.deep.equal(["nak:500"]);

      d.term("poison");
      d.ack();
      await turns(3);
      expect(c.unsettledSeen).to.deep.equal([1, 2, 3, 2, 1, 0]);
      expect(src.pulls.map((p) => p.max)).to.deep.equal([3, 1, 1, 1]);
      expect(src.delivered[2]!.calls).to.deep.equal(["term:poison"]);

      // working() after settling is not passed on.
      d.working();
      expect(src.delivered[2]!.workingCalls).to.equal(0);
      c.sub.unsubscribe();
    });

    it("passes the delivery's fields through and sends each pull with expiresMs", async () => {
      const src = new ScriptedSource(2, 1);
      const m = new FakeMsg(42, 3, 1234);
      src.push(m);
      const c = consume(src, { maxUnsettled: 2, expiresMs: 750 });
      await turns(3);
      const d = c.got[0]!;
      expect([d.seq, d.deliveryCount, d.pulledAtMs, d.storedAtMs, d.subject, d.settled]).to.deep.equal([42, 3, 1234, 0, m.subject, false]);
      d.working();
      expect(m.workingCalls).to.equal(1);
      expect(src.pulls.map((p) => p.expiresMs)).to.deep.equal([750]);
      c.sub.unsubscribe();
    });

    it("while a pull is outstanding, opens another only when minPull credits are free", async () => {
      const src = new ScriptedSource(8, 4);
      const c = consume(src, { maxUnsettled: 8, minPull: 4 });
      await turns(3);
      expect(src.pulls.map((p) => p.max)).to.deep.equal([8]);
      src.push(...msgs(1, 3));
      await turns(3);
      for (const d of c.got) d.ack();
      await turns(3);
      // 3 free, 5 still requested: below minPull, so no new pull.
      expect(src.pulls.map((p) => p.max)).to.deep.equal([8]);

      // The first pull fills; the next one (3 free, none outstanding) is slow to open.
      src.holdPulls = true;
      src.push(...msgs(4, 5));
      await turns(3);
      expect(src.pulls.map((p) => p.max)).to.deep.equal([8, 3]);
      // One more free while that pull is being opened: 1 < minPull, no pull.
      c.got[3]!.ack();
      await turns(3);
      expect(src.pulls.map((p) => p.max)).to.deep.equal([8, 3]);
      // Four free: a pull of 4, though one is outstanding.
      for (const d of c.got.slice(4, 7)) d.ack();
      await turns(3);
      src.releasePulls();
      await turns(3);
      expect(src.pulls.map((p) => p.max)).to.deep.equal([8, 3, 4]);
      expect(src.violations).to.deep.equal([]);
      c.sub.unsubscribe();
    });

    it("on drain: stops pulling, closes open pulls, and completes only when all it delivered are settled", async () => {
      const src = new ScriptedSource(4, 1);
      const drain = new Subject<void>();
      src.push(...msgs(1, 3));
      const c = consume(src, { maxUnsettled: 4, minPull: 1, drain });
      await turns(3);
      expect(c.got).to.have.length(3);
      expect(src.open()).to.have.length(1);

      drain.next();
      await turns(3);
      expect(src.pulls[0]!.closed, "open pull closed").to.equal(true);
      expect(c.state.completed).to.equal(false);
      src.push(...msgs(10, 5));
      c.got[0]!.ack();
      c.got[1]!.nak();
      await turns(3);
      expect(c.state.completed, "completed with one still unsettled").to.equal(false);
      expect(src.pulls).to.have.length(1);
      expect(c.got).to.have.length(3);

      c.got[2]!.term();
      await turns(3);
      expect(c.state.completed).to.equal(true);
      expect(src.pulls, "pulled after drain").to.have.length(1);
      expect(c.state.error).to.equal(undefined);
    });

    it("on drain while a pull is being opened: closes it as soon as it opens, and completes", async () => {
      const src = new ScriptedSource(4, 1);
      src.holdPulls = true;
      const drain = new Subject<void>();
      const c = consume(src, { maxUnsettled: 4, drain, expiresMs: 60_000 });
      await turns(3);
      expect(src.pulls).to.have.length(1);
      drain.next();
      src.releasePulls();
      await turns(5);
      expect(src.pulls[0]!.closed, "pull closed").to.equal(true);
      expect(c.state.completed).to.equal(true);
      // Nothing delivered after the drain reaches the subscriber.
      src.push(...msgs(1, 2));
      await turns(3);
      expect(c.got).to.deep.equal([]);
    });

    it("completes at once on drain when nothing is held or requested", async () => {
      const src = new ScriptedSource(4, 1);
      src.failNextPulls(new Error("down"));
      const drain = new Subject<void>();
      const errors: unknown[] = [];
      const c = consume(src, { maxUnsettled: 4, drain, onPullError: (e) => errors.push(e) });
      await turns(3);
      expect(errors).to.have.length(1);
      // In the backoff: no pull open, nothing held.
      drain.next();
      expect(c.state.completed).to.equal(true);
      await sleep(150);
      expect(src.pulls, "retried after drain").to.have.length(1);
    });

    it("closes a pull that opens only after unsubscribe", async () => {
      const src = new ScriptedSource(4, 1);
      src.holdPulls = true;
      const c = consume(src, { maxUnsettled: 4 });
      await turns(3);
      c.sub.unsubscribe();
      src.releasePulls();
      await turns(3);
      expect(src.pulls[0]!.closed, "a pull that opens after unsubscribe is closed").to.equal(true);
      expect(c.got).to.deep.equal([]);
    });

    it("naks what a closing pull still hands out after a drain, and completes once that pull ends", async () => {
      const src = new ScriptedSource(8, 1);
      src.lazyClose = true;
      const drain = new Subject<void>();
      src.push(...msgs(1, 2));
      const c = consume(src, { maxUnsettled: 8, minPull: 1, drain });
      await turns(3);
      expect(c.got).to.have.length(2);
      // Queued before the close takes effect: the pull still hands these out.
      src.push(...msgs(3, 3));
      drain.next();
      await turns(5);
      expect(c.got.map((d) => d.seq), "emitted after drain").to.deep.equal([1, 2]);
      expect(src.delivered.slice(2).map((m) => m.calls)).to.deep.equal([["nak"], ["nak"], ["nak"]]);
      expect(c.state.completed).to.equal(false);
      for (const d of c.got) d.ack();
      await turns(3);
      expect(c.state.completed).to.equal(true);
      expect(src.pulls).to.have.length(1);
    });

    it("naks what a closing pull still hands out after unsubscribe", async () => {
      const src = new ScriptedSource(8, 1);
      src.lazyClose = true;
      const c = consume(src, { maxUnsettled: 8, minPull: 1 });
      await turns(3);
      src.push(...msgs(1, 2));
      c.sub.unsubscribe();
      await turns(5);
      expect(c.got).to.deep.equal([]);
      expect(src.delivered.map((m) => m.calls)).to.deep.equal([["nak"], ["nak"]]);
      expect(src.pulls).to.have.length(1);
    });

    it("closes open pulls when unsubscribed, and pulls no more", async () => {
      const src = new ScriptedSource(4, 1);
      src.push(...msgs(1, 2));
      const c = consume(src, { maxUnsettled: 4, minPull: 1 });
      await turns(3);
      expect(src.open()).to.have.length(1);
      c.sub.unsubscribe();
      await turns(3);
      expect(src.pulls[0]!.closed).to.equal(true);
      expect(src.open()).to.deep.equal([]);
      // Settling after unsubscribe gives the message its settlement, but opens no pull.
      c.got[0]!.ack();
      c.got[1]!.nak();
      await turns(3);
      expect(src.delivered.map((m) => m.calls)).to.deep.equal([["ack"], ["nak"]]);
      expect(src.pulls).to.have.length(1);
      expect(c.state.completed).to.equal(false);
    });

    it("retries a failing pull with a growing backoff and reports each failure", async function () {
      this.timeout(5_000);
      const src = new ScriptedSource(4, 1);
      const e1 = new Error("no responders");
      const e2 = new Error("connection closed");
      src.failNextPulls(e1, e2);
      const errors: unknown[] = [];
      src.push(...msgs(1, 2));
      const c = consume(src, {
        maxUnsettled: 4,
        onPullError: (e) => {
          errors.push(e);
          throw new Error("a listener that throws");
        },
      });
      await waitFor("the third pull", () => src.pulls.length >= 3, 3_000, 5);
      await turns(3);
      expect(errors).to.deep.equal([e1, e2]);
      const [p0, p1, p2] = src.pulls as [PullRecord, PullRecord, PullRecord];
      // The first retry waited its backoff of 100 ms, the second twice that: the backoff grows.
      // (A timer never fires early; 2 ms for rounding. How much later it fires is the machine's.)
      const gap1 = p1.atMs - p0.atMs;
      const gap2 = p2.atMs - p1.atMs;
      expect(gap1, "first backoff").to.be.at.least(100 - 2);
      expect(gap2, "second backoff").to.be.at.least(2 * 100 - 2);
      expect([p0.max, p1.max, p2.max]).to.deep.equal([4, 4, 4]);
      expect(c.got.map((d) => d.seq)).to.deep.equal([1, 2]);
      expect(c.state.error).to.equal(undefined);
      c.sub.unsubscribe();
    });

    it("keeps what a failing pull delivered before it failed, and asks only for the credits left", async function () {
      this.timeout(5_000);
      const src = new ScriptedSource(4, 1);
      const boom = new Error("pull broke");
      src.failNextBatchAfter(2, boom);
      src.push(...msgs(1, 2));
      const errors: unknown[] = [];
      const c = consume(src, { maxUnsettled: 4, minPull: 1, onPullError: (e) => errors.push(e) });
      await waitFor("the retry", () => src.pulls.length >= 2, 3_000, 5);
      expect(errors).to.deep.equal([boom]);
      expect(c.got.map((d) => d.seq)).to.deep.equal([1, 2]);
      // Two held, so two free.
      expect(src.pulls.map((p) => p.max)).to.deep.equal([4, 2]);
      expect(src.violations).to.deep.equal([]);
      c.sub.unsubscribe();
    });

    it("drops a redelivery of a stream sequence it still holds, and takes it once it is settled", async () => {
      const src = new ScriptedSource(2, 1);
      src.push(new FakeMsg(5, 1), new FakeMsg(5, 2));
      const c = consume(src, { maxUnsettled: 2, minPull: 1 });
      await turns(5);
      expect(c.got.map((d) => [d.seq, d.deliveryCount])).to.deep.equal([[5, 1]]);
      expect(c.unsettledSeen).to.deep.equal([1]);
      // The dropped copy took no credit: the next pull asks for the one free.
      expect(src.pulls.map((p) => p.max)).to.deep.equal([2, 1]);
      // Nothing is done to the dropped copy: settling the held one settles the sequence.
      expect(src.delivered[1]!.calls).to.deep.equal([]);

      src.push(new FakeMsg(6, 1));
      await turns(3);
      c.got[0]!.ack();
      await turns(3);
      src.push(new FakeMsg(5, 3));
      await turns(3);
      expect(c.got.map((d) => [d.seq, d.deliveryCount])).to.deep.equal([
        [5, 1],
        [6, 1],
        [5, 3],
      ]);
      c.sub.unsubscribe();
    });

    it("tells the queue a held delivery is still being worked on, past workingIntervalMs", async () => {
      const src = new ScriptedSource(4, 1);
      const old = new FakeMsg(1, 1, Date.now() - 1_000);
      const young = new FakeMsg(2, 1, Date.now() + 60_000);
      const done = new FakeMsg(3, 1, Date.now() - 1_000);
      src.push(old, young, done);
      const c = consume(src, { maxUnsettled: 4, workingIntervalMs: 20 });
      await turns(3);
      c.got[2]!.ack();
      await waitFor("two working() calls", () => old.workingCalls >= 2, 2_000, 5);
      expect(young.workingCalls, "young delivery").to.equal(0);
      expect(done.workingCalls, "settled delivery").to.equal(0);
      c.sub.unsubscribe();
      const after = old.workingCalls;
      await sleep(50);
      expect(old.workingCalls, "working() after unsubscribe").to.equal(after);
    });

    it("never calls working() when workingIntervalMs is 0 (the default)", async () => {
      const src = new ScriptedSource(4, 1);
      const old = new FakeMsg(1, 1, Date.now() - 1_000);
      src.push(old);
      const c = consume(src, { maxUnsettled: 4 });
      await sleep(40);
      expect(c.got).to.have.length(1);
      expect(old.workingCalls).to.equal(0);
      c.sub.unsubscribe();
    });
  });

  describe("against nats-server", function () {
    this.timeout(30_000);
    const nats = useNats();

    it("keeps the consumer's ack-pending within maxUnsettled and delivers each of 500 messages once", async () => {
      const N = 500;
      const BOUND = 16;
      const cfg = defaultConfig();
      const jsm = await jetstreamManager(nats.nc);
      await ensureStreams(jsm, cfg.streams);
      // The server's own bound is far above ours: only the source keeps ack-pending at 16.
      await ensureConsumers(jsm, { ...cfg.consumer, maxAckPending: 1_000 }, ["normal"]);
      const js = jetstream(nats.nc);
      const body = new TextEncoder().encode(JSON.stringify({ prompt: "p" }));
      await Promise.all(
        Array.from({ length: N }, (_, i) => {
          const h = natsHeaders();
          h.set("Content-Type", "application/json");
          return js.publish("infer.req.normal.credits.m", body, { msgID: `c-${i}`, headers: h });
        }),
      );
      const name = durableName(cfg.consumer, "normal");
      expect((await jsm.consumers.info(STREAM_REQUESTS, name)).num_pending).to.equal(N);

      // The real consumer source, keeping each JetStream message by sequence so the test can
      // confirm its ack with the server before giving the credit back (see below).
      const consumerSource = new ConsumerPullSource(await js.consumers.get(STREAM_REQUESTS, name));
      const jsMsgs = new Map<number, JsDelivery>();
      const seen = new Map<number, number>();
      const redelivered: number[] = [];
      let acked = 0;
      let held = 0;
      let maxHeld = 0;
      const work: Array<Promise<void>> = [];
      const sub = creditGate({
        lanes: [{ key: "normal", priority: "normal", source: { pull: (n, e) => consumerSource.pull(n, e).pipe(tap((m) => m instanceof JsDelivery && jsMsgs.set(m.seq, m))) } }],
        maxUnsettled: BOUND,
        reserveFraction: 1,
        expiresMs: 1_000,
        onUnsettledChange: (_p, n) => (maxHeld = Math.max(maxHeld, n)),
      }).subscribe((d) => {
        held++;
        seen.set(d.seq, (seen.get(d.seq) ?? 0) + 1);
        if (d.deliveryCount > 1) redelivered.push(d.seq);
        // Slow work, 2-12 ms, then the ack. A plain ack is sent and forgotten: the server counts
        // it when it gets round to it, so under load its ack-pending can briefly exceed the
        // bound by the acks still queued in the server (seen: 20-24 for 16 on a busy machine)
        // though the source never holds more than 16. Confirming the ack first makes the
        // server's count exact, so what is measured is the source's demand alone.
        work.push(
          sleep(2 + Math.random() * 10).then(async () => {
            const m = jsMsgs.get(d.seq);
            if (!m) throw new Error(`no JetStream message for seq ${d.seq}`);
            await m.msg.ackAck();
            held--;
            d.ack();
            acked++;
          }),
        );
      });

      let maxAckPending = 0;
      let samples = 0;
      let sampling = true;
      const sampler = (async () => {
        while (sampling) {
          const ci = await jsm.consumers.info(STREAM_REQUESTS, name);
          maxAckPending = Math.max(maxAckPending, ci.num_ack_pending);
          samples++;
          await sleep(3);
        }
      })();
      try {
        await waitFor("all 500 acked", () => acked === N, 20_000, 10);
        await Promise.all(work);
      } finally {
        sampling = false;
        await sampler;
        sub.unsubscribe();
      }

      expect(seen.size).to.equal(N);
      expect([...seen.values()].every((n) => n === 1), "a message arrived twice").to.equal(true);
      expect(redelivered).to.deep.equal([]);
      expect(held).to.equal(0);
      expect(maxHeld).to.equal(BOUND);
      expect(samples).to.be.at.least(20);
      expect(maxAckPending, "server ack-pending").to.be.at.most(BOUND);
      // The sampling saw the bound in use, so the check above is not vacuous.
      expect(maxAckPending).to.be.at.least(BOUND / 2);
      const ci = await jsm.consumers.info(STREAM_REQUESTS, name);
      expect([ci.num_pending, ci.num_ack_pending, ci.num_redelivered]).to.deep.equal([0, 0, 0]);
    });
  });
});
