import { expect } from "chai";
import { sleep } from "../../../operators/support/sleep.js";

describe("sleep", () => {
  it("resolves on a later macrotask, never synchronously or as a microtask (0 ms too)", async () => {
    const order: string[] = [];
    const slept = sleep(0).then(() => order.push("sleep 0"));
    void Promise.resolve().then(() => order.push("microtask"));
    order.push("sync");
    await slept;
    await sleep(5).then(() => order.push("sleep 5"));
    expect(order).to.deep.equal(["sync", "microtask", "sleep 0", "sleep 5"]);
  });

  it("resolves at once when its signal aborts, before a shorter timer set later", async () => {
    const ac = new AbortController();
    const order: string[] = [];
    const slept = sleep(60_000, ac.signal).then(() => order.push("sleep"));
    ac.abort();
    await slept;
    setTimeout(() => order.push("timer"), 0);
    await sleep(1);
    expect(order).to.deep.equal(["sleep", "timer"]);
  });

  it("resolves for a signal aborted before the call", async () => {
    const ac = new AbortController();
    ac.abort();
    await sleep(60_000, ac.signal);
  });
});
