import { expect } from "chai";
import { Breaker } from "../../../pipeline/workers/breaker.js";

const options = { ejectAfterFailures: 3, ejectForMs: 100, maxEjectForMs: 1_000, random: () => 0 };

describe("Breaker", () => {
  it("opens after the configured consecutive failures, for the ejection time", () => {
    const b = new Breaker(options);
    expect(b.failed(0)).to.equal(undefined);
    expect(b.failed(0)).to.equal(undefined);
    expect(b.state).to.equal("closed");
    expect(b.failed(0)).to.equal(100);
    expect(b.state).to.equal("open");
    expect(b.allows(99, 0)).to.equal(false);
    expect(b.allows(100, 0)).to.equal(true);
  });

  it("a success in between starts the count again", () => {
    const b = new Breaker(options);
    b.failed(0);
    b.failed(0);
    expect(b.succeeded()).to.equal(false);
    expect(b.failed(0)).to.equal(undefined);
    expect(b.failures).to.equal(1);
  });

  it("lets one probe through after the ejection; its failure ejects again for twice as long, its success closes", () => {
    const b = new Breaker(options);
    for (let i = 0; i < 3; i++) b.failed(0);
    b.calling();
    expect(b.state).to.equal("half-open");
    expect(b.allows(100, 1)).to.equal(false);
    expect(b.failed(100)).to.equal(200);
    expect(b.allows(299, 0)).to.equal(false);
    expect(b.allows(300, 0)).to.equal(true);
    b.calling();
    expect(b.succeeded()).to.equal(true);
    expect(b.state).to.equal("closed");
    for (let i = 0; i < 3; i++) b.failed(300);
    expect(b.allows(399, 0)).to.equal(false);
    expect(b.allows(400, 0)).to.equal(true);
  });

  it("caps the ejection time", () => {
    const b = new Breaker(options);
    const times: Array<number | undefined> = [];
    for (let i = 0; i < 3; i++) b.failed(0);
    for (let i = 0; i < 6; i++) {
      b.calling();
      times.push(b.failed(0));
    }
    expect(times).to.deep.equal([200, 400, 800, 1_000, 1_000, 1_000]);
  });
});
