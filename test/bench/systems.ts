/**
 * The systems under test. Each runs in its own child process against a NATS server and a
 * worker the benchmark started for that run, so its peak memory can be read on its own.
 * A new baseline (another broker, another queue library) is one more {@link BenchSystem}.
 */
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { defaultConfig } from "../../pipeline/config.js";
import type { LoadTarget } from "./load.js";
import { ChildFailedError, makeTempDir, peakRssMb, removeTempDir, ROOT, spawnNode, type BenchChild } from "./procs.js";

/** What a system run is given. */
/**
 * Messages the raw loop works on at once: the pipeline's default in-flight bound, so both hold
 * the same number of requests and the difference is what each does with them.
 */
export const RAW_WINDOW = defaultConfig().pipeline.maxInFlight;

export interface SystemContext {
  readonly natsUrl: string;
  readonly workerEndpoint: string;
  /** Model slug the load uses; served by the worker as version `version`. */
  readonly model: string;
  readonly version: string;
  readonly batch: { readonly maxSize: number; readonly maxDelayMs: number };
}

export interface RunningSystem {
  readonly pid: number | undefined;
  /** Peak resident set size so far, MB. */
  peakRssMb(): number | undefined;
  /** Throws when the system's process has exited (a crash would otherwise read as lost requests). */
  assertAlive(): void;
  /** What the system printed lately, for error messages. */
  recentOutput(): string;
  stop(): Promise<void>;
}

export interface BenchSystem {
  readonly name: string;
  readonly description: string;
  /** Starts the system; resolves once it consumes requests. */
  start(ctx: SystemContext): Promise<RunningSystem>;
  /**
   * How the load generator reaches this system; requests on NATS as PROTOCOL.md has them when
   * omitted. A baseline on another broker brings its own.
   */
  connectLoad?(ctx: SystemContext, tenant: string): Promise<LoadTarget>;
}

class ChildSystem implements RunningSystem {
  constructor(
    private readonly proc: BenchChild,
    private readonly cleanup: () => Promise<void> = async () => undefined,
  ) {}
  get pid(): number | undefined {
    return this.proc.pid;
  }
  peakRssMb(): number | undefined {
    return peakRssMb(this.proc.pid);
  }
  recentOutput(): string {
    return this.proc.output().split("\n").slice(-30).join("\n");
  }
  assertAlive(): void {
    if (!this.proc.running) throw new ChildFailedError(this.proc.label, "exited during the run", this.proc.output());
  }
  async stop(): Promise<void> {
    try {
      await this.proc.stop();
    } finally {
      await this.cleanup();
    }
  }
}

/** The pipeline as a user runs it: `sluice serve --config FILE --server URL`. */
export const sluiceSystem: BenchSystem = {
  name: "sluice",
  description: "the pipeline (`sluice serve`), default settings, model and worker from its config file",
  async start(ctx) {
    const dir = await makeTempDir("sluice-bench-");
    const removeDir = (): Promise<void> => removeTempDir(dir);
    const configFile = join(dir, "sluice.json");
    await writeFile(
      configFile,
      JSON.stringify(
        {
          models: {
            [ctx.model]: {
              versions: { [ctx.version]: { weight: 100 } },
              batch: { max_size: ctx.batch.maxSize, max_delay_ms: ctx.batch.maxDelayMs },
              timeout_ms: 30_000,
            },
          },
          workers: [{ model: ctx.model, version: ctx.version, endpoint: ctx.workerEndpoint }],
        },
        null,
        2,
      ),
    );
    // Metrics on, as deployed, but on a free port so runs never collide over 9464.
    const proc = spawnNode("sluice serve", [join(ROOT, "bin", "sluice.js"), "serve", "--config", configFile, "--server", ctx.natsUrl], {
      SLUICE_METRICS_PORT: "0",
    });
    try {
      await proc.waitFor(/sluice serve ready/);
    } catch (err) {
      await proc.stop();
      await removeDir();
      throw err;
    }
    return new ChildSystem(proc, removeDir);
  },
};

/** The practical limit: a bare consume-call-publish-ack loop, batch of one. */
export const jetstreamRawSystem: BenchSystem = {
  name: "jetstream-raw",
  description: `hand-written loop: consume() on INFER_REQ, one gRPC call per message (batch of 1), publish result, ack; ${RAW_WINDOW} at once`,
  async start(ctx) {
    const proc = spawnNode("raw-loop", [
      "--import",
      "tsx",
      join(ROOT, "test", "bench", "raw-loop.ts"),
      "--server",
      ctx.natsUrl,
      "--worker",
      ctx.workerEndpoint,
      "--version",
      ctx.version,
      "--window",
      String(RAW_WINDOW),
    ]);
    try {
      await proc.waitFor(/raw-loop ready/);
    } catch (err) {
      await proc.stop();
      throw err;
    }
    return new ChildSystem(proc);
  },
};

export const SYSTEMS: readonly BenchSystem[] = [sluiceSystem, jetstreamRawSystem];
