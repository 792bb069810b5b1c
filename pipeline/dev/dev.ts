/**
 * `sluice dev`: the whole thing on one machine, with nothing installed but nats-server. A local
 * nats-server child process (temporary store), a simulated GPU worker and the pipeline, with a
 * few models registered: `echo` (output = prompt), `reverse`, `upper`, and `llm-sim` (a generative
 * model: served through Generate, tokens streamed with `Infer-Stream: 1`) and `embed-sim` (a
 * deterministic embedding). An HTTP gateway in front of it speaks OpenAI's API on loopback and
 * takes the API key `sluice-dev` for tenant `demo`. With `llmSim`, `llm-sim`
 * runs on a worker of its own with the llm-sim engine (KV cache, prefix cache, continuous
 * batching; worker/engines/llm-sim.ts) instead.
 */
import { LlmSimEngine, type LlmSimOptions } from "../../worker/engines/llm-sim.js";
import { SimulatedEngine } from "../../worker/engines/simulated.js";
import { WorkerServer } from "../../worker/server.js";
import { loadConfig, type SluiceConfig, type SluiceConfigInput } from "../config.js";
import { NatsServer } from "./nats-server.js";
import type { ModelSpec } from "../routing/registry.js";
import { PipelineService } from "../service.js";
import type { PipelineLogger } from "../support/logger.js";
import { SERVICE_WORKER, type Tracing } from "../telemetry/types.js";
import { startTracing } from "../telemetry/export.js";
import { traceEngine } from "../telemetry/engine.js";
import { connectNats } from "../connection.js";
import { WorkerRegistration } from "../workers/directory.js";
import type { NatsConnection } from "@nats-io/transport-node";
import { Gateway, SERVICE_GATEWAY } from "../gateway/server.js";
import { hashApiKey } from "../gateway/auth.js";

/** The API key dev's gateway accepts, and the tenant it names. */
export const DEV_API_KEY = "sluice-dev";
const DEV_TENANT = "demo";
/** The secret dev's gateway signs callbacks with. */
const DEV_CALLBACK_SECRET = "sluice-dev-callbacks";

export const DEV_MODELS: Record<string, ModelSpec> = {
  echo: { versions: { v1: { weight: 100 } }, batch: { max_size: 32, max_delay_ms: 5 }, timeout_ms: 30_000 },
  reverse: { versions: { v1: { weight: 100 } }, batch: { max_size: 32, max_delay_ms: 5 } },
  upper: { versions: { v1: { weight: 100 } }, batch: { max_size: 32, max_delay_ms: 5 } },
  "llm-sim": { versions: { v1: { weight: 100 } }, generate: true },
  "embed-sim": { versions: { v1: { weight: 100 } }, batch: { max_size: 64, max_delay_ms: 2 } },
};

export interface DevOptions {
  /** nats-server client port; a free one when omitted. */
  port?: number;
  /** Simulated device cost. */
  baseMs?: number;
  perItemMs?: number;
  logger?: PipelineLogger;
  config?: SluiceConfigInput;
  /** Serve `llm-sim` with the llm-sim engine, with these options. */
  llmSim?: LlmSimOptions;
  /** HTTP port of the gateway; a free one when omitted, -1 for no gateway. */
  gatewayPort?: number;
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
    /** The HTTP / OpenAI gateway (undefined with `gatewayPort: -1`). */
    readonly gateway: Gateway | undefined,
    private readonly gatewayTracing: Tracing | undefined,
    /** The llm-sim worker, when asked for (stopped with the stack). */
    readonly llmWorker?: { server: WorkerServer; engine: LlmSimEngine; registration: WorkerRegistration },
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
        serves: Object.keys(DEV_MODELS)
          .filter((model) => !(opts.llmSim && model === "llm-sim"))
          .map((model) => ({ model, version: "v1" })),
      });
      cleanup.unshift(() => registration.stop());
      let llmWorker: { server: WorkerServer; engine: LlmSimEngine; registration: WorkerRegistration } | undefined;
      if (opts.llmSim) {
        const llmEngine = new LlmSimEngine(opts.llmSim);
        cleanup.unshift(() => llmEngine.close());
        const server = await WorkerServer.start({ engine: traceEngine(llmEngine, workerTracing, { workerId: "dev-llm-worker" }), workerId: "dev-llm-worker" });
        cleanup.unshift(() => server.stop());
        const llmRegistration = await WorkerRegistration.start(workerNc, {
          workerId: "dev-llm-worker",
          endpoint: server.endpoint,
          capacity: llmEngine.capacity,
          serves: [{ model: "llm-sim", version: "v1" }],
        });
        cleanup.unshift(() => llmRegistration.stop());
        llmWorker = { server, engine: llmEngine, registration: llmRegistration };
      }
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
      let gateway: Gateway | undefined;
      let gatewayTracing: Tracing | undefined;
      if (opts.gatewayPort !== -1) {
        const tracing = (gatewayTracing = startTracing({ serviceName: SERVICE_GATEWAY }));
        cleanup.unshift(() => tracing.shutdown());
        gateway = await Gateway.start({
          servers: [nats.url],
          tracing,
          settings: {
            ...config.gateway,
            host: "127.0.0.1",
            port: opts.gatewayPort ?? 0,
            apiKeys: { ...config.gateway.apiKeys, [hashApiKey(DEV_API_KEY)]: DEV_TENANT },
            callbackSecret: config.gateway.callbackSecret || DEV_CALLBACK_SECRET,
            drainMs: 1_000,
          },
        });
      }
      return new DevStack(nats, worker, engine, pipeline, workerTracing, registration, workerNc, gateway, gatewayTracing, llmWorker);
    } catch (err) {
      for (const f of cleanup) await f().catch(() => undefined);
      throw err;
    }
  }

  /** Stops the pipeline, the worker and the server, in that order. Safe to call twice. */
  stop(): Promise<void> {
    this.stopped ??= (async () => {
      await this.gateway?.stop();
      await this.gatewayTracing?.shutdown();
      await this.pipeline.stop(2_000);
      await this.registration.stop();
      await this.llmWorker?.registration.stop();
      await this.workerNc.close().catch(() => undefined);
      await this.worker.stop();
      await this.engine.close();
      await this.llmWorker?.server.stop();
      await this.llmWorker?.engine.close();
      await this.workerTracing.shutdown();
      await this.nats.stop();
    })();
    return this.stopped;
  }
}
