/**
 * `sluice dev`: the whole thing on one machine, with nothing installed but nats-server. A local
 * nats-server child process (temporary store), a simulated GPU worker and the pipeline, with a
 * few models registered: `echo` (output = prompt), `reverse`, `upper`, and `llm-sim` (a generative
 * model: served through Generate, tokens streamed with `Infer-Stream: 1`).
 */
import { SimulatedEngine } from "../../worker/engines/simulated.js";
import { WorkerServer } from "../../worker/server.js";
import { loadConfig, type SluiceConfig, type SluiceConfigInput } from "../config.js";
import { NatsServer } from "./nats-server.js";
import type { ModelSpec } from "../routing/registry.js";
import { PipelineService } from "../service.js";
import type { PipelineLogger } from "../support/logger.js";
import { SERVICE_WORKER, startTracing, traceEngine, type Tracing } from "../telemetry/telemetry.js";
import { connectNats } from "../connection.js";
import { WorkerRegistration } from "../workers/directory.js";
import type { NatsConnection } from "@nats-io/transport-node";

export const DEV_MODELS: Record<string, ModelSpec> = {
  echo: { versions: { v1: { weight: 100 } }, batch: { max_size: 32, max_delay_ms: 5 }, timeout_ms: 30_000 },
  reverse: { versions: { v1: { weight: 100 } }, batch: { max_size: 32, max_delay_ms: 5 } },
  upper: { versions: { v1: { weight: 100 } }, batch: { max_size: 32, max_delay_ms: 5 } },
  "llm-sim": { versions: { v1: { weight: 100 } }, generate: true },
};

export interface DevOptions {
  /** nats-server client port; a free one when omitted. */
  port?: number;
  /** Simulated device cost. */
  baseMs?: number;
  perItemMs?: number;
  logger?: PipelineLogger;
  config?: SluiceConfigInput;
}

export class DevStack {
  private stopped: Promise<void> | undefined;
  private constructor(
    readonly nats: NatsServer,
    readonly worker: WorkerServer,
    readonly engine: SimulatedEngine,
    readonly pipeline: PipelineService,
    private readonly workerTracing: Tracing,
    private readonly registration: WorkerRegistration,
    private readonly workerNc: NatsConnection,
  ) {}

  get url(): string {
    return this.nats.url;
  }

  static async start(opts: DevOptions = {}): Promise<DevStack> {
    const nats = await NatsServer.start(opts.port !== undefined ? { port: opts.port } : {});
    const cleanup: Array<() => Promise<void>> = [() => nats.stop()];
    try {
      const engine = new SimulatedEngine({ base_ms: opts.baseMs ?? 8, per_item_ms: opts.perItemMs ?? 0.5 });
      const workerTracing = startTracing({ serviceName: SERVICE_WORKER });
      cleanup.unshift(() => workerTracing.shutdown());
      const worker = await WorkerServer.start({ engine: traceEngine(engine, workerTracing, { workerId: "dev-worker" }), workerId: "dev-worker" });
      cleanup.unshift(() => worker.stop());
      // The worker registers itself as a deployed one does (bucket infer_workers), so every
      // tool that finds workers through the registry (workers list, replay) sees it.
      const workerNc = await connectNats(nats.url, "sluice-dev-worker");
      cleanup.unshift(() => workerNc.close());
      const registration = await WorkerRegistration.start(workerNc, {
        workerId: "dev-worker",
        endpoint: worker.endpoint,
        capacity: engine.capacity,
        serves: Object.keys(DEV_MODELS).map((model) => ({ model, version: "v1" })),
      });
      cleanup.unshift(() => registration.stop());
      const config: SluiceConfig = loadConfig({
        env: {},
        overrides: {
          ...opts.config,
          servers: [nats.url],
          models: { ...DEV_MODELS, ...(opts.config?.models ?? {}) },
          workers: [...(opts.config?.workers ?? [])],
        },
      });
      const pipeline = await PipelineService.start(config, opts.logger ? { logger: opts.logger } : {});
      cleanup.unshift(() => pipeline.stop(1_000));
      return new DevStack(nats, worker, engine, pipeline, workerTracing, registration, workerNc);
    } catch (err) {
      for (const f of cleanup) await f().catch(() => undefined);
      throw err;
    }
  }

  /** Stops the pipeline, the worker and the server, in that order. Safe to call twice. */
  stop(): Promise<void> {
    this.stopped ??= (async () => {
      await this.pipeline.stop(2_000);
      await this.registration.stop();
      await this.workerNc.close().catch(() => undefined);
      await this.worker.stop();
      await this.engine.close();
      await this.workerTracing.shutdown();
      await this.nats.stop();
    })();
    return this.stopped;
  }
}
