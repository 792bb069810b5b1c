import { expect } from "chai";
import fc from "fast-check";
import { attributePending, DeliveryMix, modelOfSubject, ModelBacklog, UNATTRIBUTED_MODEL } from "../pipeline/telemetry/model-backlog.js";

const sum = (m: ReadonlyMap<string, number>): number => [...m.values()].reduce((s, n) => s + n, 0);

describe("per-model backlog", () => {
  describe("attributePending", () => {
    it("splits the exact total in proportion to the mix, in whole shares", () => {
      const out = attributePending(100, new Map([["echo", 3], ["upper", 1]]));
      expect(out.get("echo")).to.equal(75);
      expect(out.get("upper")).to.equal(25);
      expect(out.get(UNATTRIBUTED_MODEL)).to.equal(0);
    });

    it("gives the rounding remainder to the largest fractions so the shares add up to the total", () => {
      const out = attributePending(10, new Map([["a", 1], ["b", 1], ["c", 1]]));
      expect(sum(out)).to.equal(10);
      // 3.33 each: the one extra goes to the model that sorts first.
      expect([out.get("a"), out.get("b"), out.get("c")]).to.deep.equal([4, 3, 3]);
    });

    it("puts everything under the unattributed model when there is no mix to go by", () => {
      const out = attributePending(42, new Map());
      expect([...out]).to.deep.equal([[UNATTRIBUTED_MODEL, 42]]);
    });

    it("keeps every model of the mix at zero when nothing is pending", () => {
      const out = attributePending(0, new Map([["echo", 5]]));
      expect(out.get("echo")).to.equal(0);
      expect(out.get(UNATTRIBUTED_MODEL)).to.equal(0);
    });

    it("always sums to the total, with non-negative whole shares (property)", () => {
      fc.assert(
        fc.property(fc.nat(1_000_000), fc.dictionary(fc.string({ minLength: 1, maxLength: 8 }), fc.nat(1_000)), (total, counts) => {
          const out = attributePending(total, new Map(Object.entries(counts)));
          expect(sum(out)).to.equal(total);
          for (const n of out.values()) expect(Number.isInteger(n) && n >= 0).to.equal(true);
          expect(out.has(UNATTRIBUTED_MODEL)).to.equal(true);
        }),
      );
    });
  });

  describe("DeliveryMix", () => {
    it("counts only the last `size` deliveries", () => {
      const mix = new DeliveryMix(4);
      for (const m of ["a", "a", "a", "a"]) mix.add(m);
      expect([...mix.counts()]).to.deep.equal([["a", 4]]);
      mix.add("b");
      mix.add("b");
      expect(mix.counts().get("a")).to.equal(2);
      expect(mix.counts().get("b")).to.equal(2);
      for (let i = 0; i < 4; i++) mix.add("c");
      // "a" and "b" left the window altogether.
      expect([...mix.counts()]).to.deep.equal([["c", 4]]);
    });

    it("never holds more than its size (property)", () => {
      fc.assert(
        fc.property(fc.integer({ min: 1, max: 20 }), fc.array(fc.constantFrom("a", "b", "c", "d")), (size, models) => {
          const mix = new DeliveryMix(size);
          for (const m of models) mix.add(m);
          expect(sum(mix.counts())).to.equal(Math.min(size, models.length));
          // The counts are those of the last `size` deliveries.
          const tail = models.slice(-size);
          for (const [m, n] of mix.counts()) expect(n).to.equal(tail.filter((x) => x === m).length);
        }),
      );
    });

    it("refuses an empty window", () => {
      expect(() => new DeliveryMix(0)).to.throw(RangeError);
    });
  });

  describe("modelOfSubject", () => {
    it("reads the model token of a request subject, and nothing else", () => {
      expect(modelOfSubject("infer.req.high.acme.llama3-8b")).to.equal("llama3-8b");
      expect(modelOfSubject("infer.req.high.acme")).to.equal(UNATTRIBUTED_MODEL);
      expect(modelOfSubject("infer.req.high.acme.a.b")).to.equal(UNATTRIBUTED_MODEL);
      expect(modelOfSubject("infer.res.acme.x")).to.equal(UNATTRIBUTED_MODEL);
    });
  });

  describe("ModelBacklog", () => {
    it("splits each priority by its own mix and counts what is in flight per model", () => {
      const b = new ModelBacklog(10);
      for (let i = 0; i < 3; i++) b.held("normal", "infer.req.normal.t.echo", 1);
      b.held("normal", "infer.req.normal.t.upper", 1);
      b.held("high", "infer.req.high.t.upper", 1);
      b.held("normal", "infer.req.normal.t.echo", -1);
      expect(b.pendingByModel("normal", 8).get("echo")).to.equal(6);
      expect(b.pendingByModel("normal", 8).get("upper")).to.equal(2);
      expect(b.pendingByModel("high", 5).get("upper")).to.equal(5);
      expect(b.pendingByModel("low", 7).get(UNATTRIBUTED_MODEL)).to.equal(7);
      expect(b.inflightByModel().get("echo")).to.equal(2);
      expect(b.inflightByModel().get("upper")).to.equal(2);
      // Settling does not change the mix: it is of deliveries, not of what is held.
      for (let i = 0; i < 2; i++) b.held("normal", "infer.req.normal.t.echo", -1);
      expect(b.inflightByModel().get("echo")).to.equal(0);
      expect(b.pendingByModel("normal", 8).get("echo")).to.equal(6);
    });
  });
});
