/** The credit gate in virtual time (RxJS TestScheduler): several lanes, priorities, backoff, keep-alive. */
import { expect } from "chai";
import { Observable, type SchedulerLike } from "rxjs";
import { TestScheduler } from "rxjs/testing";
import { creditGate } from "../../pipeline/intake/credit-gate.js";
import { PULL_RETRY, type GateLane } from "../../pipeline/intake/gate-options.js";
import type { PullSource } from "../../pipeline/intake/pull-source.js";
import type { Delivery } from "../../operators/types.js";
import { RecordingDelivery } from "../support/deliveries.js";
import type { Priority } from "../../proto/wire.js";

const VMsg = RecordingDelivery;
type VMsg = RecordingDelivery;

/** A queue in virtual time: messages arrive at given times; a pull takes up to n, waiting until it expires. */
class VirtualQueue implements PullSource {
  private readonly waiting: VMsg[] = [];
  private readonly wakers = new Set<() => void>();
  readonly pulls: Array<{ at: number; n: number }> = [];
  readonly handedOut: VMsg[] = [];
  failNext = 0;
  constructor(
    private readonly scheduler: SchedulerLike,
    readonly name: string,
  ) {}
  arrive(at: number, count: number, firstSeq: number): void {
    this.scheduler.schedule(() => {
      for (let i = 0; i < count; i++) this.waiting.push(new VMsg(this.name, firstSeq + i));
      for (const w of [...this.wakers]) w();
    }, at);
  }
  pull(max: number, expiresMs: number): Observable<Delivery> {
    return new Observable<Delivery>((sub) => {
      this.pulls.push({ at: this.scheduler.now(), n: max });
      if (this.failNext > 0) {
        this.failNext--;
        sub.error(new Error("broker away"));
        return;
      }
      let got = 0;
      const give = (): void => {
        while (got < max && this.waiting.length > 0) {
          const m = this.waiting.shift()!;
          m.pulledAtMs = this.scheduler.now();
          this.handedOut.push(m);
          got++;
          sub.next(m);
        }
        if (got >= max) sub.complete();
      };
      this.wakers.add(give);
      const expiry = this.scheduler.schedule(() => sub.complete(), expiresMs);
      give();
      return () => {
        this.wakers.delete(give);
        expiry.unsubscribe();
      };
    });
  }
}

const lane = (q: VirtualQueue, priority: Priority = "normal"): GateLane => ({ key: q.name, priority, source: q });

describe("credit gate in virtual time", () => {
  const newScheduler = (): TestScheduler =>
    new TestScheduler((a, b) => {
      expect(a).to.deep.equal(b);
    });

  it("serves a trickle within one settlement of its arrival beside a deep backlog (3 credits, 10 ms per request)", () => {
    const ts = newScheduler();
    ts.run(() => {
      const burst = new VirtualQueue(ts, "burst");
      const trickle = new VirtualQueue(ts, "trickle");
      burst.arrive(0, 1_000, 1);
      trickle.arrive(25, 1, 5_000);
      trickle.arrive(75, 1, 5_001);
      const order: Array<{ at: number; subject: string }> = [];
      const sub = creditGate({ lanes: [lane(burst), lane(trickle)], maxUnsettled: 3, weights: { high: 8, normal: 4, low: 1 }, scheduler: ts }).subscribe((d) => {
        order.push({ at: ts.now(), subject: d.subject });
        ts.schedule(() => d.ack(), 10);
      });
      ts.schedule(() => sub.unsubscribe(), 200);
      ts.flush();
      const trickles = order.filter((o) => o.subject === "trickle").map((o) => o.at);
      // Each trickle request is taken at most one settlement (10 ms) after it arrived.
      expect(trickles).to.have.length(2);
      expect(trickles[0]! - 25).to.be.at.most(10);
      expect(trickles[1]! - 75).to.be.at.most(10);
      // The burst keeps the other two credits busy (20 rounds of 10 ms): the trickle's reserve
      // holds one credit while it waits.
      expect(order.filter((o) => o.subject === "burst").length).to.be.at.least(2 * 20 - 2);
    });
  });

  it("shares 8:4:1 between priorities with a backlog, and never holds more than the bound", () => {
    const ts = newScheduler();
    ts.run(() => {
      const qs = { high: new VirtualQueue(ts, "high"), normal: new VirtualQueue(ts, "normal"), low: new VirtualQueue(ts, "low") };
      for (const q of Object.values(qs)) q.arrive(0, 10_000, 1);
      const served = { high: 0, normal: 0, low: 0 } as Record<string, number>;
      let held = 0;
      let maxHeld = 0;
      const sub = creditGate({
        lanes: [lane(qs.high, "high"), lane(qs.normal, "normal"), lane(qs.low, "low")],
        maxUnsettled: 26,
        weights: { high: 8, normal: 4, low: 1 },
        scheduler: ts,
      }).subscribe((d) => {
        held++;
        maxHeld = Math.max(maxHeld, held);
        served[d.subject]!++;
        ts.schedule(() => {
          held--;
          d.ack();
        }, 5);
      });
      ts.schedule(() => sub.unsubscribe(), 1_000);
      ts.flush();
      expect(maxHeld).to.be.at.most(26);
      expect(served.high! / served.low!).to.be.within(6, 10);
      expect(served.normal! / served.low!).to.be.within(3, 5);
    });
  });

  it("retries a failing lane after a growing backoff, in virtual time, while the other lanes go on", () => {
    const ts = newScheduler();
    ts.run(() => {
      const down = new VirtualQueue(ts, "down");
      const up = new VirtualQueue(ts, "up");
      down.failNext = 3;
      down.arrive(0, 10, 1);
      up.arrive(0, 10_000, 1);
      const errors: number[] = [];
      const got = { up: 0, down: 0 } as Record<string, number>;
      // No jitter: the doubling alone (jitter only ever adds to it).
      const sub = creditGate({ lanes: [lane(down), lane(up)], maxUnsettled: 4, scheduler: ts, random: () => 0, onPullError: () => errors.push(ts.now()) }).subscribe((d) => {
        got[d.subject]!++;
        ts.schedule(() => d.ack(), 1);
      });
      ts.schedule(() => sub.unsubscribe(), 2_000);
      ts.flush();
      expect(errors).to.deep.equal([0, PULL_RETRY.baseMs, PULL_RETRY.baseMs * 3]);
      expect(down.pulls.map((p) => p.at).slice(0, 4)).to.deep.equal([0, 100, 300, 700]);
      // The healthy lane went on meanwhile; the failing one is served once it recovers.
      expect(got.up).to.be.greaterThan(1_000);
      expect(got.down).to.equal(10);
    });
  });

  it("tells the queue a held delivery is still worked on, every workingIntervalMs, until it is settled", () => {
    const ts = newScheduler();
    ts.run(() => {
      const q = new VirtualQueue(ts, "q");
      q.arrive(0, 1, 1);
      const seen: Delivery[] = [];
      const sub = creditGate({ lanes: [lane(q)], maxUnsettled: 2, workingIntervalMs: 100, scheduler: ts }).subscribe((d) => {
        seen.push(d);
        ts.schedule(() => d.ack(), 350);
      });
      ts.schedule(() => sub.unsubscribe(), 1_000);
      ts.flush();
      expect(seen).to.have.length(1);
      // Held from 0 to 350: told at 100, 200 and 300; not after it was settled.
      expect(q.handedOut[0]!.workingCalls).to.equal(3);
      expect(q.handedOut[0]!.settles).to.deep.equal(["ack"]);
    });
  });

  it("completes on drain once what it delivered is settled, and pulls nothing after", () => {
    const ts = newScheduler();
    ts.run(({ cold, expectObservable }) => {
      const q = new VirtualQueue(ts, "q");
      q.arrive(0, 3, 1);
      q.arrive(100, 3, 10);
      const drain = cold("50ms a");
      const gate = creditGate({ lanes: [lane(q)], maxUnsettled: 2, scheduler: ts, drain });
      const settledAt: number[] = [];
      const out = new Observable<string>((sub) =>
        gate.subscribe({
          next: (d) => {
            sub.next(String(d.seq));
            ts.schedule(() => {
              settledAt.push(ts.now());
              d.ack();
            }, 80);
          },
          complete: () => sub.complete(),
        }),
      );
      // Seqs 1 and 2 at once; each settles 80 ms later, at which point the drain (50 ms) has
      // stopped pulling: 3 and the later arrivals stay in the queue; completes at 80 ms.
      expectObservable(out).toBe("(ab) 76ms |", { a: "1", b: "2" });
    });
  });
});

describe("credit gate: lanes that join together", () => {
  /** A source that records what it is asked for and never answers. */
  const silent = (pulls: number[]): PullSource => ({
    pull: (n: number) =>
      new Observable<Delivery>(() => {
        pulls.push(n);
      }),
  });

  it("shares the first schedule between lanes added at once by weight, instead of giving the first all the credits", () => {
    const high: number[] = [];
    const normal: number[] = [];
    const low: number[] = [];
    const lanes: GateLane[] = [
      { key: "high", priority: "high", source: silent(high) },
      { key: "normal", priority: "normal", source: silent(normal) },
      { key: "low", priority: "low", source: silent(low) },
    ];
    const sub = creditGate({ maxUnsettled: 130, weights: { high: 8, normal: 4, low: 1 }, control: (ctl) => ctl.add(lanes) }).subscribe();
    sub.unsubscribe();
    expect([high[0], normal[0], low[0]]).to.deep.equal([80, 40, 10]);
  });

  it("gives one lane added alone every credit (the same lanes added one by one would not share)", () => {
    const only: number[] = [];
    const sub = creditGate({ maxUnsettled: 130, control: (ctl) => ctl.add({ key: "high", priority: "high", source: silent(only) }) }).subscribe();
    sub.unsubscribe();
    expect(only).to.deep.equal([130]);
  });
});

describe("credit gate: a lane's backlog from the consumer's pending count", () => {
  /** A message that carries the consumer's pending count after it, as JetStream's do. */
  class Counted extends VMsg {
    constructor(
      seq: number,
      override readonly pending: number,
    ) {
      super("q", seq);
    }
  }
  /** A source that hands out `stock` at once (up to what is asked) and records each pull. */
  const stocked = (stock: Counted[], pulls: Array<{ n: number; expiresMs: number }>): PullSource => ({
    pull: (n, expiresMs) =>
      new Observable<Delivery>((sub) => {
        pulls.push({ n, expiresMs });
        for (const m of stock.splice(0, n)) sub.next(m);
        if (pulls.length === 1) sub.complete(); // later pulls wait (nothing left)
      }),
  });

  it("ends a lane's backlog when its last message says nothing is left, even from a full pull", () => {
    const pulls: Array<{ n: number; expiresMs: number }> = [];
    const changes: boolean[] = [];
    const got: Delivery[] = [];
    // Exactly as many as asked for, the last one draining the consumer.
    const stock = [new Counted(1, 3), new Counted(2, 2), new Counted(3, 1), new Counted(4, 0)];
    const sub = creditGate({
      maxUnsettled: 4,
      expiresMs: 5_000,
      backlogExpiresMs: 1_000,
      lanes: [{ key: "q", priority: "normal", source: stocked(stock, pulls) }],
      onBacklogChange: (_l, b) => changes.push(b),
    }).subscribe((d) => got.push(d));
    expect(pulls[0]).to.deep.equal({ n: 4, expiresMs: 1_000 });
    for (const d of got) d.ack();
    // Added with a backlog (assumed); the full pull did not keep it: the next pull is an idle
    // lane's (long expiry).
    expect(changes).to.deep.equal([true, false]);
    expect(pulls[1]!.expiresMs).to.equal(5_000);
    sub.unsubscribe();
  });

  it("tells each change of a lane's backlog once, and false when it is removed", () => {
    const changes: Array<[string, boolean]> = [];
    let ctl: { remove(key: string): void } | undefined;
    const sub = creditGate({
      maxUnsettled: 4,
      control: (c) => {
        ctl = c;
        c.add({ key: "a", priority: "normal", source: stocked([new Counted(1, 5)], []) });
      },
      onBacklogChange: (l, b) => changes.push([l.key, b]),
    }).subscribe();
    ctl!.remove("a");
    // Added with a backlog (assumed); its message (more behind it) and its short pull (the count
    // says more waits) change nothing; removed.
    expect(changes).to.deep.equal([
      ["a", true],
      ["a", false],
    ]);
    sub.unsubscribe();
  });
});
