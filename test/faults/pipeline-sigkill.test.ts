/**
 * Two pipeline processes share the durable consumers; one is SIGKILLed under load. What it held
 * unacknowledged is redelivered to the other after the ack wait, and every request is answered
 * exactly once (a result published just before the kill is found in INFER_RES and not sent again).
 */
import { expect } from "chai";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { useNats } from "../support/nats.js";
import { runCli, type CliProcess } from "../support/process.js";
import { models, startWorker, type TestWorker } from "../support/stack.js";
import { reportLine, SteadyLoad, until } from "./harness.js";

describe("fault: one of two pipeline processes SIGKILLed under load", function () {
  this.timeout(90_000);
  const nats = useNats();
  let worker: TestWorker;
  let dir: string;
  let configFile: string;
  let load: SteadyLoad | undefined;
  const procs: CliProcess[] = [];

  const serve = async (): Promise<CliProcess> => {
    const p = runCli(["serve", "--config", configFile, "--server", nats.url]);
    procs.push(p);
    await p.waitFor(/sluice serve ready/, 30_000);
    return p;
  };

  before(async () => {
    // A device slow enough that both processes hold requests in flight when one dies.
    worker = await startWorker({ base_ms: 8, per_item_ms: 0.2 });
    dir = await mkdtemp(join(tmpdir(), "sluice-faults-"));
    configFile = join(dir, "sluice.json");
    await writeFile(
      configFile,
      JSON.stringify({
        consumer: { ackWaitMs: 2_000 },
        pipeline: { maxInFlight: 64, retryBaseMs: 50, retryMaxMs: 500, pullExpiresMs: 1_000 },
        models: models(["echo"], { batch: { max_size: 16, max_delay_ms: 5 } }),
        workers: [{ model: "echo", version: "v1", endpoint: worker.server.endpoint }],
      }),
    );
  });

  after(async () => {
    await load?.close();
    for (const p of procs) {
      p.kill("SIGKILL");
      await p.exited;
    }
    await worker?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it("answers every request exactly once", async () => {
    const victim = await serve();
    const survivor = await serve();
    load = await SteadyLoad.open({ servers: [nats.url], tenant: "psigkill", model: "echo", count: 1_500, rate: 250 });
    const publishing = load.start();
    expect(await until(() => load!.answeredSeen >= 300, 20_000), "answers before the kill").to.equal(true);
    victim.kill("SIGKILL");
    expect(await victim.exited).to.equal("SIGKILL");
    await publishing;
    const r = await load.finish(45_000);
    reportLine("pipeline-sigkill", r);
    survivor.kill("SIGTERM");
    await survivor.exited;
    expect(r.sent).to.equal(1_500);
    expect(r.duplicated).to.equal(0);
    expect(r.lost).to.equal(0);
  });
});
