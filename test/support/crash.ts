/**
 * The harness of the crash tests: a simulated worker serving model `echo`, a configuration file
 * in a folder of its own, and `sluice serve` processes run against the suite's nats-server and
 * SIGKILLed (if still running) after the suite; and a count of the results published per id.
 */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import type { SimulatedEngineOptions } from "../../worker/engines/simulated.js";
import type { NatsFixture } from "./nats.js";
import { runCli, type CliProcess } from "./process.js";
import { models, startWorker, type TestWorker } from "./stack.js";

export interface CrashStackOptions {
  /** The simulated device: slow enough that requests are in flight when a process dies. */
  device: SimulatedEngineOptions;
  /** The `echo` model's batching. */
  batch: { max_size: number; max_delay_ms: number };
  /** The rest of the configuration (consumer, pipeline, payloads, ...). */
  config: Record<string, unknown>;
}

export interface CrashStack {
  readonly worker: TestWorker;
  /** Starts `sluice serve` with the configuration (not waiting for it to be ready). */
  readonly serve: () => CliProcess;
}

/** Registers before/after hooks in the calling `describe` that set the stack up and tear it down. */
export function useCrashStack(nats: NatsFixture, opts: CrashStackOptions): CrashStack {
  let worker: TestWorker | undefined;
  let dir: string | undefined;
  let configFile = "";
  const procs: CliProcess[] = [];

  before(async () => {
    worker = await startWorker(opts.device);
    dir = await mkdtemp(join(tmpdir(), "sluice-crash-"));
    configFile = join(dir, "sluice.json");
    await writeFile(
      configFile,
      JSON.stringify({
        ...opts.config,
        models: models(["echo"], { batch: opts.batch }),
        workers: [{ model: "echo", version: "v1", endpoint: worker.server.endpoint }],
      }),
    );
  });

  after(async () => {
    for (const p of procs) p.kill("SIGKILL");
    await worker?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  return {
    get worker(): TestWorker {
      if (!worker) throw new Error("the crash stack is not set up yet");
      return worker;
    },
    serve: (): CliProcess => {
      const p = runCli(["serve", "--config", configFile, "--server", nats.url]);
      procs.push(p);
      return p;
    },
  };
}

/** Counts the results published on `subject` per request id (the subject's last token). */
export function countResults(nc: NatsConnection, subject: string, onResult?: (id: string, data: Uint8Array) => void): { seen: Map<string, number>; sub: Subscription } {
  const seen = new Map<string, number>();
  const sub = nc.subscribe(subject, {
    callback: (_e, m) => {
      const id = m.subject.slice(m.subject.lastIndexOf(".") + 1);
      seen.set(id, (seen.get(id) ?? 0) + 1);
      onResult?.(id, m.data);
    },
  });
  return { seen, sub };
}
