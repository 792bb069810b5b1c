import { expect } from "chai";
import { schedule, wantsLane, type LaneState, type PullOrder, type SchedulePolicy } from "../../pipeline/intake/schedule.js";

const policy = (maxUnsettled: number): SchedulePolicy => ({ maxUnsettled, weights: { high: 8, normal: 4, low: 1 } });
const lane = (key: string, over: Partial<LaneState> = {}): LaneState => ({ key, priority: "normal", requested: 0, unsettled: 0, backlog: true, ...over });
const total = (orders: PullOrder[]): number => orders.reduce((a, o) => a + o.n, 0);
const nOf = (orders: PullOrder[], key: string): number => orders.find((o) => o.key === key)?.n ?? 0;

describe("intake schedule (pure policy)", () => {
  it("opens nothing when every credit is taken", () => {
    expect(schedule([lane("a", { unsettled: 10 })], policy(10))).to.deep.equal([]);
    expect(schedule([], policy(10))).to.deep.equal([]);
  });

  it("keeps a small reserve on each idle priority and nothing more", () => {
    const orders = schedule(
      [lane("h", { priority: "high", backlog: false }), lane("n", { backlog: false }), lane("l", { priority: "low", backlog: false })],
      policy(104),
    );
    // Shares 64:32:8, reserves an eighth of each.
    expect(orders).to.deep.equal([
      { key: "h", n: 8, backlog: false },
      { key: "n", n: 4, backlog: false },
      { key: "l", n: 1, backlog: false },
    ]);
  });

  it("splits the credits 8:4:1 between priorities that all have a backlog", () => {
    const orders = schedule([lane("h", { priority: "high" }), lane("n"), lane("l", { priority: "low" })], policy(130));
    expect(nOf(orders, "h")).to.equal(80);
    expect(nOf(orders, "n")).to.equal(40);
    expect(nOf(orders, "l")).to.equal(10);
  });

  it("lends what an idle priority does not use to the busy ones", () => {
    const orders = schedule([lane("h", { priority: "high", backlog: false }), lane("l", { priority: "low" })], policy(130));
    const reserve = nOf(orders, "h");
    expect(reserve).to.be.greaterThan(0);
    expect(nOf(orders, "l")).to.equal(130 - reserve);
  });

  it("gives each lane of a priority an equal share, and no lane with a backlog none", () => {
    const lanes = Array.from({ length: 300 }, (_, i) => lane(`t${i}`));
    const orders = schedule(lanes, policy(256));
    expect(total(orders)).to.equal(256);
    // 256 credits over 300 lanes: everyone below its share gets one before anyone gets two.
    expect(Math.max(...orders.map((o) => o.n))).to.equal(1);
    const few = schedule([lane("a"), lane("b"), lane("c"), lane("d")], policy(256));
    expect(few.map((o) => o.n)).to.deep.equal([64, 64, 64, 64]);
  });

  it("counts what a lane already holds: the one over its share waits, the others catch up", () => {
    const orders = schedule([lane("burst", { unsettled: 90 }), lane("trickle")], policy(100));
    expect(nOf(orders, "burst")).to.equal(0);
    expect(nOf(orders, "trickle")).to.equal(10);
  });

  it("shares by cost: a lane whose requests cost twice as much gets half as many", () => {
    const orders = schedule([lane("cheap"), lane("dear", { cost: 2 })], policy(90));
    expect(nOf(orders, "cheap")).to.equal(60);
    expect(nOf(orders, "dear")).to.equal(30);
    // A nonsensical cost counts as 1.
    const odd = schedule([lane("a"), lane("b", { cost: 0 }), lane("c", { cost: Number.NaN })], policy(90));
    expect(odd.map((o) => o.n)).to.deep.equal([30, 30, 30]);
  });

  it("skips blocked lanes and lanes that keep no reserve", () => {
    const orders = schedule([lane("down", { blocked: true }), lane("quiet", { backlog: false, reserve: false }), lane("up")], policy(20));
    expect(orders).to.deep.equal([{ key: "up", n: 20, backlog: true }]);
  });

  it("asks again for a lane with a pull open only for a good part of its share", () => {
    // 4 of 100 free: less than a quarter of the lane's share, and it has a pull open.
    expect(schedule([lane("a", { requested: 50, unsettled: 46 })], policy(100))).to.deep.equal([]);
    expect(nOf(schedule([lane("a", { requested: 10, unsettled: 40 })], policy(100)), "a")).to.equal(50);
  });

  it("never asks for more than the free credits (random states)", () => {
    let seed = 42;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    const prios = ["high", "normal", "low"] as const;
    for (let round = 0; round < 2_000; round++) {
      const max = 1 + rnd(300);
      const lanes: LaneState[] = [];
      let used = 0;
      for (let i = 0, n = rnd(12); i < n; i++) {
        const requested = rnd(Math.max(1, Math.floor((max - used) / 2)));
        const unsettled = rnd(Math.max(1, max - used - requested));
        used += requested + unsettled;
        const counter = rnd(3) === 0 ? { counter: rnd(10_000) } : {};
        lanes.push(lane(`l${i}`, { priority: prios[rnd(3)]!, requested, unsettled, backlog: rnd(2) === 0, blocked: rnd(5) === 0, cost: 1 + rnd(4), ...counter }));
      }
      const orders = schedule(lanes, policy(max));
      const free = max - lanes.reduce((a, l) => a + l.requested + l.unsettled, 0);
      expect(total(orders)).to.be.at.most(Math.max(0, free));
      for (const o of orders) {
        expect(o.n).to.be.greaterThan(0);
        const l = lanes.find((x) => x.key === o.key)!;
        expect(l.blocked).to.not.equal(true);
      }
      expect(new Set(orders.map((o) => o.key)).size).to.equal(orders.length);
      // A free credit with a busy, unblocked lane holding nothing is never left unused (lanes
      // with token counters may keep it for the lowest counter's open pull).
      if (free > 0 && lanes.some((l) => l.backlog && l.blocked !== true && l.requested + l.unsettled === 0 && l.counter === undefined)) expect(total(orders)).to.be.greaterThan(0);
    }
  });

  it("gives a lane to a tenant flooding beside others only", () => {
    const base = { tenantCount: 20, window: 32, windowFull: true, backlog: 1_000, minBacklog: 256, lanes: 0, maxLanes: 16, othersActive: true };
    expect(wantsLane(base)).to.equal(true);
    expect(wantsLane({ ...base, othersActive: false }), "alone in its priority").to.equal(false);
    expect(wantsLane({ ...base, tenantCount: 16 }), "half the window: two equal floods").to.equal(false);
    expect(wantsLane({ ...base, backlog: 255 }), "no backlog behind it").to.equal(false);
    expect(wantsLane({ ...base, windowFull: false }), "too few seen yet").to.equal(false);
    expect(wantsLane({ ...base, lanes: 16 }), "lanes capped").to.equal(false);
  });
});
