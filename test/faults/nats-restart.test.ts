/** nats-server restarted under load: the pipeline reconnects and nothing is lost or answered twice. */
import { expect } from "chai";
import { useNats } from "../support/nats.js";
import { reportLine, SteadyLoad, until, useFaultStack } from "./harness.js";

describe("fault: nats-server restarted under load", function () {
  this.timeout(90_000);
  const nats = useNats();
  const stack = useFaultStack(nats);

  it("answers every request exactly once", async () => {
    const load = (stack.load = await SteadyLoad.open({ servers: [nats.url], tenant: "nrestart", model: "echo", count: 1_200, rate: 200 }));
    const publishing = load.start();
    expect(await until(() => load.answeredSeen >= 200, 20_000), "answers before the restart").to.equal(true);
    await nats.server.restart();
    await publishing;
    const r = await load.finish(40_000);
    reportLine("nats-restart", r);
    expect(r.sent).to.equal(1_200);
    expect(r.duplicated).to.equal(0);
    expect(r.lost).to.equal(0);
  });
});
