/**
 * Configuration: defaults, then a JSON file (`--config` or SLUICE_CONFIG), then environment
 * variables, then command-line flags. Every tunable has a named default here.
 */
import { readFileSync } from "node:fs";
import type { Priority } from "../proto/wire.js";
import { DEFAULT_CACHE_MAX_AGE_MS, DEFAULT_CACHE_MAX_BYTES } from "./cache/result-cache.js";
import type { ModelSpec } from "./routing/registry.js";
import { parseTenantsConfig, type TenantLimits } from "./routing/tenant-limits.js";
import { defaultGatewaySettings, validateGatewaySettings, type GatewaySettings } from "./gateway/config.js";

export const DEFAULT_NATS_URL = "nats://127.0.0.1:4222";

export interface StreamsConfig {
  /** Replicas of every stream (3 on a cluster). */
  replicas: number;
  /** How long requests are kept for replay. */
  requestsMaxAgeMs: number;
  /** Queue bound: the request stream refuses new messages beyond this (0 = unlimited). */
  requestsMaxMsgs: number;
  requestsMaxBytes: number;
  /** Idempotency window: a request id published again within it is the same request. */
  duplicateWindowMs: number;
  resultsMaxAgeMs: number;
  dlqMaxAgeMs: number;
  /** Largest message the streams accept. */
  maxMsgSize: number;
  /**
   * Longest an answer stays in the result cache (bucket `infer_cache`), whatever a model's
   * `cache.ttl_ms`: NATS 2.9 has no per-message TTL, so this is the bucket's max age.
   */
  cacheMaxAgeMs: number;
  /** Size bound of the result cache; when full, new answers are not stored until old ones expire. */
  cacheMaxBytes: number;
}

export interface ConsumerSettings {
  /** Durable name prefix; the consumer of priority p is `<prefix>-<p>`. */
  durablePrefix: string;
  ackWaitMs: number;
  /** Deliveries before a request is answered with its last error and dead-lettered. */
  maxDeliver: number;
  /** Server-side bound of unacknowledged messages per consumer (all pipeline processes). */
  maxAckPending: number;
}

export interface PipelineSettings {
  /** The client-side bound: unsettled messages held by this process, all priorities together. */
  maxInFlight: number;
  /**
   * Fair share between tenants inside a priority: a tenant that floods its priority gets a
   * temporary lane (consumer) of its own, so its burst does not hold up another's trickle (see
   * pipeline/intake/lanes.ts). Off: one consumer per priority, stream order, never a lane.
   */
  tenantLanes: boolean;
  /**
   * With tenant lanes, what a tenant's fair share counts: `tokens` (prompt plus completion,
   * estimated from the request and corrected by its usage: a tenant with longer prompts gets
   * fewer requests, not more of the device) or `requests`.
   */
  fairShare: "tokens" | "requests";
  /** Shares of the in-flight bound under backlog, per priority (an idle priority lends its share). */
  priorityWeights: Record<Priority, number>;
  maxPayloadBytes: number;
  pullExpiresMs: number;
  /** Concurrent result publishes awaiting their acknowledgement. */
  publishConcurrency: number;
  /**
   * How long a result whose publish failed is tried again in place (the same result, no second
   * run on a worker) before the request goes back to the queue. A result the client already got
   * but INFER_RES refused is stored under `infer.kept.<tenant>.<id>` instead of being sent again,
   * or dead-lettered with the reason when that fails for this long. 0: back to the queue at once.
   */
  publishRetryMs: number;
  /** Batches in flight per worker: one running on the device and one waiting, to hide the round trip. */
  batchesPerWorker: number;
  /** First redelivery delay after a retriable failure; doubles per delivery. */
  retryBaseMs: number;
  retryMaxMs: number;
  /** Default call timeout when a model sets none. */
  defaultTimeoutMs: number;
  priorities: Priority[];
  /** Longest a request held back by its tenant's limits (policy `delay`) waits before it is refused. */
  tenantMaxWaitMs: number;
  /** Period of gRPC health checks of each worker; 0 turns them off. */
  healthIntervalMs: number;
  /** A registered worker that has not refreshed its entry for this long is dropped. */
  workerTtlMs: number;
}

export interface StaticWorker {
  model: string;
  version: string;
  endpoint: string;
  capacity?: number;
}

export interface TelemetrySettings {
  /** Port of `/metrics`, `/healthz`, `/readyz`; 0 picks a free one, -1 turns the server off. */
  metricsPort: number;
  metricsHost: string;
  /**
   * OTLP traces endpoint (e.g. http://jaeger:4318/v1/traces); empty: the standard OTEL_* variables
   * decide, and without an endpoint tracing is off.
   */
  tracesEndpoint: string;
  /** Service name of the pipeline's spans (OTEL_SERVICE_NAME overrides). */
  serviceName: string;
}

/** The claim check: bodies over a threshold travel through the object store (docs/protocol.md). */
export interface PayloadSettings {
  /** Results larger than this (bytes of JSON) are written to the tenant's object store bucket. */
  thresholdBytes: number;
  /** Largest body read from the object store (a request) or written to it (a result). */
  maxObjectBytes: number;
  /** Bytes of large request bodies held in memory at once; pulling waits beyond it. */
  memoryBytes: number;
  /** How often the sweeper looks for objects whose message is gone (0: no sweeper in this process). */
  sweepIntervalMs: number;
  /** An object younger than this is never swept (a write whose message is still on its way). */
  orphanGraceMs: number;
}

export interface SluiceConfig {
  servers: string[];
  telemetry: TelemetrySettings;
  streams: StreamsConfig;
  consumer: ConsumerSettings;
  pipeline: PipelineSettings;
  payloads: PayloadSettings;
  /** Models written to the registry at start-up when the registry does not have them yet. */
  models: Record<string, ModelSpec>;
  /** Workers known from configuration (besides those that register themselves). */
  workers: StaticWorker[];
  /**
   * Per-tenant limits written to the tenant registry (bucket `infer_tenants`) at start-up when it
   * does not have them yet; `"*"` applies to tenants not listed.
   */
  tenants: Record<string, TenantLimits>;
  /** The HTTP / OpenAI gateway (`sluice gateway`). */
  gateway: GatewaySettings;
}

const MINUTE = 60_000;
const DAY = 24 * 60 * MINUTE;

export function defaultConfig(): SluiceConfig {
  return {
    servers: [DEFAULT_NATS_URL],
    telemetry: { metricsPort: 9464, metricsHost: "0.0.0.0", tracesEndpoint: "", serviceName: "sluice-pipeline" },
    streams: {
      replicas: 1,
      requestsMaxAgeMs: 7 * DAY,
      requestsMaxMsgs: 0,
      requestsMaxBytes: 0,
      duplicateWindowMs: 2 * MINUTE,
      resultsMaxAgeMs: DAY,
      dlqMaxAgeMs: 14 * DAY,
      maxMsgSize: 1024 * 1024,
      cacheMaxAgeMs: DEFAULT_CACHE_MAX_AGE_MS,
      cacheMaxBytes: DEFAULT_CACHE_MAX_BYTES,
    },
    consumer: {
      durablePrefix: "sluice",
      ackWaitMs: 30_000,
      maxDeliver: 5,
      maxAckPending: 4096,
    },
    pipeline: {
      maxInFlight: 256,
      priorityWeights: { high: 8, normal: 4, low: 1 },
      tenantLanes: true,
      fairShare: "tokens",
      maxPayloadBytes: 256 * 1024,
      pullExpiresMs: 5_000,
      publishConcurrency: 256,
      publishRetryMs: 30_000,
      batchesPerWorker: 2,
      retryBaseMs: 250,
      retryMaxMs: 10_000,
      defaultTimeoutMs: 30_000,
      priorities: ["high", "normal", "low"],
      tenantMaxWaitMs: 30_000,
      healthIntervalMs: 1_000,
      workerTtlMs: 15_000,
    },
    payloads: {
      thresholdBytes: 256 * 1024,
      maxObjectBytes: 64 * 1024 * 1024,
      memoryBytes: 256 * 1024 * 1024,
      sweepIntervalMs: 5 * MINUTE,
      orphanGraceMs: 10 * MINUTE,
    },
    models: {},
    workers: [],
    tenants: {},
    gateway: defaultGatewaySettings(),
  };
}

export class ConfigError extends Error {
  override readonly name = "ConfigError";
}

type DeepPartial<T> = { [K in keyof T]?: T[K] extends object ? (T[K] extends unknown[] ? T[K] : DeepPartial<T[K]>) : T[K] };
export type SluiceConfigInput = DeepPartial<SluiceConfig>;

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function merge<T>(base: T, over: unknown, path: string): T {
  if (over === undefined) return base;
  if (!isPlainObject(base) || !isPlainObject(over)) return over as T;
  const out: Record<string, unknown> = { ...base };
  for (const [k, v] of Object.entries(over)) {
    const free = path === "models" || path === "tenants" || path === "gateway.apiKeys";
    if (!(k in base) && !free) throw new ConfigError(`unknown configuration key '${path ? path + "." : ""}${k}'`);
    out[k] = free || k === "models" || k === "tenants" ? v : merge((base as Record<string, unknown>)[k], v, path ? `${path}.${k}` : k);
  }
  return out as T;
}

function envInt(env: NodeJS.ProcessEnv, name: string): number | undefined {
  const v = env[name];
  if (v === undefined || v === "") return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new ConfigError(`${name} must be a non-negative integer, got '${v}'`);
  return n;
}

/** Parses `model@version=host:port[*capacity],...` (SLUICE_WORKERS, --workers). */
export function parseWorkerList(s: string): StaticWorker[] {
  return s
    .split(",")
    .map((x) => x.trim())
    .filter(Boolean)
    .map((item) => {
      const m = /^([a-z0-9_-]{1,64})@([A-Za-z0-9._-]{1,64})=([^*\s]+?)(?:\*(\d+))?$/.exec(item);
      if (!m) throw new ConfigError(`bad worker '${item}': expected model@version=host:port[*capacity]`);
      const w: StaticWorker = { model: m[1]!, version: m[2]!, endpoint: m[3]! };
      if (m[4] !== undefined) w.capacity = Number(m[4]);
      return w;
    });
}

export interface LoadConfigOptions {
  file?: string;
  env?: NodeJS.ProcessEnv;
  overrides?: SluiceConfigInput;
}

export function loadConfig(opts: LoadConfigOptions = {}): SluiceConfig {
  const env = opts.env ?? process.env;
  let cfg = defaultConfig();
  const file = opts.file ?? env["SLUICE_CONFIG"];
  if (file) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(readFileSync(file, "utf8"));
    } catch (err) {
      throw new ConfigError(`cannot read configuration file '${file}': ${(err as Error).message}`);
    }
    cfg = merge(cfg, parsed, "");
  }
  if (env["NATS_URL"]) cfg.servers = env["NATS_URL"].split(",").map((s) => s.trim());
  const maxInFlight = envInt(env, "SLUICE_MAX_IN_FLIGHT");
  if (maxInFlight !== undefined) cfg.pipeline.maxInFlight = maxInFlight;
  const metricsPort = env["SLUICE_METRICS_PORT"];
  if (metricsPort !== undefined && metricsPort !== "") {
    const n = Number(metricsPort);
    if (!Number.isInteger(n) || n < -1 || n > 65535) throw new ConfigError(`SLUICE_METRICS_PORT must be a port, 0 or -1; got '${metricsPort}'`);
    cfg.telemetry.metricsPort = n;
  }
  const gatewayPort = envInt(env, "SLUICE_GATEWAY_PORT");
  if (gatewayPort !== undefined) cfg.gateway.port = gatewayPort;
  if (env["SLUICE_CALLBACK_SECRET"]) cfg.gateway.callbackSecret = env["SLUICE_CALLBACK_SECRET"];
  const replicas = envInt(env, "SLUICE_REPLICAS");
  if (replicas !== undefined) cfg.streams.replicas = replicas;
  if (env["SLUICE_WORKERS"]) cfg.workers = [...cfg.workers, ...parseWorkerList(env["SLUICE_WORKERS"])];
  cfg = merge(cfg, opts.overrides, "");
  validateConfig(cfg);
  return cfg;
}

export function validateConfig(cfg: SluiceConfig): void {
  const pos = (v: number, name: string): void => {
    if (!Number.isFinite(v) || v <= 0) throw new ConfigError(`${name} must be a positive number, got ${v}`);
  };
  if (cfg.servers.length === 0) throw new ConfigError("no NATS server given");
  pos(cfg.pipeline.maxInFlight, "pipeline.maxInFlight");
  for (const [p, w] of Object.entries(cfg.pipeline.priorityWeights)) {
    if (!["high", "normal", "low"].includes(p)) throw new ConfigError(`pipeline.priorityWeights: unknown priority '${p}'`);
    if (typeof w !== "number" || !Number.isFinite(w) || w <= 0) throw new ConfigError(`pipeline.priorityWeights.${p} must be a number > 0`);
  }
  if (cfg.pipeline.fairShare !== "tokens" && cfg.pipeline.fairShare !== "requests")
    throw new ConfigError(`pipeline.fairShare must be "tokens" or "requests", got ${JSON.stringify(cfg.pipeline.fairShare)}`);
  pos(cfg.pipeline.maxPayloadBytes, "pipeline.maxPayloadBytes");
  pos(cfg.pipeline.batchesPerWorker, "pipeline.batchesPerWorker");
  if (!Number.isFinite(cfg.pipeline.publishRetryMs) || cfg.pipeline.publishRetryMs < 0)
    throw new ConfigError(`pipeline.publishRetryMs must be a number >= 0, got ${cfg.pipeline.publishRetryMs}`);
  pos(cfg.consumer.ackWaitMs, "consumer.ackWaitMs");
  pos(cfg.consumer.maxDeliver, "consumer.maxDeliver");
  pos(cfg.consumer.maxAckPending, "consumer.maxAckPending");
  pos(cfg.streams.replicas, "streams.replicas");
  pos(cfg.streams.cacheMaxAgeMs, "streams.cacheMaxAgeMs");
  pos(cfg.streams.cacheMaxBytes, "streams.cacheMaxBytes");
  pos(cfg.payloads.thresholdBytes, "payloads.thresholdBytes");
  pos(cfg.payloads.maxObjectBytes, "payloads.maxObjectBytes");
  pos(cfg.payloads.memoryBytes, "payloads.memoryBytes");
  pos(cfg.payloads.orphanGraceMs, "payloads.orphanGraceMs");
  if (!Number.isFinite(cfg.payloads.sweepIntervalMs) || cfg.payloads.sweepIntervalMs < 0)
    throw new ConfigError(`payloads.sweepIntervalMs must be a number >= 0, got ${cfg.payloads.sweepIntervalMs}`);
  try {
    parseTenantsConfig(cfg.tenants);
  } catch (err) {
    throw new ConfigError((err as Error).message);
  }
  try {
    validateGatewaySettings(cfg.gateway);
  } catch (err) {
    throw new ConfigError((err as Error).message);
  }
  if (cfg.consumer.maxAckPending < cfg.pipeline.maxInFlight)
    throw new ConfigError("consumer.maxAckPending must be at least pipeline.maxInFlight");
}
