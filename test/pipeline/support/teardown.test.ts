import { expect } from "chai";
import { Teardowns } from "../../../pipeline/support/teardown.js";

describe("Teardowns", () => {
  it("runs every teardown, last registered first, once", async () => {
    const t = new Teardowns();
    const ran: string[] = [];
    t.add("a", () => void ran.push("a"));
    t.add("b", async () => void ran.push("b"));
    t.add("c", () => void ran.push("c"));
    await t.run();
    await t.run();
    expect(ran).to.deep.equal(["c", "b", "a"]);
  });

  it("runs the rest when one fails, then throws that error", async () => {
    const t = new Teardowns();
    const ran: string[] = [];
    const boom = new Error("boom");
    t.add("a", () => void ran.push("a"));
    t.add("b", () => {
      throw boom;
    });
    t.add("c", () => void ran.push("c"));
    const err = await t.run().then(() => undefined, (e: unknown) => e);
    expect(err).to.equal(boom);
    expect(ran).to.deep.equal(["c", "a"]);
  });

  it("names each failed step when several fail", async () => {
    const t = new Teardowns();
    t.add("registry", () => Promise.reject(new Error("x")));
    t.add("pool", () => {
      throw new Error("y");
    });
    const err = await t.run().then(() => undefined, (e: unknown) => e);
    expect(err).to.be.instanceOf(AggregateError);
    expect((err as AggregateError).errors.map((e: Error) => e.message)).to.deep.equal(["pool: y", "registry: x"]);
  });
});
