/** The pipeline process is killed with requests in flight and restarted: nothing lost, nothing twice. */
import { expect } from "chai";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { InferenceClient } from "../../pipeline/client/client.js";
import { useNats, waitFor } from "../support/nats.js";
import { runCli, type CliProcess } from "../support/process.js";
import { models, startWorker, type TestWorker } from "../support/stack.js";

describe("crash: SIGKILL the pipeline with requests in flight", function () {
  this.timeout(180_000);
  const nats = useNats();
  let worker: TestWorker;
  let dir: string;
  let configFile: string;
  const procs: CliProcess[] = [];

  before(async () => {
    // A slow device so that many requests are in flight when the process dies.
    worker = await startWorker({ base_ms: 20, per_item_ms: 0.5 });
    dir = await mkdtemp(join(tmpdir(), "sluice-crash-"));
    configFile = join(dir, "sluice.json");
    await writeFile(
      configFile,
      JSON.stringify({
        consumer: { ackWaitMs: 2_000 },
        pipeline: { maxInFlight: 128, retryBaseMs: 50, retryMaxMs: 500, pullExpiresMs: 1_000 },
        models: models(["echo"], { batch: { max_size: 16, max_delay_ms: 5 } }),
        workers: [{ model: "echo", version: "v1", endpoint: worker.server.endpoint }],
      }),
    );
  });

  after(async () => {
    for (const p of procs) p.kill("SIGKILL");
    await worker?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  const serve = (): CliProcess => {
    const p = runCli(["serve", "--config", configFile, "--server", nats.url]);
    procs.push(p);
    return p;
  };

  it("answers every request exactly once across a SIGKILL and a restart", async () => {
    const client = new InferenceClient(nats.nc, "crash");
    const seen = new Map<string, number>();
    const texts = new Map<string, string>();
    const sub = nats.nc.subscribe("infer.res.crash.>", {
      callback: (_e, m) => {
        const id = m.subject.split(".")[3]!;
        seen.set(id, (seen.get(id) ?? 0) + 1);
        texts.set(id, (JSON.parse(new TextDecoder().decode(m.data)) as { output?: { text?: string } }).output?.text ?? "");
      },
    });
    const first = serve();
    await first.waitFor(/ready/);
    const N = 1500;
    for (let i = 0; i < N; i++) await client.publish("echo", { prompt: `p${i}` }, { id: `c${i}` });
    // Kill while the backlog is being worked through.
    await waitFor("some results", () => seen.size >= 100);
    first.kill("SIGKILL");
    expect(await first.exited).to.equal("SIGKILL");
    const answeredBeforeCrash = seen.size;
    expect(answeredBeforeCrash).to.be.lessThan(N);
    const second = serve();
    await second.waitFor(/ready/);
    await waitFor(`all ${N} results (have ${seen.size})`, () => seen.size >= N, 120_000);
    await new Promise((r) => setTimeout(r, 500));
    sub.unsubscribe();
    second.kill("SIGTERM");
    await second.exited;
    expect(seen.size).to.equal(N);
    for (let i = 0; i < N; i++) {
      expect(seen.get(`c${i}`), `results for c${i}`).to.equal(1);
      expect(texts.get(`c${i}`)).to.equal(`p${i}`);
    }
    await client.close();
  });
});
