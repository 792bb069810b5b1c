/**
 * The gRPC worker process is SIGKILLed under load and restarted on the same port: the batches
 * that were on it fail and are retried, and every request is still answered exactly once.
 */
import { expect } from "chai";
import { setTimeout as delay } from "node:timers/promises";
import type { PipelineService } from "../../pipeline/service.js";
import { useNats } from "../support/nats.js";
import { runCli, type CliProcess } from "../support/process.js";
import { models, startPipeline, testConfig } from "../support/stack.js";
import { freePort, reportLine, SteadyLoad, until } from "./harness.js";

describe("fault: worker killed and restarted on the same port under load", function () {
  this.timeout(90_000);
  const nats = useNats();
  let pipeline: PipelineService;
  let load: SteadyLoad | undefined;
  const workers: CliProcess[] = [];
  let port: number;

  const startWorkerProcess = async (): Promise<CliProcess> => {
    const w = runCli(["worker", "--port", String(port), "--base-ms", "3", "--per-item-ms", "0.05", "--id", "faults-worker"]);
    workers.push(w);
    await w.waitFor(/sluice worker ready/, 30_000);
    return w;
  };

  before(async () => {
    port = await freePort();
    await startWorkerProcess();
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: models(["echo"], { timeout_ms: 5_000 }),
        workers: [{ model: "echo", version: "v1", endpoint: `127.0.0.1:${port}` }],
        consumer: { ackWaitMs: 3_000 },
      }),
    );
  });

  after(async () => {
    await load?.close();
    await pipeline?.stop(2_000);
    for (const w of workers) {
      w.kill("SIGKILL");
      await w.exited;
    }
  });

  it("answers every request exactly once", async () => {
    load = await SteadyLoad.open({ servers: [nats.url], tenant: "wrestart", model: "echo", count: 1_200, rate: 200 });
    const publishing = load.start();
    expect(await until(() => load!.answeredSeen >= 200, 20_000), "answers before the kill").to.equal(true);
    const first = workers[0]!;
    first.kill("SIGKILL");
    expect(await first.exited).to.equal("SIGKILL");
    // Down long enough for batches to fail and be retried against a dead endpoint.
    await delay(1_500);
    await startWorkerProcess();
    await publishing;
    const r = await load.finish(45_000);
    reportLine("worker-restart", r);
    expect(r.sent).to.equal(1_200);
    expect(r.duplicated).to.equal(0);
    expect(r.lost).to.equal(0);
  });
});
