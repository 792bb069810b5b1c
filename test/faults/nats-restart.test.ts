/** nats-server restarted under load: the pipeline reconnects and nothing is lost or answered twice. */
import { expect } from "chai";
import type { PipelineService } from "../../pipeline/service.js";
import { useNats } from "../support/nats.js";
import { models, startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";
import { reportLine, SteadyLoad, until } from "./harness.js";

describe("fault: nats-server restarted under load", function () {
  this.timeout(90_000);
  const nats = useNats();
  let worker: TestWorker;
  let pipeline: PipelineService;
  let load: SteadyLoad | undefined;

  before(async () => {
    worker = await startWorker({ base_ms: 2, per_item_ms: 0.05 });
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: models(["echo"]),
        workers: [{ model: "echo", version: "v1", endpoint: worker.server.endpoint }],
        consumer: { ackWaitMs: 3_000 },
      }),
    );
  });

  after(async () => {
    await load?.close();
    await pipeline?.stop(2_000);
    await worker?.stop();
  });

  it("answers every request exactly once", async () => {
    load = await SteadyLoad.open({ servers: [nats.url], tenant: "nrestart", model: "echo", count: 1_200, rate: 200 });
    const publishing = load.start();
    expect(await until(() => load!.answeredSeen >= 200, 20_000), "answers before the restart").to.equal(true);
    await nats.server.restart();
    await publishing;
    const r = await load.finish(40_000);
    reportLine("nats-restart", r);
    expect(r.sent).to.equal(1_200);
    expect(r.duplicated).to.equal(0);
    expect(r.lost).to.equal(0);
  });
});
