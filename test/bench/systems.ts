/**
 * The systems under test. Each runs in its own child process against a NATS server and a
 * worker the benchmark started for that run, so its peak memory can be read on its own.
 * A new baseline (another broker, another queue library) is one more {@link BenchSystem}.
 */
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { defaultConfig } from "../../pipeline/config.js";
import {
  AMQP_URL,
  BullLoadTarget,
  bullQueueName,
  loadRedisDriver,
  RabbitLoadTarget,
  rabbitRequestQueue,
  REDIS_HOST,
  REDIS_PORT,
  unreachable,
} from "./brokers.js";
import type { LoadTarget } from "./load.js";
import { ChildFailedError, compiled, makeTempDir, peakRssMb, removeTempDir, spawnNode, type BenchChild } from "./procs.js";

/** What a system run is given. */
/**
 * Messages the raw loop works on at once: the pipeline's default in-flight bound, so both hold
 * the same number of requests and the difference is what each does with them.
 */
export const RAW_WINDOW = defaultConfig().pipeline.maxInFlight;

export interface SystemContext {
  /** Unique to this system run: names its queues on brokers that outlive the run. */
  readonly runId: string;
  readonly natsUrl: string;
  readonly workerEndpoint: string;
  /** Model slug of a single-model scenario (the first of `models`). */
  readonly model: string;
  /** Every model the load uses; the worker serves each as version `version`. */
  readonly models: readonly string[];
  /** The scenario gives requests priorities (high, normal, low). */
  readonly priorities: boolean;
  readonly version: string;
  readonly batch: { readonly maxSize: number; readonly maxDelayMs: number };
  /** Extra registry fields of every model (e.g. `cache`), for the systems that have them. */
  readonly modelExtras?: Record<string, unknown>;
  /** Extra `pipeline` settings of sluice's configuration (e.g. `fairShare`). */
  readonly pipelineSettings?: Record<string, unknown>;
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
  /** Why this system cannot run here (its broker is not reachable, ...), or undefined. Asked once per benchmark. */
  unavailable?(): Promise<string | undefined>;
  /** Starts the system; resolves once it consumes requests. */
  start(ctx: SystemContext): Promise<RunningSystem>;
  /**
   * How the load generator reaches this system; requests on NATS as docs/protocol.md has them when
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
          models: Object.fromEntries(
            ctx.models.map((m) => [
              m,
              { versions: { [ctx.version]: { weight: 100 } }, batch: { max_size: ctx.batch.maxSize, max_delay_ms: ctx.batch.maxDelayMs }, timeout_ms: 30_000, ...ctx.modelExtras },
            ]),
          ),
          workers: ctx.models.map((m) => ({ model: m, version: ctx.version, endpoint: ctx.workerEndpoint })),
          ...(ctx.pipelineSettings ? { pipeline: ctx.pipelineSettings } : {}),
        },
        null,
        2,
      ),
    );
    // Metrics on, as deployed, but on a free port so runs never collide over 9464.
    const proc = spawnNode("sluice serve", [compiled("pipeline/cli/main.ts"), "serve", "--config", configFile, "--server", ctx.natsUrl], {
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
      compiled("test/bench/raw-loop.ts"),
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

/** The ceiling: the broker path alone (pull, publish the result with Nats-Msg-Id, ack), no worker. */
export const brokerEchoSystem: BenchSystem = {
  name: "broker-echo",
  description: `the broker path alone: consume() on INFER_REQ, publish a result to INFER_RES with Nats-Msg-Id, ack; no worker; ${RAW_WINDOW} at once`,
  start: (ctx) => startLoop("broker-echo", "raw-loop.ts", ["--server", ctx.natsUrl, "--mode", "echo", "--window", String(RAW_WINDOW), "--version", ctx.version], /raw-loop ready/),
};

/** Starts a bench loop script (`test/bench/<script>`) and waits for its ready line. */
async function startLoop(label: string, script: string, args: string[], ready: RegExp): Promise<ChildSystem> {
  const proc = spawnNode(label, [compiled(`test/bench/${script}`), ...args]);
  try {
    await proc.waitFor(ready);
  } catch (err) {
    await proc.stop();
    throw err;
  }
  return new ChildSystem(proc);
}

/** The usual first design: one message at a time on a JetStream pull consumer. */
export const naiveLoopSystem: BenchSystem = {
  name: "naive-loop",
  description: "the usual first design: next() on INFER_REQ, one gRPC call (batch of 1), publish result, ack; one message at a time",
  start: (ctx) =>
    startLoop(
      "naive-loop",
      "raw-loop.ts",
      ["--mode", "next", "--server", ctx.natsUrl, "--worker", ctx.workerEndpoint, "--version", ctx.version],
      /raw-loop ready/,
    ),
};

/** BullMQ Worker concurrency: BullMQ's advice for IO-bound jobs is a high value; the pipeline's in-flight bound. */
export const BULL_CONCURRENCY = RAW_WINDOW;
/** RabbitMQ consumer prefetch: enough unacked deliveries to keep the consumer busy; the pipeline's in-flight bound. */
export const RABBIT_PREFETCH = RAW_WINDOW;

/** BullMQ on the local Redis: Queue.add() in, a Worker process, QueueEvents `completed` out. */
export const bullmqSystem: BenchSystem = {
  name: "bullmq",
  description: `BullMQ on Redis ${REDIS_HOST}:${REDIS_PORT}: add() a job per request; a Worker (concurrency ${BULL_CONCURRENCY}) calls the worker per job (batch of 1); QueueEvents 'completed'`,
  async unavailable() {
    const down = await unreachable(REDIS_HOST, REDIS_PORT);
    if (down) return `Redis: ${down}`;
    const driver = await loadRedisDriver();
    return typeof driver === "string" ? driver : undefined;
  },
  start: (ctx) =>
    startLoop(
      "bullmq-loop",
      "bullmq-loop.ts",
      [
        "--queue",
        bullQueueName(ctx.runId),
        "--worker",
        ctx.workerEndpoint,
        "--concurrency",
        String(BULL_CONCURRENCY),
        "--model",
        ctx.model,
        "--version",
        ctx.version,
      ],
      /bullmq-loop ready/,
    ),
  async connectLoad(ctx) {
    const driver = await loadRedisDriver();
    if (typeof driver === "string") throw new Error(driver);
    return BullLoadTarget.connect(driver, bullQueueName(ctx.runId));
  },
};

/** RabbitMQ on the local broker: confirmed persistent publishes, prefetch-tuned consumer, RPC replies. */
export const rabbitmqSystem: BenchSystem = {
  name: "rabbitmq",
  description: `RabbitMQ (amqplib) on ${new URL(AMQP_URL).host}: confirmed persistent publishes to a durable queue; consumer with prefetch ${RABBIT_PREFETCH}, batch of 1; replies to an exclusive queue`,
  async unavailable() {
    const u = new URL(AMQP_URL);
    const down = await unreachable(u.hostname, Number(u.port));
    return down ? `RabbitMQ: ${down}` : undefined;
  },
  start: (ctx) =>
    startLoop(
      "rabbit-loop",
      "rabbit-loop.ts",
      [
        "--queue",
        rabbitRequestQueue(ctx.runId),
        "--worker",
        ctx.workerEndpoint,
        "--prefetch",
        String(RABBIT_PREFETCH),
        "--model",
        ctx.model,
        "--version",
        ctx.version,
        ...(ctx.priorities ? ["--priorities"] : []),
      ],
      /rabbit-loop ready/,
    ),
  connectLoad: (ctx) => RabbitLoadTarget.connect(rabbitRequestQueue(ctx.runId), ctx.priorities),
};

export const SYSTEMS: readonly BenchSystem[] = [sluiceSystem, brokerEchoSystem, jetstreamRawSystem, naiveLoopSystem, bullmqSystem, rabbitmqSystem];
