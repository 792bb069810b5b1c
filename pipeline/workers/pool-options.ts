/** What the worker pool is given and what it tells: connections, options, events, defaults, snapshots. */
import type { ItemReply } from "../../operators/dispatch-batch.js";
import type { Priority } from "../../proto/wire.js";
import type { Tracing } from "../telemetry/types.js";
import type { HealthStatus, WorkerBatch, WorkerChunk, WorkerGenerateRequest, WorkerLoadReport } from "./worker-messages.js";
import type { RoutingPolicyName, RoutingTunables } from "./routing-policy.js";
import type { Breaker, BreakerState } from "./breaker.js";

/** What the pool needs of a connection to one worker. */
export interface WorkerConnection {
  generate?(
    req: WorkerGenerateRequest,
    opts: { deadlineMs?: number; traceparent?: string; tracestate?: string; signal?: AbortSignal },
  ): AsyncIterable<WorkerChunk>;
  infer(
    batch: WorkerBatch,
    opts: { deadlineMs?: number; traceparent?: string; tracestate?: string },
  ): Promise<{ results: ItemReply[]; engine_ms?: number }>;
  /** Load report (`GetLoad`); undefined when the worker has none. */
  load?(opts: { prefixBlocks?: boolean }): Promise<WorkerLoadReport | undefined>;
  /** Standard health check; rejects when the worker cannot be reached. */
  check?(): Promise<HealthStatus>;
  close(): void | Promise<void>;
}

export interface WorkerPoolOptions {
  /** Batches in flight per worker before it counts as busy. */
  batchesPerWorker: number;
  /** Call timeout per model (the registry's `timeout_ms`). */
  timeoutMs: (model: string) => number;
  /** Opens a connection to an endpoint. */
  connect: (endpoint: string) => WorkerConnection;
  /** Consecutive failures that eject a worker. */
  ejectAfterFailures?: number;
  /** First ejection period; doubles while the worker keeps failing, up to `maxEjectForMs`. */
  ejectForMs?: number;
  maxEjectForMs?: number;
  /** Health check period; 0 turns health checks off. */
  healthIntervalMs?: number;
  /** Retries allowed as a fraction of calls (plus `minRetriesPerSecond`). */
  retryBudgetRatio?: number;
  minRetriesPerSecond?: number;
  /** Backoff before retrying on another worker. */
  retryBackoffMs?: number;
  /** Hears pool events (for logs and metrics). Must not throw. */
  onEvent?: (e: PoolEvent) => void;
  /** Batch and gRPC client spans. */
  tracing?: Tracing;
  /** Routing policy per model; default `least-loaded`. */
  routing?: (model: string) => RoutingPolicyName;
  /** Period of the load reports asked of workers; 0 turns them off. */
  loadIntervalMs?: number;
  /** How long a prompt block sent to a worker is assumed cached there. */
  prefixTtlMs?: number;
  /** Weights of the `prefix` policy. */
  routingTunables?: RoutingTunables;
  /** Hears each finished batch call (for metrics). Must not throw. */
  onBatch?: (b: { model: string; version: string; size: number; workerSeconds: number; ok: boolean }) => void;
}

export type PoolEvent =
  | { type: "added" | "removed"; endpoint: string; key: string }
  | { type: "healthy" | "unhealthy"; endpoint: string; reason?: string }
  | { type: "ejected"; endpoint: string; forMs: number }
  | { type: "restored"; endpoint: string }
  | { type: "retry"; endpoint: string; key: string; reason: string }
  | { type: "retry-budget-exhausted"; key: string };

export const DEFAULT_EJECT_AFTER_FAILURES = 3;
export const DEFAULT_EJECT_FOR_MS = 1_000;
export const DEFAULT_MAX_EJECT_FOR_MS = 30_000;
export const DEFAULT_HEALTH_INTERVAL_MS = 1_000;
export const DEFAULT_RETRY_BUDGET_RATIO = 0.2;
export const DEFAULT_MIN_RETRIES_PER_SECOND = 10;
export const DEFAULT_RETRY_BACKOFF_MS = 25;
/** Cap of the backoff between attempts of one batch. */
export const MAX_RETRY_BACKOFF_MS = 1_000;
/** Capacity assumed for a worker that does not advertise one. */
export const DEFAULT_WORKER_CAPACITY = 64;
export const DEFAULT_LOAD_INTERVAL_MS = 500;
/** A load report older than this many intervals is no longer used. */
export const LOAD_REPORT_STALE_INTERVALS = 4;
/** A worker that answered UNIMPLEMENTED is asked again after this. */
export const LOAD_REPORT_RETRY_MS = 60_000;

export interface PoolWorker {
  readonly endpoint: string;
  readonly conn: WorkerConnection;
  capacity: number;
  /** Batches and items in flight. */
  batches: number;
  items: number;
  readonly breaker: Breaker;
  /** Health as last checked; a worker starts healthy so traffic flows before the first check. */
  healthy: boolean;
  /** Removed from every key: finish what is in flight, then close. */
  draining: boolean;
  readonly keys: Set<string>;
  /** Its last load report and when it came. */
  report?: { load: WorkerLoadReport; atMs: number };
  /** It answered UNIMPLEMENTED: not asked again before this time. */
  noReportUntil: number;
  loadPending: boolean;
}

/** What routing needs of a request (or of a batch's first request). */
export interface RouteOf {
  readonly model: string;
  readonly promptTokens: number;
  readonly hashes: string[];
  readonly session?: string;
}

export interface WorkerSnapshot {
  endpoint: string;
  keys: string[];
  capacity: number;
  inflightBatches: number;
  inflightItems: number;
  failures: number;
  healthy: boolean;
  breaker: BreakerState;
  /** The worker's last load report, when it sends them. */
  load?: { waiting: number; running: number; kvUsage: number };
}

export const keyOf = (model: string, version: string): string => `${model}@${version}`;
export const PRIORITY_RANK: Record<Priority, number> = { high: 0, normal: 1, low: 2 };
