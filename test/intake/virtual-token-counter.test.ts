import { expect } from "chai";
import { VirtualTokenCounter } from "../../pipeline/intake/virtual-token-counter.js";
import { estimateTokens, usedTokens } from "../../pipeline/intake/token-cost.js";

/** Serves two always-backlogged tenants through `rounds` allocations of `credits`, charging each credit its tenant's cost. */
function serve(vtc: VirtualTokenCounter, costs: Record<string, number>, rounds: number, credits: number): Record<string, { requests: number; tokens: number }> {
  const out: Record<string, { requests: number; tokens: number }> = {};
  for (const t of Object.keys(costs)) out[t] = { requests: 0, tokens: 0 };
  for (let r = 0; r < rounds; r++) {
    vtc.setActive(Object.keys(costs));
    const tenants = Object.keys(costs);
    const given = vtc.allocate(
      tenants.map((tenant) => ({ tenant, want: credits })),
      credits,
    );
    for (const [i, n] of given.entries()) {
      const t = tenants[i]!;
      for (let i = 0; i < n; i++) vtc.charge(t, costs[t]!);
      out[t]!.requests += n;
      out[t]!.tokens += n * costs[t]!;
    }
  }
  return out;
}

describe("VirtualTokenCounter", () => {
  it("splits credits evenly between tenants whose requests cost the same", () => {
    const vtc = new VirtualTokenCounter();
    const s = serve(vtc, { a: 100, b: 100 }, 50, 8);
    // The first round gives each its first credits only (costs not known yet); then 4 each a round.
    expect(s["a"]!.requests).to.equal(2 + 49 * 4);
    expect(s["b"]!.requests).to.equal(2 + 49 * 4);
  });

  it("gives a tenant with 10x longer requests a tenth of the requests and the same tokens, within one request", () => {
    const vtc = new VirtualTokenCounter();
    const s = serve(vtc, { long: 4_000, short: 400 }, 200, 8);
    // 1,600 credits: tokens even within one long request (the granularity of a credit).
    expect(Math.abs(s["long"]!.tokens - s["short"]!.tokens)).to.be.at.most(4_000 + 400);
    expect(s["short"]!.requests).to.be.within(9 * s["long"]!.requests, 11 * s["long"]!.requests);
  });

  it("hands credits to the lowest counter first, and never more than a tenant wants", () => {
    const vtc = new VirtualTokenCounter({ defaultRequestTokens: 10 });
    vtc.charge("a", 100);
    vtc.charge("b", 10);
    vtc.setActive(["a", "b"]);
    const given = vtc.allocate([{ tenant: "a", want: 5 }, { tenant: "b", want: 2 }], 6);
    // b (10, costing 10) takes 2 and is full; the rest go to a.
    expect(given).to.deep.equal([4, 2]);
    expect(vtc.allocate([{ tenant: "a", want: 0 }], 5)).to.deep.equal([0]);
  });

  it("counts outstanding credits at the tenant's expected cost", () => {
    const vtc = new VirtualTokenCounter();
    vtc.charge("a", 10);
    vtc.charge("b", 10);
    vtc.setActive(["a", "b"]);
    // a holds 3 credits not yet delivered (3 x 10 expected): b gets the next three.
    const given = vtc.allocate([{ tenant: "a", want: 10, outstanding: 3 }, { tenant: "b", want: 10 }], 3);
    expect(given).to.deep.equal([0, 3]);
  });

  it("gives nobody credits ahead of a tenant that is lowest but cannot take them now (blocked)", () => {
    const vtc = new VirtualTokenCounter();
    vtc.charge("a", 100);
    vtc.charge("b", 100);
    vtc.setActive(["a", "b"]);
    // a at 100; b at 100 plus one outstanding credit (100) = 200: a takes one (200), wins the
    // tie by order (300), then b is lowest and pulling: nobody else goes ahead of its turn.
    expect(vtc.allocate([{ tenant: "a", want: 10 }, { tenant: "b", want: 0, outstanding: 1, blocked: true }], 10)).to.deep.equal([2, 0]);
    vtc.charge("a", 100);
    vtc.charge("a", 100); // a at 300: above b's 200, so a gets nothing
    expect(vtc.allocate([{ tenant: "a", want: 10 }, { tenant: "b", want: 0, outstanding: 1, blocked: true }], 10)).to.deep.equal([0, 0]);
    // Not blocked (all its work is outstanding): no barrier.
    expect(vtc.allocate([{ tenant: "a", want: 10 }, { tenant: "b", want: 0, outstanding: 1 }], 10)).to.deep.equal([10, 0]);
  });

  it("corrects an estimate by the tokens used, and refunds a request that did not run", () => {
    const vtc = new VirtualTokenCounter();
    vtc.charge("a", 1_000);
    vtc.correct("a", 1_000, 600);
    expect(vtc.counter("a")).to.equal(600);
    vtc.charge("a", 500);
    vtc.correct("a", 500, 0);
    expect(vtc.counter("a")).to.equal(600);
    vtc.correct("nobody", 10, 5);
    expect(vtc.counter("nobody")).to.equal(0);
  });

  it("raises a tenant that comes back after idling to the lowest counter of the busy ones (no saved-up share)", () => {
    const vtc = new VirtualTokenCounter();
    serve(vtc, { busy: 100 }, 10, 10); // busy alone: 2 + 9 x 10 requests of 100 tokens
    expect(vtc.counter("busy")).to.equal(9_200);
    vtc.charge("back", 100); // its cost is known (it worked long ago)
    vtc.setActive(["busy", "back"]);
    const given = vtc.allocate([{ tenant: "busy", want: 10 }, { tenant: "back", want: 10 }], 10);
    expect(vtc.counter("back")).to.equal(9_200);
    // Level: they share, instead of the newcomer taking all ten.
    expect(given[1]).to.be.within(4, 6);
    expect(given[0]).to.be.within(4, 6);
  });

  it("lets a tenant that stays busy keep its lead over one that went idle and came back below it", () => {
    const vtc = new VirtualTokenCounter();
    vtc.charge("a", 50);
    vtc.setActive(["a", "b"]);
    vtc.charge("b", 500);
    // b goes idle, a keeps working, b comes back: b keeps its higher counter (never lowered).
    vtc.setActive(["a"]);
    vtc.setActive(["a", "b"]);
    expect(vtc.counter("b")).to.equal(500);
  });

  it("hold/release: raises a tenant only when it comes back from having nothing held, to the lowest active counter", () => {
    const vtc = new VirtualTokenCounter();
    vtc.hold("a"); // nobody else active: it keeps its own
    vtc.charge("a", 1_000);
    vtc.hold("b"); // comes while a is active: raised to a's 1,000
    expect(vtc.counter("b")).to.equal(1_000);
    vtc.charge("b", 100);
    vtc.charge("a", 5_000);
    // b stays active while anything of it is held (two reasons, one gone): never raised.
    vtc.hold("b");
    vtc.release("b");
    vtc.hold("b");
    expect(vtc.counter("b")).to.equal(1_100);
    expect(vtc.isActive("b")).to.equal(true);
    // Both reasons gone: idle; back, it is raised to a's 6,000 (no share saved up while idle).
    vtc.release("b");
    vtc.release("b");
    expect(vtc.isActive("b")).to.equal(false);
    vtc.hold("b");
    expect(vtc.counter("b")).to.equal(6_000);
    // A release without a hold changes nothing.
    vtc.release("c");
    expect(vtc.isActive("c")).to.equal(false);
  });

  it("gives a tenant whose cost is not known yet only its first credits, outstanding ones included", () => {
    const vtc = new VirtualTokenCounter({ firstCredits: 3 });
    vtc.charge("known", 10);
    vtc.setActive(["known", "new"]);
    expect(vtc.allocate([{ tenant: "new", want: 50 }, { tenant: "known", want: 50 }], 20)).to.deep.equal([3, 17]);
    expect(vtc.allocate([{ tenant: "new", want: 50, outstanding: 2 }], 20)).to.deep.equal([1]);
    expect(vtc.allocate([{ tenant: "new", want: 50, outstanding: 3 }], 20)).to.deep.equal([0]);
    vtc.charge("new", 10);
    expect(vtc.allocate([{ tenant: "new", want: 50, outstanding: 3 }], 20)).to.deep.equal([20]);
  });

  it("forgets idle tenants beyond its bound, lowest counters first", () => {
    const vtc = new VirtualTokenCounter({ maxIdleTenants: 2 });
    for (const [t, n] of [["x", 1], ["y", 2], ["z", 3]] as const) vtc.charge(t, n);
    vtc.setActive(["w"]);
    expect(vtc.counter("x")).to.equal(0);
    expect(vtc.counter("y")).to.equal(2);
    expect(vtc.counter("z")).to.equal(3);
  });

  it("keeps the mean request cost over tenants as they come, change and are forgotten", () => {
    const vtc = new VirtualTokenCounter({ maxIdleTenants: 8, meanWeight: 1 });
    vtc.charge("a", 100);
    vtc.charge("b", 300);
    expect(vtc.expectedCost("new")).to.equal(200);
    expect(vtc.expectedCostExcept(new Set(["a"]))).to.equal(300);
    vtc.charge("a", 500);
    expect(vtc.expectedCost("new")).to.equal(400);
    // Nobody left outside the set: the mean over all.
    expect(vtc.expectedCostExcept(new Set(["a", "b"]))).to.equal(400);
    for (let i = 0; i < 10; i++) vtc.charge(`t${i}`, 1_000);
    // 12 idle tenants over a bound of 8: the lowest counters (b, a, then three t) are forgotten,
    // down to 7, and the mean is of those kept.
    vtc.setActive([]);
    expect(vtc.counter("a")).to.equal(0);
    expect(vtc.counter("b")).to.equal(0);
    expect(Array.from({ length: 10 }, (_, i) => vtc.counter(`t${i}`)).filter((n) => n > 0)).to.have.length(7);
    expect(vtc.expectedCost("new")).to.equal(1_000);
  });

  it("answers the mean cost outside a set as a count over every tenant would", () => {
    let seed = 7;
    const random = (): number => ((seed = (seed * 1_103_515_245 + 12_345) % 2 ** 31) / 2 ** 31);
    const vtc = new VirtualTokenCounter({ meanWeight: 0.3 });
    const means = new Map<string, number>();
    for (let step = 0; step < 2_000; step++) {
      const t = `t${Math.floor(random() * 50)}`;
      const tokens = Math.floor(random() * 4_000);
      const m = means.get(t);
      means.set(t, m === undefined ? tokens : m + 0.3 * (tokens - m));
      vtc.charge(t, tokens);
      if (step % 97 === 0) {
        const except = new Set([...means.keys()].filter(() => random() < 0.2));
        const rest = [...means].filter(([k]) => !except.has(k)).map(([, v]) => v);
        const naive = rest.length > 0 ? rest.reduce((a, b) => a + b, 0) / rest.length : [...means.values()].reduce((a, b) => a + b, 0) / means.size;
        expect(vtc.expectedCostExcept(except)).to.be.closeTo(naive, 1e-6);
      }
    }
  });

  it("rejects nonsense options", () => {
    expect(() => new VirtualTokenCounter({ defaultRequestTokens: 0 })).to.throw(RangeError, /defaultRequestTokens/);
    expect(() => new VirtualTokenCounter({ meanWeight: 2 })).to.throw(RangeError, /meanWeight/);
  });
});

describe("token cost", () => {
  it("estimates prompt and inputs at 4 characters a token, plus max_tokens", () => {
    expect(estimateTokens({ prompt: "x".repeat(400) })).to.equal(100);
    expect(estimateTokens({ prompt: "x".repeat(400), parameters: { max_tokens: 64 } })).to.equal(164);
    expect(estimateTokens({ inputs: { a: "12345678" } })).to.equal(4); // {"a":"12345678"} is 16 characters
    expect(estimateTokens({})).to.equal(1);
    expect(estimateTokens({ prompt: "", parameters: { max_tokens: "lots" } })).to.equal(1);
  });

  it("takes the tokens used from an ok result; nothing for errors and cache hits", () => {
    expect(usedTokens({ id: "a", status: "ok", usage: { prompt_tokens: 7, completion_tokens: 3 } })).to.equal(10);
    expect(usedTokens({ id: "a", status: "error", usage: { prompt_tokens: 7, completion_tokens: 3 } })).to.equal(0);
    expect(usedTokens({ id: "a", status: "ok", usage: { prompt_tokens: 7, completion_tokens: 3 }, timing: { queue_ms: 0, batch_size: 0, worker_ms: 0, total_ms: 0, cache: "hit" } })).to.equal(0);
    expect(usedTokens({ id: "a", status: "ok" })).to.equal(undefined);
    expect(usedTokens(undefined)).to.equal(0);
  });
});
