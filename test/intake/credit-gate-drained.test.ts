/**
 * The credit gate in virtual time when a lane runs dry under an open pull: the credits its pull
 * does not need come back at once (the consumer said it has nothing pending), and a message the
 * server still gives that pull is kept, never naked.
 */
import { expect } from "chai";
import { Observable, type SchedulerLike } from "rxjs";
import { TestScheduler } from "rxjs/testing";
import { creditGate } from "../../pipeline/intake/credit-gate.js";
import { DEFAULT_BACKLOG_EXPIRES_MS, type GateLane } from "../../pipeline/intake/gate-options.js";
import type { PullSource } from "../../pipeline/intake/pull-source.js";
import type { Delivery } from "../../operators/types.js";
import { RecordingDelivery } from "../support/deliveries.js";
import type { Priority } from "../../proto/wire.js";

const VMsg = RecordingDelivery;
type VMsg = RecordingDelivery;

/**
 * A consumer in virtual time as the server runs one: a pull waits until it has its n messages or
 * expires, the oldest waiting pull is filled first, and each message says how many are left.
 */
class VirtualConsumer implements PullSource {
  private readonly waiting: VMsg[] = [];
  private readonly pullers = new Set<() => void>();
  readonly handedOut: VMsg[] = [];
  constructor(
    private readonly scheduler: SchedulerLike,
    readonly name: string,
  ) {}
  arrive(at: number, count: number, firstSeq: number): void {
    this.scheduler.schedule(() => {
      for (let i = 0; i < count; i++) this.waiting.push(new VMsg(this.name, firstSeq + i));
      for (const give of [...this.pullers]) give();
    }, at);
  }
  pull(max: number, expiresMs: number): Observable<Delivery> {
    return new Observable<Delivery>((sub) => {
      let got = 0;
      const give = (): void => {
        while (got < max && this.waiting.length > 0) {
          const m = this.waiting.shift()!;
          m.pending = this.waiting.length;
          m.pulledAtMs = this.scheduler.now();
          this.handedOut.push(m);
          got++;
          sub.next(m);
        }
        if (got >= max) sub.complete();
      };
      this.pullers.add(give);
      const expiry = this.scheduler.schedule(() => sub.complete(), expiresMs);
      give();
      return () => {
        this.pullers.delete(give);
        expiry.unsubscribe();
      };
    });
  }
}

const lane = (q: VirtualConsumer, priority: Priority, reserve?: boolean): GateLane => ({ key: q.name, priority, source: q, ...(reserve !== undefined ? { reserve } : {}) });
const newScheduler = (): TestScheduler =>
  new TestScheduler((a, b) => {
    expect(a).to.deep.equal(b);
  });

describe("credit gate in virtual time: a lane that runs dry under an open pull", () => {
  const MAX = 64;
  const WEIGHTS = { high: 8, normal: 4, low: 1 };

  it("gives the other priority the drained one's unused credits at once, not when its pull expires", () => {
    const ts = newScheduler();
    ts.run(() => {
      const high = new VirtualConsumer(ts, "high");
      const normal = new VirtualConsumer(ts, "normal");
      // A few high requests beside a deep normal backlog: high's first pull (two thirds of the
      // credits) gets 4 and runs dry.
      high.arrive(0, 4, 1);
      normal.arrive(0, 100_000, 1_000);
      const unsettled: Record<string, number> = { high: 0, normal: 0 };
      let peakNormal = 0;
      let peakTotal = 0;
      const sub = creditGate({
        lanes: [lane(high, "high"), lane(normal, "normal")],
        maxUnsettled: MAX,
        weights: WEIGHTS,
        scheduler: ts,
        onUnsettledChange: (p, n) => {
          unsettled[p] = n;
          peakTotal = Math.max(peakTotal, unsettled.high! + unsettled.normal!);
          if (ts.now() < DEFAULT_BACKLOG_EXPIRES_MS) peakNormal = Math.max(peakNormal, unsettled.normal!);
        },
      }).subscribe((d) => {
        ts.schedule(() => d.ack(), 10);
      });
      ts.schedule(() => sub.unsubscribe(), DEFAULT_BACKLOG_EXPIRES_MS / 2);
      ts.flush();
      // Before high's first pull expires, normal holds all the credits but high's reserve (an
      // eighth of high's share: 5); holding the drained pull's 38 unused credits, it got 26.
      expect(peakNormal).to.be.at.least(MAX - Math.ceil((MAX * 8) / 12 / 8));
      expect(peakTotal).to.be.at.most(MAX);
      expect(high.handedOut.map((m) => m.settles)).to.deep.equal([["ack"], ["ack"], ["ack"], ["ack"]]);
    });
  });

  it("keeps a message the server gives the dry pull after it handed its credits back, and stays within the bound", () => {
    const ts = newScheduler();
    ts.run(() => {
      const high = new VirtualConsumer(ts, "high");
      const normal = new VirtualConsumer(ts, "normal");
      high.arrive(0, 4, 1);
      // Arrive while high's first pull is still open: the server fills that pull first.
      high.arrive(200, 3, 5);
      normal.arrive(0, 100_000, 1_000);
      const unsettled: Record<string, number> = { high: 0, normal: 0 };
      let peakTotal = 0;
      const taken: Array<{ seq: number; at: number }> = [];
      const sub = creditGate({
        lanes: [lane(high, "high"), lane(normal, "normal")],
        maxUnsettled: MAX,
        weights: WEIGHTS,
        scheduler: ts,
        onUnsettledChange: (p, n) => {
          unsettled[p] = n;
          peakTotal = Math.max(peakTotal, unsettled.high! + unsettled.normal!);
        },
      }).subscribe((d) => {
        if (d.subject === "high") taken.push({ seq: d.seq, at: ts.now() });
        ts.schedule(() => d.ack(), 10);
      });
      ts.schedule(() => sub.unsubscribe(), DEFAULT_BACKLOG_EXPIRES_MS / 2);
      ts.flush();
      // Each late high request is taken on its first delivery (none naked), at once: it takes
      // a credit the high lane's reserve pull held, or one freed by normal's next settlement.
      expect(high.handedOut.map((m) => m.seq)).to.deep.equal([1, 2, 3, 4, 5, 6, 7]);
      expect(high.handedOut.every((m) => m.settles.length === 1 && m.settles[0] === "ack")).to.equal(true);
      expect(taken.filter((t) => t.seq >= 5).map((t) => t.at)).to.deep.equal([200, 200, 200]);
      expect(peakTotal).to.be.at.most(MAX);
    });
  });

  it("holds a message the dry pull gets while no credit is free until one is, then takes it (never naked)", () => {
    const ts = newScheduler();
    ts.run(() => {
      // No reserve pull for high: the late message finds no credit held for its lane, and normal's
      // backlog holds every other one.
      const high = new VirtualConsumer(ts, "high");
      const normal = new VirtualConsumer(ts, "normal");
      high.arrive(0, 4, 1);
      high.arrive(200, 1, 5);
      normal.arrive(0, 100_000, 1_000);
      const unsettled: Record<string, number> = { high: 0, normal: 0 };
      let peakTotal = 0;
      let fullAt200 = false;
      const taken: Array<{ seq: number; at: number }> = [];
      const sub = creditGate({
        lanes: [lane(high, "high", false), lane(normal, "normal")],
        maxUnsettled: MAX,
        weights: WEIGHTS,
        scheduler: ts,
        onUnsettledChange: (p, n) => {
          unsettled[p] = n;
          peakTotal = Math.max(peakTotal, unsettled.high! + unsettled.normal!);
        },
      }).subscribe((d) => {
        if (d.subject === "high") taken.push({ seq: d.seq, at: ts.now() });
        ts.schedule(() => d.ack(), 10);
      });
      ts.schedule(() => {
        fullAt200 = unsettled.normal === MAX;
      }, 199);
      ts.schedule(() => sub.unsubscribe(), DEFAULT_BACKLOG_EXPIRES_MS / 2);
      ts.flush();
      expect(fullAt200, "normal held every credit when the late high request came").to.equal(true);
      expect(high.handedOut.map((m) => [m.seq, m.settles])).to.deep.equal([
        [1, ["ack"]],
        [2, ["ack"]],
        [3, ["ack"]],
        [4, ["ack"]],
        [5, ["ack"]],
      ]);
      // It waited for the next settlement of normal's (10 ms each), not for its pull to expire.
      const late = taken.find((t) => t.seq === 5)!;
      expect(late.at).to.be.within(200, 210);
      expect(peakTotal).to.be.at.most(MAX);
    });
  });
});
