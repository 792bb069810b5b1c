import { expect } from "chai";
import { backoffMs, DEFAULT_BACKOFF_JITTER } from "../../../operators/support/backoff.js";

describe("backoffMs", () => {
  const b = { baseMs: 100, maxMs: 5_000 };

  it("doubles per attempt up to the cap, without jitter when jitter is 0", () => {
    const got = [0, 1, 2, 3, 4, 5, 6, 7].map((a) => backoffMs(a, { ...b, jitter: 0 }));
    expect(got).to.deep.equal([100, 200, 400, 800, 1_600, 3_200, 5_000, 5_000]);
  });

  it("adds at most the jitter fraction, and never less than the doubling", () => {
    expect(backoffMs(2, b, () => 0)).to.equal(400);
    expect(backoffMs(2, b, () => 0.5)).to.equal(Math.round(400 * (1 + DEFAULT_BACKOFF_JITTER * 0.5)));
    expect(backoffMs(10, { ...b, jitter: 0.5 }, () => 0.999)).to.equal(Math.round(5_000 * 1.4995));
  });

  it("spreads retries of the same attempt when the random source differs", () => {
    let i = 0;
    const random = (): number => [0.1, 0.4, 0.9][i++ % 3]!;
    const got = new Set([backoffMs(1, b, random), backoffMs(1, b, random), backoffMs(1, b, random)]);
    expect(got.size).to.equal(3);
    for (const d of got) expect(d).to.be.within(200, 200 * (1 + DEFAULT_BACKOFF_JITTER));
  });

  it("treats a negative or huge attempt as the first or the capped one", () => {
    expect(backoffMs(-3, { ...b, jitter: 0 })).to.equal(100);
    expect(backoffMs(1e9, { ...b, jitter: 0 })).to.equal(5_000);
  });
});
