/**
 * The routing side of a pipeline, built the same way for the service and for a replay: the
 * model registry (or a fixed table), a worker pool, and the worker directory that fills the
 * pool from the worker registrations. A replay gets a pool of its own, so its batches and
 * breakers do not mix with live traffic, but the same workers.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import type { SluiceConfig } from "../config.js";
import { ModelRegistry, type ModelTable } from "../routing/registry.js";
import type { PipelineLogger } from "../support/logger.js";
import { Teardowns } from "../support/teardown.js";
import type { Tracing } from "../telemetry/types.js";
import { WorkerClient } from "./client.js";
import { WorkerDirectory } from "./directory.js";
import { WorkerPool } from "./pool.js";
import type { PoolEvent, WorkerConnection, WorkerPoolOptions } from "./pool-options.js";

export interface FleetOptions {
  config: SluiceConfig;
  log: PipelineLogger;
  /** Prefix of what is logged (`"replay "` for a replay). */
  logPrefix?: string;
  /** Route with this table instead of the registry (the registry is not opened). */
  table?: ModelTable;
  /** Seed the registry with the configuration's models (the service does; a replay reads only). */
  seedModels?: boolean;
  /** Log the pool's informational events too (workers added, healthy, ...), not only its warnings. */
  logPoolInfo?: boolean;
  connectWorker?: (endpoint: string) => WorkerConnection;
  tracing?: Tracing;
  onBatch?: WorkerPoolOptions["onBatch"];
}

export interface Fleet {
  /** Undefined when a table was given. */
  readonly registry: ModelRegistry | undefined;
  readonly table: ModelTable;
  readonly pool: WorkerPool;
  readonly directory: WorkerDirectory;
  /** Stops the directory, the registry and the pool, each even when another fails. */
  stop(): Promise<void>;
}

/** Opens the registry, the pool and the directory; on a failure, stops what it opened. */
export async function openFleet(nc: NatsConnection, o: FleetOptions): Promise<Fleet> {
  const { config, log } = o;
  const prefix = o.logPrefix ?? "";
  const teardowns = new Teardowns();
  try {
    let registry: ModelRegistry | undefined;
    if (!o.table) {
      registry = await ModelRegistry.open(nc, {
        replicas: config.streams.replicas,
        ...(o.seedModels ? { seed: config.models } : {}),
        timeoutMs: config.pipeline.defaultTimeoutMs,
        onInvalid: (key, err) => log.warn(`${prefix}registry: ignoring invalid value of '${key}': ${err.message}`),
      });
      const opened = registry;
      teardowns.add("model registry", () => opened.stop());
    }
    const table = o.table ?? registry!.table;
    const pool = new WorkerPool({
      batchesPerWorker: config.pipeline.batchesPerWorker,
      timeoutMs: (model) => table.timeoutMs(model),
      routing: (model) => table.routing(model),
      connect: o.connectWorker ?? ((endpoint) => new WorkerClient(endpoint)),
      healthIntervalMs: config.pipeline.healthIntervalMs,
      ...(o.tracing ? { tracing: o.tracing } : {}),
      ...(o.onBatch ? { onBatch: o.onBatch } : {}),
      onEvent: (e: PoolEvent) => {
        if (e.type === "unhealthy" || e.type === "ejected" || e.type === "retry-budget-exhausted") log.warn(`${prefix}worker pool: ${JSON.stringify(e)}`);
        else if (o.logPoolInfo && e.type !== "retry") log.info(`${prefix}worker pool: ${JSON.stringify(e)}`);
      },
    });
    teardowns.add("worker pool", () => pool.stop());
    for (const w of config.workers) pool.add(w.model, w.version, w.endpoint, w.capacity);
    const directory = await WorkerDirectory.start(nc, pool, {
      ttlMs: config.pipeline.workerTtlMs,
      replicas: config.streams.replicas,
      onInvalid: (key, why) => log.warn(`${prefix}worker registry: ignoring '${key}': ${why}`),
    });
    teardowns.add("worker directory", () => directory.stop());
    return { registry, table, pool, directory, stop: () => teardowns.run() };
  } catch (err) {
    await teardowns.run().catch(() => undefined);
    throw err;
  }
}
