/** The byte bound on large bodies: never over the limit, first come first served, a too-large body alone. */
import { expect } from "chai";
import fc from "fast-check";
import { ByteGate } from "../../pipeline/payloads/byte-gate.js";

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

describe("ByteGate", () => {
  it("grants what fits at once and makes the rest wait, in order, until bytes are given back", async () => {
    const gate = new ByteGate(10);
    const order: string[] = [];
    const a = await gate.reserve(6);
    const pb = gate.reserve(6).then((r) => (order.push("b"), r));
    const pc = gate.reserve(1).then((r) => (order.push("c"), r));
    await tick();
    // c would fit, but b came first: no overtaking (a large body is not starved by small ones).
    expect(order).to.deep.equal([]);
    expect(gate.waitingCount).to.equal(2);
    a();
    const b = await pb;
    const c = await pc;
    expect(order).to.deep.equal(["b", "c"]);
    expect(gate.heldBytes).to.equal(7);
    b();
    b(); // twice is once
    c();
    expect(gate.heldBytes).to.equal(0);
    expect(gate.peakBytes).to.equal(7);
  });

  it("serves a body larger than the whole limit alone, rather than never", async () => {
    const gate = new ByteGate(10);
    const small = await gate.reserve(3);
    let got = false;
    const big = gate.reserve(50).then((r) => ((got = true), r));
    await tick();
    expect(got).to.equal(false);
    small();
    (await big)();
    expect(gate.peakBytes).to.equal(10);
  });

  it("never holds more than its limit, whatever the sizes and release order (property)", async () => {
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1, max: 100 }), fc.array(fc.integer({ min: 0, max: 150 }), { maxLength: 30 }), async (limit, sizes) => {
        const gate = new ByteGate(limit);
        const releases = await Promise.all(
          sizes.map(async (s) => {
            const r = await gate.reserve(s);
            expect(gate.heldBytes).to.be.at.most(limit);
            await tick();
            r();
            return r;
          }),
        );
        expect(releases).to.have.length(sizes.length);
        expect(gate.heldBytes).to.equal(0);
        expect(gate.peakBytes).to.be.at.most(limit);
      }),
      { numRuns: 100 },
    );
  });
});
