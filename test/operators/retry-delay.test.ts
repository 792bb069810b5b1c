import { expect } from "chai";
import { DEFAULT_RETRY_BASE_MS, DEFAULT_RETRY_MAX_MS, retryDelayMs, retryDelays } from "../../operators/outcome.js";
import { DEFAULT_BACKOFF_JITTER } from "../../operators/support/backoff.js";

describe("redelivery delays (nak): doubling with jitter", () => {
  const BASE = 100;
  const MAX = 5_000;
  const doubling = (n: number): number => Math.min(MAX, BASE * 2 ** (n - 1));

  it("stays within [doubling, doubling × (1 + jitter)] for every delivery count and draw", () => {
    for (let n = 1; n <= 12; n++) {
      for (const r of [0, 0.25, 0.5, 0.75, 0.999999]) {
        const d = retryDelayMs(n, BASE, MAX, DEFAULT_BACKOFF_JITTER, () => r);
        expect(d, `delivery ${n}, draw ${r}`).to.be.at.least(doubling(n));
        expect(d, `delivery ${n}, draw ${r}`).to.be.at.most(Math.round(doubling(n) * (1 + DEFAULT_BACKOFF_JITTER)));
      }
    }
    expect(retryDelayMs(3, BASE, MAX, DEFAULT_BACKOFF_JITTER, () => 0)).to.equal(doubling(3));
    expect(retryDelayMs(3, BASE, MAX, DEFAULT_BACKOFF_JITTER, () => 0.999999)).to.equal(Math.round(doubling(3) * (1 + DEFAULT_BACKOFF_JITTER)));
  });

  it("jitters by default, so that messages naked together come back spread out; 0 gives the exact doubling", () => {
    const delay = retryDelays({ retryBaseMs: BASE, retryMaxMs: MAX });
    const drawn = Array.from({ length: 200 }, () => delay(2));
    for (const d of drawn) expect(d).to.be.within(doubling(2), Math.round(doubling(2) * (1 + DEFAULT_BACKOFF_JITTER)));
    expect(new Set(drawn).size).to.be.greaterThan(1);
    const exact = retryDelays({ retryBaseMs: BASE, retryMaxMs: MAX, retryJitter: 0 });
    expect([1, 2, 3, 7, 20].map(exact)).to.deep.equal([1, 2, 3, 7, 20].map(doubling));
  });

  it("uses the default base and cap where the options leave them out", () => {
    const exact = retryDelays({ retryJitter: 0 });
    expect(exact(1)).to.equal(DEFAULT_RETRY_BASE_MS);
    expect(exact(50)).to.equal(DEFAULT_RETRY_MAX_MS);
  });
});
