/** Starts a simulated worker and a pipeline in this process, against a test nats-server. */
import { loadConfig, type SluiceConfig, type SluiceConfigInput } from "../../pipeline/config.js";
import type { ModelSpec } from "../../pipeline/routing/registry.js";
import { PipelineService } from "../../pipeline/service.js";
import { silentLogger } from "../../pipeline/support/logger.js";
import { SimulatedEngine, type SimulatedEngineOptions } from "../../worker/engines/simulated.js";
import { WorkerServer } from "../../worker/server.js";

export interface TestWorker {
  engine: SimulatedEngine;
  server: WorkerServer;
  stop(): Promise<void>;
}

export async function startWorker(opts: SimulatedEngineOptions = {}): Promise<TestWorker> {
  const engine = new SimulatedEngine({ base_ms: 0, per_item_ms: 0, ...opts });
  const server = await WorkerServer.start({ engine });
  return {
    engine,
    server,
    stop: async () => {
      await server.stop();
      await engine.close();
    },
  };
}

export function testConfig(url: string, overrides: SluiceConfigInput = {}): SluiceConfig {
  return loadConfig({
    env: {},
    overrides: {
      ...overrides,
      servers: [url],
      telemetry: { metricsPort: -1, ...(overrides.telemetry ?? {}) },
      consumer: { ackWaitMs: 5_000, ...(overrides.consumer ?? {}) },
      pipeline: { pullExpiresMs: 1_000, retryBaseMs: 50, retryMaxMs: 500, ...(overrides.pipeline ?? {}) },
    },
  });
}

export function models(names: string[], spec: Partial<ModelSpec> = {}): Record<string, ModelSpec> {
  return Object.fromEntries(names.map((n) => [n, { versions: { v1: { weight: 100 } }, batch: { max_size: 32, max_delay_ms: 5 }, ...spec }]));
}

export async function startPipeline(config: SluiceConfig): Promise<PipelineService> {
  return PipelineService.start(config, { logger: silentLogger });
}
