import { expect } from "chai";
import { byLowestCounter } from "../../pipeline/intake/token-order.js";
import { schedule, type LaneState, type PullOrder, type SchedulePolicy } from "../../pipeline/intake/schedule.js";

const policy = (maxUnsettled: number): SchedulePolicy => ({ maxUnsettled, weights: { high: 8, normal: 4, low: 1 } });
const lane = (key: string, over: Partial<LaneState> = {}): LaneState => ({ key, priority: "normal", requested: 0, unsettled: 0, backlog: true, ...over });
const nOf = (orders: PullOrder[], key: string): number => orders.find((o) => o.key === key)?.n ?? 0;

/**
 * Two always-backlogged tenant lanes, long (requests of 400 tokens) and short (40), served by a
 * device that finishes one request of each tenant per step (as the batcher picks one request per
 * tenant in turn): the long tenant's requests leave ten times sooner for their tokens than the
 * short one's. Pulls fill at once; each admitted request charges its tenant's counter. Returns
 * the device tokens each tenant got.
 */
function simulate(withCounters: boolean, steps: number, maxUnsettled = 32): { long: number; short: number } {
  const cost = { long: 400, short: 40 };
  const counter = { long: 0, short: 0 };
  const held = { long: 0, short: 0 };
  const served = { long: 0, short: 0 };
  const tenants = ["long", "short"] as const;
  for (let s = 0; s < steps; s++) {
    const states = tenants.map((t) => lane(t, { unsettled: held[t], cost: cost[t], ...(withCounters ? { counter: counter[t] } : {}) }));
    for (const o of schedule(states, policy(maxUnsettled))) {
      const t = o.key as (typeof tenants)[number];
      held[t] += o.n;
      counter[t] += o.n * cost[t];
    }
    for (const t of tenants) {
      if (held[t] === 0) continue;
      held[t]--;
      served[t] += cost[t];
    }
  }
  return served;
}

describe("token order (virtual token counters)", () => {
  it("gives each credit to the lowest counter, counting what outstanding credits will bring", () => {
    expect(byLowestCounter([{ key: "a", counter: 1_000, cost: 100, requested: 0 }, { key: "b", counter: 600, cost: 100, requested: 0 }], 6)).to.deep.equal([1, 5]);
    // b's 4 outstanding credits will bring 400 tokens: level with a.
    expect(byLowestCounter([{ key: "a", counter: 1_000, cost: 100, requested: 0 }, { key: "b", counter: 600, cost: 100, requested: 4 }], 2)).to.deep.equal([1, 1]);
    expect(byLowestCounter([], 5)).to.deep.equal([]);
  });

  it("gives a tenant with 10x costlier requests a tenth of the credits, the same tokens", () => {
    const given = byLowestCounter([{ key: "long", counter: 0, cost: 400, requested: 0 }, { key: "short", counter: 0, cost: 40, requested: 0 }], 110);
    expect(given).to.deep.equal([10, 100]);
    // A nonsensical cost counts as 1.
    expect(byLowestCounter([{ key: "a", counter: 0, cost: Number.NaN, requested: 0 }, { key: "b", counter: 0, cost: 0, requested: 0 }], 4)).to.deep.equal([2, 2]);
  });

  it("schedule: lanes with counters share their part by the counters; the one behind catches up first", () => {
    const orders = schedule([lane("ahead", { counter: 10_000, cost: 100 }), lane("behind", { counter: 2_000, cost: 100 })], policy(100));
    expect(nOf(orders, "behind")).to.equal(90);
    expect(nOf(orders, "ahead")).to.equal(10);
  });

  it("schedule: the shared consumer keeps its share by cost beside lanes with counters", () => {
    const withCounters = schedule([lane("normal", { cost: 0.5 }), lane("a", { counter: 0 }), lane("b", { counter: 0 })], policy(100));
    const byCost = schedule([lane("normal", { cost: 0.5 }), lane("a"), lane("b")], policy(100));
    expect(nOf(withCounters, "normal")).to.equal(nOf(byCost, "normal"));
    expect(nOf(withCounters, "a") + nOf(withCounters, "b")).to.equal(nOf(byCost, "a") + nOf(byCost, "b"));
  });

  it("schedule: credits the lowest lane cannot take yet (its pull is open) wait for it, not for a lane ahead of it", () => {
    // 2 free; "low" has a pull open and 2 is too few to open another; "high" is ahead.
    const orders = schedule([lane("low", { counter: 0, requested: 40, unsettled: 30 }), lane("high", { counter: 50_000, unsettled: 28 })], policy(100));
    expect(nOf(orders, "high")).to.equal(0);
    // Once its pull has ended it takes them.
    const later = schedule([lane("low", { counter: 0, unsettled: 70 }), lane("high", { counter: 50_000, unsettled: 28 })], policy(100));
    expect(nOf(later, "low")).to.equal(2);
  });

  it("evens out the device tokens even when one tenant's requests finish ten times sooner for their tokens; sharing by cost alone does not", () => {
    const vtc = simulate(true, 4_000);
    const byCost = simulate(false, 4_000);
    const r = vtc.long / vtc.short;
    expect(r).to.be.within(0.95, 1.05);
    expect(byCost.long / byCost.short).to.be.greaterThan(1.25);
  });
});
