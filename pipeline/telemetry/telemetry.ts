/**
 * Tracing: one trace follows a request from the client's publish, through its wait in
 * JetStream, the batch and the worker, to the published result, after OpenTelemetry's
 * messaging and RPC conventions. Context travels with each message (NATS headers, gRPC
 * metadata, the delivery it belongs to), never through ambient async context: batching
 * timers lose ambient context.
 *
 * ```
 * service   kind      name                    parent
 * client    PRODUCER  send infer.req          the caller's context, or none (a new trace)
 * pipeline  CONSUMER  receive infer.req       the publish (from `traceparent`); starts when JetStream stored the message
 *           INTERNAL  queue wait              the receive span: stored -> pulled
 *           CONSUMER  process infer.req       none (the batch); a link to every request
 *           INTERNAL  batch                   each request's receive span: its time in the batch; a link to the batch
 *           CLIENT    infer.v1.Worker/Infer   the batch, one per attempt; its context goes in the gRPC metadata
 *           PRODUCER  send infer.res          the receive span; its context goes in the result's headers
 * worker    SERVER    infer.v1.Worker/Infer   the CLIENT span (from the metadata)
 *           INTERNAL  engine infer            the server span
 * ```
 *
 * Each process builds its own tracer provider (nothing is registered process-wide), so the
 * pipeline and a worker can share a process under their own service names. Tracing is on only
 * when an OTLP endpoint is configured; otherwise {@link startTracing} returns a tracing that
 * records nothing but still passes incoming trace context through. Telemetry never throws into
 * the host and never blocks it: span calls are in-memory, the export queue is bounded and
 * counts what it drops, and `forceFlush()`/`shutdown()` resolve within a bound even when the
 * collector is down.
 *
 * ```ts
 * const tracing = startTracing({ serviceName: SERVICE_PIPELINE });
 * const req = tracing.startRequest(job.delivery, job);     // after decode
 * const bt = tracing.startBatch(batch);                     // at dispatch
 * const call = bt.startWorkerCall(endpoint);                // per attempt: send call.carrier as metadata
 * call.end(); bt.end();
 * const pub = req.startPublish(resultSubject);              // pub.carrier goes in the result's headers
 * pub.end(); tracing.settle(settled);                       // ends the receive span
 * await tracing.shutdown();
 * ```
 */
import { randomUUID } from "node:crypto";
import { hostname } from "node:os";
import * as grpc from "@grpc/grpc-js";
import {
  defaultTextMapSetter,
  isSpanContextValid,
  ROOT_CONTEXT,
  SamplingDecision,
  SpanKind,
  SpanStatusCode,
  trace,
  TraceFlags,
  INVALID_SPAN_CONTEXT,
  type Attributes,
  type Context,
  type Link,
  type Sampler as ApiSampler,
  type SamplingResult,
  type Span,
  type SpanOptions,
  type TextMapGetter,
  type Tracer,
} from "@opentelemetry/api";
import { ExportResultCode, W3CTraceContextPropagator, type ExportResult } from "@opentelemetry/core";
import { OTLPTraceExporter as GrpcTraceExporter } from "@opentelemetry/exporter-trace-otlp-grpc";
import { OTLPTraceExporter as JsonTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { OTLPTraceExporter as ProtoTraceExporter } from "@opentelemetry/exporter-trace-otlp-proto";
import { defaultResource, resourceFromAttributes } from "@opentelemetry/resources";
import {
  AlwaysOffSampler,
  AlwaysOnSampler,
  BatchSpanProcessor,
  NodeTracerProvider,
  ParentBasedSampler,
  TraceIdRatioBasedSampler,
  type ReadableSpan,
  type Sampler,
  type Span as SdkSpan,
  type SpanExporter,
  type SpanProcessor,
} from "@opentelemetry/sdk-trace-node";
import { ATTR_ERROR_TYPE, ATTR_SERVER_ADDRESS, ATTR_SERVER_PORT, ATTR_SERVICE_NAME } from "@opentelemetry/semantic-conventions";
import type { Settled } from "../../operators/settle-outcome.js";
import { ConsoleLineExporter } from "./console-exporter.js";
import type { Engine, EngineBatch, EngineGeneration, EngineItemResult, EngineRequest, EngineToken } from "../../worker/engine.js";

export const SERVICE_PIPELINE = "sluice-pipeline";
export const SERVICE_WORKER = "sluice-worker";
export const SERVICE_CLIENT = "sluice-client";

/** Spans waiting for export; beyond this they are dropped (and counted). */
export const DEFAULT_MAX_QUEUE_SIZE = 2048;
export const DEFAULT_MAX_EXPORT_BATCH_SIZE = 512;
export const DEFAULT_SCHEDULED_DELAY_MS = 5_000;
/** How long the batch processor waits for one export. */
export const DEFAULT_EXPORT_TIMEOUT_MS = 30_000;
/** Deadline of one OTLP request, retries included. */
export const DEFAULT_OTLP_TIMEOUT_MS = 10_000;
/** Longest `forceFlush()` and `shutdown()` keep their caller waiting. */
export const DEFAULT_FLUSH_TIMEOUT_MS = 5_000;

const INSTRUMENTATION_NAME = "sluice";
const REQUEST_SUBJECT_TEMPLATE = "infer.req.{priority}.{tenant}.{model}";
const WORKER_RPC_SERVICE = "infer.v1.Worker";

/**
 * Attribute keys. Messaging and RPC keys are those of the OpenTelemetry semantic conventions
 * (still incubating there, so they are spelled out here rather than imported); `sluice.*` keys
 * are this project's own.
 */
export const ATTR = {
  messagingSystem: "messaging.system",
  destinationName: "messaging.destination.name",
  destinationTemplate: "messaging.destination.template",
  operationType: "messaging.operation.type",
  operationName: "messaging.operation.name",
  messageId: "messaging.message.id",
  batchMessageCount: "messaging.batch.message_count",
  bodySize: "messaging.message.body.size",
  consumerGroup: "messaging.consumer.group.name",
  rpcSystem: "rpc.system",
  rpcService: "rpc.service",
  rpcMethod: "rpc.method",
  serverAddress: ATTR_SERVER_ADDRESS,
  serverPort: ATTR_SERVER_PORT,
  networkPeerAddress: "network.peer.address",
  errorType: ATTR_ERROR_TYPE,
  tenant: "sluice.tenant",
  model: "sluice.model",
  version: "sluice.version",
  priority: "sluice.priority",
  streamSequence: "sluice.stream.sequence",
  deliveryCount: "sluice.delivery.count",
  queueMs: "sluice.queue_ms",
  batchSize: "sluice.batch.size",
  worker: "sluice.worker",
  attempt: "sluice.attempt",
  status: "sluice.status",
  settleAction: "sluice.settle.action",
  deadLettered: "sluice.dead_lettered",
  itemErrors: "sluice.item_errors",
  tokens: "sluice.tokens",
} as const;

export type TracesProtocol = "http/protobuf" | "http/json" | "grpc";
export const TRACES_PROTOCOLS: readonly TracesProtocol[] = ["http/protobuf", "http/json", "grpc"];
/** Values of `OTEL_TRACES_EXPORTER` that are supported (besides `none`). */
export type TracesExporter = "otlp" | "console";

/** The values of `OTEL_TRACES_SAMPLER` that are supported. */
export type SamplerName =
  | "always_on"
  | "always_off"
  | "traceidratio"
  | "parentbased_always_on"
  | "parentbased_always_off"
  | "parentbased_traceidratio";
export const SAMPLER_NAMES: readonly SamplerName[] = [
  "always_on",
  "always_off",
  "traceidratio",
  "parentbased_always_on",
  "parentbased_always_off",
  "parentbased_traceidratio",
];

export type Env = Readonly<Record<string, string | undefined>>;

/**
 * Options of {@link startTracing}. Every option given here wins over the standard environment
 * variables; what is not given comes from them, then from the defaults.
 */
export interface TracingOptions {
  /** `sluice-pipeline`, `sluice-worker` or `sluice-client`; `OTEL_SERVICE_NAME` overrides it. */
  serviceName: string;
  /** Where `OTEL_*` variables are read; `process.env` by default. */
  env?: Env;
  /** OTLP base endpoint, as `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` is appended for HTTP). */
  endpoint?: string;
  /** Full traces URL, as `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as given); wins over `endpoint`. */
  tracesEndpoint?: string;
  /**
   * As `OTEL_TRACES_EXPORTER`: `otlp` (default; needs an endpoint) or `console` (one line per
   * span on stderr, no collector needed).
   */
  exporter?: TracesExporter;
  /** As `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`; `http/protobuf` by default. */
  protocol?: TracesProtocol;
  /** As `OTEL_TRACES_SAMPLER`; `parentbased_always_on` by default. */
  sampler?: SamplerName;
  /** As `OTEL_TRACES_SAMPLER_ARG`: the ratio of the ratio samplers, 0..1. */
  samplerRatio?: number;
  serviceVersion?: string;
  /** Extra resource attributes (over `OTEL_RESOURCE_ATTRIBUTES`). */
  resourceAttributes?: Readonly<Record<string, string>>;
  /** As `OTEL_BSP_MAX_QUEUE_SIZE`. */
  maxQueueSize?: number;
  /** As `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`. */
  maxExportBatchSize?: number;
  /** As `OTEL_BSP_SCHEDULE_DELAY`. */
  scheduledDelayMs?: number;
  /** As `OTEL_BSP_EXPORT_TIMEOUT`. */
  exportTimeoutMs?: number;
  /** As `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`: deadline of one OTLP request, retries included. */
  otlpTimeoutMs?: number;
  /** Longest `forceFlush()`/`shutdown()` wait; default {@link DEFAULT_FLUSH_TIMEOUT_MS}. */
  flushTimeoutMs?: number;
  /** Hears configuration problems (an unknown protocol, a bad number); must not throw. */
  onWarning?: (message: string) => void;
}

/** The configuration {@link startTracing} runs with, after options, environment and defaults. */
export interface ResolvedTracingConfig {
  /** True when there is an endpoint to export to (and the SDK is not disabled). */
  readonly enabled: boolean;
  readonly serviceName: string;
  /** The traces URL the exporter sends to. */
  readonly url: string | undefined;
  /** `otlp` to `url`, or `console` (stderr). */
  readonly exporter: TracesExporter;
  readonly protocol: TracesProtocol;
  readonly sampler: SamplerName;
  readonly samplerRatio: number;
  /** Headers of every export request (`OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`). */
  readonly headers: Readonly<Record<string, string>>;
  readonly resourceAttributes: Readonly<Record<string, string>>;
  readonly maxQueueSize: number;
  readonly maxExportBatchSize: number;
  readonly scheduledDelayMs: number;
  readonly exportTimeoutMs: number;
  readonly otlpTimeoutMs: number;
  readonly flushTimeoutMs: number;
  /** What was ignored and why. */
  readonly warnings: readonly string[];
}

/** W3C trace context as it travels in NATS headers and gRPC metadata. */
export interface TraceCarrier {
  traceparent?: string;
  tracestate?: string;
}

/** Counts of a tracing's life, for metrics and tests. */
export interface TracingStats {
  /** Spans the collector accepted. */
  readonly spansExported: number;
  /** Spans dropped before export: the queue was full, or tracing was shut down. */
  readonly spansDropped: number;
  /** Spans lost in failed exports (collector down, refused, timed out). */
  readonly spansFailed: number;
  /** Internal errors swallowed so that they never reach the host. */
  readonly errors: number;
}

/** One span, ended once. */
export interface SpanHandle {
  /** The context holding this span: the parent of its children, the target of links. */
  readonly context: Context;
  /** This span's W3C context, for message headers and gRPC metadata; empty when there is none. */
  readonly carrier: TraceCarrier;
  /** Trace id (32 hex), undefined when there is no valid context. */
  readonly traceId: string | undefined;
  /** False when nothing is recorded (tracing off, or not sampled). */
  readonly recording: boolean;
  setAttributes(attributes: Attributes): void;
  addEvent(name: string, attributes?: Attributes): void;
  /**
   * Ends the span. `status` is `"ok"` (the default) or an error code, recorded as `error.type`
   * with the span's status ERROR; `error`, when given, is recorded as an exception. Later calls
   * do nothing.
   */
  end(status?: string, error?: unknown): void;
}

/** The pipeline's span of one delivered request (CONSUMER `receive infer.req`). */
export interface RequestTrace extends SpanHandle {
  /** How long the message waited in JetStream (stored to pulled), ms. */
  readonly queueMs: number;
  /** Adds the decoded request's attributes (tenant, model, priority, version, id). */
  setJob(job: JobInfo): void;
  /** A PRODUCER span for publishing the request's result (or dead letter, or chunks) on `subject`. */
  startPublish(subject: string, attributes?: Attributes): SpanHandle;
  /** A CLIENT span for a worker call made for this request alone (a `Generate` stream). */
  startWorkerCall(endpoint: string, method?: WorkerMethod): SpanHandle;
}

/** The span of one batch (CONSUMER `process infer.req`), linked to each of its requests. */
export interface BatchTrace extends SpanHandle {
  /** A CLIENT span for one attempt of the batch's worker call; send its `carrier` as metadata. */
  startWorkerCall(endpoint: string, method?: WorkerMethod): SpanHandle;
}

/** The worker's span of one call (SERVER). */
export interface ServerCallTrace extends SpanHandle {
  /** An INTERNAL child span for the engine's work. */
  startEngine(operation?: string, attributes?: Attributes): SpanHandle;
}

export type WorkerMethod = "Infer" | "Generate";

/** What a request span needs of a delivery; a `Delivery` fits. */
export interface DeliveryInfo {
  readonly subject: string;
  readonly seq: number;
  readonly deliveryCount: number;
  /** When JetStream stored the message, epoch ms (the span starts here). */
  readonly storedAtMs: number;
  /** When the pipeline pulled it, epoch ms. */
  readonly pulledAtMs: number;
  /** Header value by name (case-insensitive); `traceparent` and `tracestate` are read. */
  header(name: string): string | undefined;
}

/** What a request span shows of the decoded request; an `InferJob` fits. */
export interface JobInfo {
  readonly id: string;
  readonly tenant: string;
  readonly model: string;
  readonly priority: string;
  readonly version?: string | undefined;
}

/** What a batch span needs; a `Batch` fits. */
export interface BatchInfo {
  readonly model: string;
  readonly version: string;
  readonly jobs: ReadonlyArray<{ readonly delivery: object; readonly traceparent?: string; readonly tracestate?: string }>;
}

/** What a server span needs of a call; the worker's `WorkerCallContext` fits. */
export interface ServerCallInfo {
  readonly method: string;
  readonly traceparent?: string | undefined;
  readonly tracestate?: string | undefined;
  readonly peer?: string | undefined;
  readonly workerId?: string | undefined;
}

/** What the client's publish span shows. */
export interface PublishInfo {
  readonly subject: string;
  /** The request id (`Nats-Msg-Id`). */
  readonly id: string;
  readonly tenant?: string;
  readonly model?: string;
  readonly priority?: string;
  readonly bodyBytes?: number;
}

export interface Tracing {
  /** True when spans are recorded and exported. */
  readonly enabled: boolean;
  readonly serviceName: string;
  readonly config: ResolvedTracingConfig;
  /**
   * Client: a PRODUCER span for publishing a request; put its `carrier` in the headers. `parent`
   * is a context, or the W3C carrier of one (the caller's `traceparent`).
   */
  startPublish(info: PublishInfo, parent?: Context | TraceCarrier): SpanHandle;
  /**
   * Pipeline: the CONSUMER span of a delivered request, child of the context in its headers (a
   * new trace when there is none), starting when JetStream stored it, with a `queue wait`
   * child up to the pull. Kept with the delivery until ended: see {@link requestOf}. Calling it
   * again for the same delivery returns the same span (adding `job`'s attributes).
   */
  startRequest(delivery: DeliveryInfo, job?: JobInfo, attributes?: Attributes): RequestTrace;
  /** The open request span of a delivery, if there is one. */
  requestOf(delivery: object): RequestTrace | undefined;
  /**
   * Pipeline: the span of a batch, linked to each job's request span (or to the job's own
   * trace context when it has no request span), with a `batch` child in each request's trace.
   */
  startBatch(batch: BatchInfo, attributes?: Attributes): BatchTrace;
  /** Pipeline: ends the request span of a settled outcome with its status. */
  settle(settled: Settled): void;
  /** Worker: the SERVER span of a call, child of the call's `traceparent`. */
  startServerCall(call: ServerCallInfo, attributes?: Attributes): ServerCallTrace;
  stats(): TracingStats;
  /** Exports what is queued; resolves within `flushTimeoutMs`, never rejects. */
  forceFlush(): Promise<void>;
  /** Flushes and stops; resolves within `flushTimeoutMs`, never rejects. Safe to call twice. */
  shutdown(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// Propagation: plain functions, independent of any tracing instance.

const propagator = new W3CTraceContextPropagator();
const HEADER_KEYS = ["traceparent", "tracestate"];

const lookupGetter: TextMapGetter<(name: string) => string | undefined> = {
  keys: () => HEADER_KEYS,
  get: (lookup, key) => lookup(key),
};

/** The trace context in message headers; the root context when absent or malformed. */
export function extractFromHeaders(get: (name: string) => string | undefined): Context {
  try {
    return propagator.extract(ROOT_CONTEXT, get, lookupGetter);
  } catch {
    return ROOT_CONTEXT;
  }
}

/** The trace context of a carrier (`{traceparent, tracestate}`); the root context when none. */
export function fromCarrier(carrier: TraceCarrier | undefined): Context {
  if (!carrier?.traceparent) return ROOT_CONTEXT;
  return extractFromHeaders((name) => (name === "traceparent" ? carrier.traceparent : name === "tracestate" ? carrier.tracestate : undefined));
}

/** The W3C context of the span in `ctx`; empty when it holds no valid span context. */
export function injectToCarrier(ctx: Context): TraceCarrier {
  try {
    const out: Record<string, string> = {};
    propagator.inject(ctx, out, defaultTextMapSetter);
    const carrier: TraceCarrier = {};
    if (out.traceparent) carrier.traceparent = out.traceparent;
    if (out.tracestate) carrier.tracestate = out.tracestate;
    return carrier;
  } catch {
    return {};
  }
}

// ---------------------------------------------------------------------------------------------
// Configuration.

/** Resolves options, the standard environment variables and defaults. Never throws. */
export function resolveTracingConfig(opts: TracingOptions): ResolvedTracingConfig {
  const env: Env = opts.env ?? process.env;
  const warnings: string[] = [];
  const read = (name: string): string | undefined => {
    const v = env[name]?.trim();
    return v ? v : undefined;
  };
  const positive = (given: number | undefined, name: string, fallback: number): number => {
    if (given !== undefined) {
      if (Number.isFinite(given) && given > 0) return Math.floor(given);
      warnings.push(`ignoring ${name} option ${given}: not a positive number`);
      return fallback;
    }
    const raw = read(name);
    if (raw === undefined) return fallback;
    const n = Number(raw);
    if (Number.isFinite(n) && n > 0) return Math.floor(n);
    warnings.push(`ignoring ${name}='${raw}': not a positive number`);
    return fallback;
  };

  const resourceAttributes: Record<string, string> = {
    ...parseKeyValueList(read("OTEL_RESOURCE_ATTRIBUTES"), "OTEL_RESOURCE_ATTRIBUTES", warnings),
    ...opts.resourceAttributes,
  };
  if (opts.serviceVersion) resourceAttributes["service.version"] = opts.serviceVersion;
  const serviceName = read("OTEL_SERVICE_NAME") ?? resourceAttributes[ATTR_SERVICE_NAME] ?? opts.serviceName;

  let protocol: TracesProtocol = "http/protobuf";
  const rawProtocol = opts.protocol ?? read("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") ?? read("OTEL_EXPORTER_OTLP_PROTOCOL");
  if (rawProtocol !== undefined) {
    if ((TRACES_PROTOCOLS as readonly string[]).includes(rawProtocol)) protocol = rawProtocol as TracesProtocol;
    else warnings.push(`unknown OTLP protocol '${rawProtocol}': using http/protobuf`);
  }

  // A traces endpoint is used as given; a base endpoint gets the signal's path over HTTP.
  const tracesEndpoint = opts.tracesEndpoint ?? (opts.endpoint === undefined ? read("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") : undefined);
  const baseEndpoint = opts.endpoint ?? read("OTEL_EXPORTER_OTLP_ENDPOINT");
  let url: string | undefined;
  if (tracesEndpoint) url = tracesEndpoint;
  else if (baseEndpoint) url = protocol === "grpc" ? baseEndpoint : `${baseEndpoint.replace(/\/+$/, "")}/v1/traces`;

  let sampler: SamplerName = "parentbased_always_on";
  const rawSampler = opts.sampler ?? read("OTEL_TRACES_SAMPLER");
  if (rawSampler !== undefined) {
    if ((SAMPLER_NAMES as readonly string[]).includes(rawSampler)) sampler = rawSampler as SamplerName;
    else warnings.push(`unsupported sampler '${rawSampler}': using parentbased_always_on`);
  }
  let samplerRatio = 1;
  const rawRatio = opts.samplerRatio ?? read("OTEL_TRACES_SAMPLER_ARG");
  if (rawRatio !== undefined && sampler.endsWith("traceidratio")) {
    const r = Number(rawRatio);
    if (Number.isFinite(r) && r >= 0 && r <= 1) samplerRatio = r;
    else warnings.push(`sampler ratio '${rawRatio}' is not within 0..1: using 1`);
  }

  const headers = {
    ...parseKeyValueList(read("OTEL_EXPORTER_OTLP_HEADERS"), "OTEL_EXPORTER_OTLP_HEADERS", warnings),
    ...parseKeyValueList(read("OTEL_EXPORTER_OTLP_TRACES_HEADERS"), "OTEL_EXPORTER_OTLP_TRACES_HEADERS", warnings),
  };

  const rawExporter = (opts.exporter ?? read("OTEL_TRACES_EXPORTER"))?.trim().toLowerCase();
  let exporter: TracesExporter = "otlp";
  if (rawExporter === "console") exporter = "console";
  else if (rawExporter !== undefined && rawExporter !== "" && rawExporter !== "otlp" && rawExporter !== "none") {
    warnings.push(`unsupported OTEL_TRACES_EXPORTER '${rawExporter}': using otlp`);
  }
  const disabled = read("OTEL_SDK_DISABLED")?.toLowerCase() === "true" || rawExporter === "none";
  const maxQueueSize = positive(opts.maxQueueSize, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE_SIZE);
  const otlpTimeoutDefault = positive(undefined, "OTEL_EXPORTER_OTLP_TIMEOUT", DEFAULT_OTLP_TIMEOUT_MS);
  return {
    enabled: (exporter === "console" || url !== undefined) && !disabled,
    serviceName,
    url,
    exporter,
    protocol,
    sampler,
    samplerRatio,
    headers,
    resourceAttributes,
    maxQueueSize,
    maxExportBatchSize: Math.min(positive(opts.maxExportBatchSize, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", DEFAULT_MAX_EXPORT_BATCH_SIZE), maxQueueSize),
    scheduledDelayMs: positive(opts.scheduledDelayMs, "OTEL_BSP_SCHEDULE_DELAY", DEFAULT_SCHEDULED_DELAY_MS),
    exportTimeoutMs: positive(opts.exportTimeoutMs, "OTEL_BSP_EXPORT_TIMEOUT", DEFAULT_EXPORT_TIMEOUT_MS),
    otlpTimeoutMs: positive(opts.otlpTimeoutMs, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", otlpTimeoutDefault),
    flushTimeoutMs: opts.flushTimeoutMs !== undefined && opts.flushTimeoutMs > 0 ? opts.flushTimeoutMs : DEFAULT_FLUSH_TIMEOUT_MS,
    warnings,
  };
}

/** `k1=v1,k2=v2` with percent-encoded values (the format of the OTEL_* list variables). */
function parseKeyValueList(raw: string | undefined, name: string, warnings: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  if (!raw) return out;
  for (const part of raw.split(",")) {
    const eq = part.indexOf("=");
    if (eq <= 0) {
      if (part.trim()) warnings.push(`ignoring '${part.trim()}' in ${name}: not key=value`);
      continue;
    }
    try {
      out[decodeURIComponent(part.slice(0, eq).trim())] = decodeURIComponent(part.slice(eq + 1).trim());
    } catch {
      warnings.push(`ignoring an entry of ${name}: bad percent-encoding`);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Entry point.

/**
 * Starts tracing for one service. With no endpoint configured and no `OTEL_TRACES_EXPORTER=console`
 * (or with `OTEL_SDK_DISABLED=true`,
 * `OTEL_TRACES_EXPORTER=none`) the returned tracing records nothing and passes incoming trace
 * context through unchanged. Never throws.
 */
export function startTracing(opts: TracingOptions): Tracing {
  const warn = (message: string): void => {
    try {
      opts.onWarning?.(message);
    } catch {
      // A warning hook never breaks the host.
    }
  };
  const config = resolveTracingConfig(opts);
  for (const w of config.warnings) warn(`tracing: ${w}`);
  if (!config.enabled) return new TracingImpl(config, undefined);
  try {
    return new TracingImpl(config, buildPipeline(config));
  } catch (err) {
    warn(`tracing: cannot start the exporter, tracing is off: ${errorMessage(err)}`);
    return new TracingImpl({ ...config, enabled: false }, undefined);
  }
}

interface MutableStats {
  spansExported: number;
  spansDropped: number;
  spansFailed: number;
  errors: number;
}

interface ExportPipeline {
  provider: NodeTracerProvider;
  tracer: Tracer;
  stats: MutableStats;
}

function buildPipeline(config: ResolvedTracingConfig): ExportPipeline {
  const stats: MutableStats = { spansExported: 0, spansDropped: 0, spansFailed: 0, errors: 0 };
  const queue = new BoundedQueueProcessor(config.maxQueueSize, stats);
  const exporter = new CountingExporter(createExporter(config), stats, (n) => queue.handedOff(n));
  queue.inner = new BatchSpanProcessor(exporter, {
    maxQueueSize: config.maxQueueSize,
    maxExportBatchSize: config.maxExportBatchSize,
    scheduledDelayMillis: config.scheduledDelayMs,
    exportTimeoutMillis: config.exportTimeoutMs,
  });
  const resource = defaultResource().merge(
    resourceFromAttributes({
      "host.name": hostname(),
      "process.pid": process.pid,
      "service.instance.id": randomUUID(),
      ...config.resourceAttributes,
      [ATTR_SERVICE_NAME]: config.serviceName,
    }),
  );
  const provider = new NodeTracerProvider({
    resource,
    sampler: new FollowLinksSampler(createSampler(config)),
    spanProcessors: [queue],
  });
  return { provider, tracer: provider.getTracer(INSTRUMENTATION_NAME), stats };
}

function createExporter(config: ResolvedTracingConfig): SpanExporter {
  if (config.exporter === "console") return new ConsoleLineExporter();
  const url = config.url;
  const timeoutMillis = config.otlpTimeoutMs;
  switch (config.protocol) {
    case "grpc": {
      const metadata = new grpc.Metadata();
      for (const [k, v] of Object.entries(config.headers)) metadata.set(k, v);
      return new GrpcTraceExporter({ url, timeoutMillis, metadata });
    }
    case "http/json":
      return new JsonTraceExporter({ url, timeoutMillis, headers: { ...config.headers } });
    default:
      return new ProtoTraceExporter({ url, timeoutMillis, headers: { ...config.headers } });
  }
}

function createSampler(config: ResolvedTracingConfig): Sampler {
  const ratio = (): Sampler => new TraceIdRatioBasedSampler(config.samplerRatio);
  switch (config.sampler) {
    case "always_on":
      return new AlwaysOnSampler();
    case "always_off":
      return new AlwaysOffSampler();
    case "traceidratio":
      return ratio();
    case "parentbased_always_off":
      return new ParentBasedSampler({ root: new AlwaysOffSampler() });
    case "parentbased_traceidratio":
      return new ParentBasedSampler({ root: ratio() });
    default:
      return new ParentBasedSampler({ root: new AlwaysOnSampler() });
  }
}

/**
 * A root span with links (a batch) is sampled when any request it links to is, and only then:
 * the worker's part of a sampled request is never lost to an independent coin toss.
 */
class FollowLinksSampler implements ApiSampler {
  constructor(private readonly inner: Sampler) {}
  shouldSample(ctx: Context, traceId: string, name: string, kind: SpanKind, attributes: Attributes, links: Link[]): SamplingResult {
    const parent = trace.getSpanContext(ctx);
    if ((!parent || !isSpanContextValid(parent)) && links.length > 0) {
      const any = links.some((l) => (l.context.traceFlags & TraceFlags.SAMPLED) !== 0);
      return { decision: any ? SamplingDecision.RECORD_AND_SAMPLED : SamplingDecision.NOT_RECORD };
    }
    return this.inner.shouldSample(ctx, traceId, name, kind, attributes, links);
  }
  toString(): string {
    return `FollowLinks{${this.inner.toString()}}`;
  }
}

/**
 * Bounds the batch processor's queue and counts what is dropped: it mirrors the queue's length
 * (spans added here, taken out when handed to the exporter) and drops at the bound itself.
 */
class BoundedQueueProcessor implements SpanProcessor {
  inner: SpanProcessor | undefined;
  private queued = 0;
  private closed = false;
  constructor(
    private readonly maxQueueSize: number,
    private readonly stats: MutableStats,
  ) {}
  handedOff(n: number): void {
    this.queued = Math.max(0, this.queued - n);
  }
  onStart(span: SdkSpan, parentContext: Context): void {
    this.inner?.onStart(span, parentContext);
  }
  onEnd(span: ReadableSpan): void {
    if ((span.spanContext().traceFlags & TraceFlags.SAMPLED) === 0) return;
    if (this.closed || !this.inner || this.queued >= this.maxQueueSize) {
      this.stats.spansDropped++;
      return;
    }
    this.queued++;
    this.inner.onEnd(span);
  }
  forceFlush(): Promise<void> {
    return this.inner?.forceFlush() ?? Promise.resolve();
  }
  shutdown(): Promise<void> {
    this.closed = true;
    return this.inner?.shutdown() ?? Promise.resolve();
  }
}

/** Counts exported and failed spans; an exporter that throws counts as a failed export. */
class CountingExporter implements SpanExporter {
  constructor(
    private readonly inner: SpanExporter,
    private readonly stats: MutableStats,
    private readonly onHandOff: (n: number) => void,
  ) {}
  export(spans: ReadableSpan[], resultCallback: (result: ExportResult) => void): void {
    const n = spans.length;
    this.onHandOff(n);
    try {
      this.inner.export(spans, (result) => {
        if (result.code === ExportResultCode.SUCCESS) this.stats.spansExported += n;
        else this.stats.spansFailed += n;
        resultCallback(result);
      });
    } catch (err) {
      this.stats.spansFailed += n;
      resultCallback({ code: ExportResultCode.FAILED, error: err instanceof Error ? err : new Error(String(err)) });
    }
  }
  shutdown(): Promise<void> {
    return this.inner.shutdown();
  }
  forceFlush(): Promise<void> {
    return this.inner.forceFlush?.() ?? Promise.resolve();
  }
}

// ---------------------------------------------------------------------------------------------
// Spans.

type Guard = <T>(fallback: T, fn: () => T) => T;

class SpanHandleImpl implements SpanHandle {
  readonly context: Context;
  private ended = false;
  private cachedCarrier: TraceCarrier | undefined;
  constructor(
    protected readonly guard: Guard,
    protected readonly span: Span,
    parent: Context,
    protected readonly onEnded?: (status: string | undefined, error: unknown) => void,
  ) {
    this.context = trace.setSpan(parent, span);
  }
  get carrier(): TraceCarrier {
    this.cachedCarrier ??= injectToCarrier(this.context);
    return { ...this.cachedCarrier };
  }
  get traceId(): string | undefined {
    return this.guard(undefined, () => {
      const sc = this.span.spanContext();
      return isSpanContextValid(sc) ? sc.traceId : undefined;
    });
  }
  get recording(): boolean {
    return this.guard(false, () => this.span.isRecording());
  }
  setAttributes(attributes: Attributes): void {
    this.guard(undefined, () => void this.span.setAttributes(attributes));
  }
  addEvent(name: string, attributes?: Attributes): void {
    this.guard(undefined, () => void this.span.addEvent(name, attributes));
  }
  end(status?: string, error?: unknown): void {
    if (this.ended) return;
    this.ended = true;
    this.guard(undefined, () => {
      finishSpan(this.span, status, error);
      this.onEnded?.(status, error);
    });
  }
}

function finishSpan(span: Span, status: string | undefined, error: unknown): void {
  if (status !== undefined && status !== "ok") {
    span.setAttribute(ATTR.errorType, status);
    span.setStatus({ code: SpanStatusCode.ERROR, message: error !== undefined ? errorMessage(error) : status });
  }
  if (error instanceof Error) span.recordException(error);
  span.end();
}

class RequestTraceImpl extends SpanHandleImpl implements RequestTrace {
  constructor(
    guard: Guard,
    span: Span,
    parent: Context,
    readonly queueMs: number,
    private readonly tracing: TracingImpl,
    onEnded: () => void,
  ) {
    super(guard, span, parent, onEnded);
  }
  setJob(job: JobInfo): void {
    this.setAttributes(jobAttributes(job));
  }
  startPublish(subject: string, attributes?: Attributes): SpanHandle {
    return this.tracing.openPublish(subject, attributes, this.context);
  }
  startWorkerCall(endpoint: string, method: WorkerMethod = "Generate"): SpanHandle {
    return this.tracing.openWorkerCall(endpoint, method, this.context, undefined);
  }
}

class BatchTraceImpl extends SpanHandleImpl implements BatchTrace {
  private attempts = 0;
  constructor(
    guard: Guard,
    span: Span,
    parent: Context,
    private readonly tracing: TracingImpl,
    private readonly members: SpanHandle[],
  ) {
    super(guard, span, parent, (status, error) => {
      for (const m of this.members) m.end(status, error);
    });
  }
  startWorkerCall(endpoint: string, method: WorkerMethod = "Infer"): SpanHandle {
    this.attempts++;
    this.setAttributes({ [ATTR.worker]: endpoint });
    for (const m of this.members) m.setAttributes({ [ATTR.worker]: endpoint });
    return this.tracing.openWorkerCall(endpoint, method, this.context, this.attempts);
  }
}

class ServerCallTraceImpl extends SpanHandleImpl implements ServerCallTrace {
  constructor(
    guard: Guard,
    span: Span,
    parent: Context,
    private readonly tracing: TracingImpl,
  ) {
    super(guard, span, parent);
  }
  startEngine(operation = "infer", attributes?: Attributes): SpanHandle {
    return this.tracing.open(`engine ${operation}`, SpanKind.INTERNAL, this.context, attributes);
  }
}

class TracingImpl implements Tracing {
  readonly enabled: boolean;
  readonly serviceName: string;
  private readonly tracer: Tracer | undefined;
  private readonly stopStats: MutableStats;
  private readonly requests = new WeakMap<object, RequestTrace>();
  private stopping: Promise<void> | undefined;
  readonly guard: Guard;

  constructor(
    readonly config: ResolvedTracingConfig,
    private readonly pipeline: ExportPipeline | undefined,
  ) {
    this.enabled = pipeline !== undefined;
    this.serviceName = config.serviceName;
    this.tracer = pipeline?.tracer;
    this.stopStats = pipeline?.stats ?? { spansExported: 0, spansDropped: 0, spansFailed: 0, errors: 0 };
    this.guard = <T>(fallback: T, fn: () => T): T => this.attempt(fn, () => fallback);
  }

  /** Runs `fn`; when it throws, counts the error and returns `fallback()` instead. */
  attempt<T>(fn: () => T, fallback: () => T): T {
    try {
      return fn();
    } catch {
      this.stopStats.errors++;
      return fallback();
    }
  }

  /**
   * Starts a span. With tracing off, the "span" is the parent's context itself (non-recording),
   * so whatever came in goes out unchanged.
   */
  createSpan(name: string, kind: SpanKind, parent: Context, attributes?: Attributes, links?: Link[], startTimeMs?: number): Span {
    if (!this.tracer) return nonRecording(parent);
    const options: SpanOptions = { kind };
    if (attributes) options.attributes = attributes;
    if (links && links.length > 0) options.links = links;
    if (startTimeMs !== undefined) options.startTime = startTimeMs;
    return this.tracer.startSpan(name, options, parent);
  }

  open(name: string, kind: SpanKind, parent: Context, attributes?: Attributes): SpanHandle {
    return this.attempt<SpanHandle>(
      () => new SpanHandleImpl(this.guard, this.createSpan(name, kind, parent, attributes), parent),
      () => new SpanHandleImpl(this.guard, nonRecording(parent), parent),
    );
  }

  openPublish(subject: string, attributes: Attributes | undefined, parent: Context): SpanHandle {
    const destination = destinationOf(subject);
    return this.open(`send ${destination}`, SpanKind.PRODUCER, parent, {
      [ATTR.messagingSystem]: "nats",
      [ATTR.operationType]: "send",
      [ATTR.operationName]: "publish",
      [ATTR.destinationName]: subject,
      ...attributes,
    });
  }

  openWorkerCall(endpoint: string, method: WorkerMethod, parent: Context, attempt: number | undefined): SpanHandle {
    const { host, port } = splitEndpoint(endpoint);
    const attributes: Attributes = {
      [ATTR.rpcSystem]: "grpc",
      [ATTR.rpcService]: WORKER_RPC_SERVICE,
      [ATTR.rpcMethod]: method,
      [ATTR.serverAddress]: host,
      [ATTR.worker]: endpoint,
    };
    if (port !== undefined) attributes[ATTR.serverPort] = port;
    if (attempt !== undefined) attributes[ATTR.attempt] = attempt;
    return this.open(`${WORKER_RPC_SERVICE}/${method}`, SpanKind.CLIENT, parent, attributes);
  }

  startPublish(info: PublishInfo, parentOrCarrier: Context | TraceCarrier = ROOT_CONTEXT): SpanHandle {
    const parent = isContext(parentOrCarrier) ? parentOrCarrier : fromCarrier(parentOrCarrier);
    return this.attempt<SpanHandle>(() => {
      const attributes: Attributes = { [ATTR.messageId]: info.id };
      if (info.tenant !== undefined) attributes[ATTR.tenant] = info.tenant;
      if (info.model !== undefined) attributes[ATTR.model] = info.model;
      if (info.priority !== undefined) attributes[ATTR.priority] = info.priority;
      if (info.bodyBytes !== undefined) attributes[ATTR.bodySize] = info.bodyBytes;
      if (info.subject.startsWith("infer.req.")) attributes[ATTR.destinationTemplate] = REQUEST_SUBJECT_TEMPLATE;
      return this.openPublish(info.subject, attributes, parent);
    }, () => new SpanHandleImpl(this.guard, nonRecording(parent), parent));
  }

  startRequest(delivery: DeliveryInfo, job?: JobInfo, attributes?: Attributes): RequestTrace {
    const existing = this.requests.get(delivery);
    if (existing) {
      if (job) existing.setJob(job);
      return existing;
    }
    const parent = extractFromHeaders((name) => safeHeader(delivery, name));
    const rt = this.attempt<RequestTrace>(
      () => this.openRequest(delivery, parent, job, attributes),
      () => new RequestTraceImpl(this.guard, nonRecording(parent), parent, 0, this, () => undefined),
    );
    this.guard(undefined, () => void this.requests.set(delivery, rt));
    return rt;
  }

  private openRequest(delivery: DeliveryInfo, parent: Context, job: JobInfo | undefined, attributes: Attributes | undefined): RequestTrace {
    const now = Date.now();
    const pulledAtMs = Math.min(finiteOr(delivery.pulledAtMs, now), now);
    // The server's clock may run ahead of ours: never start after the pull.
    const storedAtMs = Math.min(finiteOr(delivery.storedAtMs, pulledAtMs), pulledAtMs);
    const queueMs = pulledAtMs - storedAtMs;
    const attrs: Attributes = {
      [ATTR.messagingSystem]: "nats",
      [ATTR.operationType]: "receive",
      [ATTR.operationName]: "pull",
      [ATTR.destinationName]: delivery.subject,
      [ATTR.destinationTemplate]: REQUEST_SUBJECT_TEMPLATE,
      [ATTR.streamSequence]: delivery.seq,
      [ATTR.deliveryCount]: delivery.deliveryCount,
      [ATTR.queueMs]: queueMs,
      ...(job ? jobAttributes(job) : idAttribute(delivery)),
      ...attributes,
    };
    const span = this.createSpan(`receive ${destinationOf(delivery.subject)}`, SpanKind.CONSUMER, parent, attrs, undefined, storedAtMs);
    const rt = new RequestTraceImpl(this.guard, span, parent, queueMs, this, () => this.requests.delete(delivery));
    // The JetStream wait as a span of its own, so that it stands out in a trace view.
    const wait = this.createSpan("queue wait", SpanKind.INTERNAL, rt.context, { [ATTR.queueMs]: queueMs }, undefined, storedAtMs);
    wait.end(pulledAtMs);
    return rt;
  }

  requestOf(delivery: object): RequestTrace | undefined {
    return this.guard(undefined, () => this.requests.get(delivery));
  }

  startBatch(batch: BatchInfo, attributes?: Attributes): BatchTrace {
    return this.attempt<BatchTrace>(
      () => this.openBatch(batch, attributes),
      () => new BatchTraceImpl(this.guard, nonRecording(ROOT_CONTEXT), ROOT_CONTEXT, this, []),
    );
  }

  private openBatch(batch: BatchInfo, attributes: Attributes | undefined): BatchTrace {
    const requests: RequestTrace[] = [];
    const contexts: Context[] = [];
    for (const job of batch.jobs) {
      const request = this.requests.get(job.delivery);
      if (request) {
        requests.push(request);
        contexts.push(request.context);
      } else if (job.traceparent) {
        contexts.push(fromCarrier(job.tracestate ? { traceparent: job.traceparent, tracestate: job.tracestate } : { traceparent: job.traceparent }));
      }
    }
    const links: Link[] = [];
    for (const ctx of contexts) {
      const sc = trace.getSpanContext(ctx);
      if (sc && isSpanContextValid(sc)) links.push({ context: sc });
    }
    const attrs: Attributes = {
      [ATTR.messagingSystem]: "nats",
      [ATTR.operationType]: "process",
      [ATTR.operationName]: "process",
      [ATTR.destinationTemplate]: REQUEST_SUBJECT_TEMPLATE,
      [ATTR.batchMessageCount]: batch.jobs.length,
      [ATTR.batchSize]: batch.jobs.length,
      [ATTR.model]: batch.model,
      [ATTR.version]: batch.version,
      ...attributes,
    };
    if (!this.tracer) {
      // Tracing off: pass the first request's context through, as it came.
      const first = contexts.find((ctx) => isSpanContextValid(trace.getSpanContext(ctx) ?? INVALID_SPAN_CONTEXT)) ?? ROOT_CONTEXT;
      return new BatchTraceImpl(this.guard, nonRecording(first), first, this, []);
    }
    // A span has one parent and a batch has many requests. The batch span is a child of its
    // first request (so that request's trace holds the whole path: batch, gRPC call, worker,
    // engine) and is linked to every request; each other request's trace gets a `batch` span
    // linked to it, from which Jaeger follows the link to the call.
    // (The first sampled request, so a batch is sampled when any of its requests is.)
    const first = requests.find((r) => r.recording) ?? requests[0];
    const parent = first?.context ?? ROOT_CONTEXT;
    const span = this.createSpan("process infer.req", SpanKind.CONSUMER, parent, attrs, links);
    const batchSpan = span.spanContext();
    const memberAttrs: Attributes = { [ATTR.batchSize]: batch.jobs.length, [ATTR.model]: batch.model, [ATTR.version]: batch.version };
    const members = requests.filter((r) => r !== first).map((request) => {
      const member = this.createSpan("batch", SpanKind.INTERNAL, request.context, memberAttrs, isSpanContextValid(batchSpan) ? [{ context: batchSpan }] : []);
      return new SpanHandleImpl(this.guard, member, request.context);
    });
    return new BatchTraceImpl(this.guard, span, parent, this, members);
  }

  settle(settled: Settled): void {
    this.guard(undefined, () => {
      const outcome = settled.outcome;
      const delivery = outcome.kind === "dead" ? outcome.delivery : outcome.job.delivery;
      const rt = this.requests.get(delivery);
      if (!rt) return;
      let status: string;
      if (settled.error !== undefined) status = "PUBLISH_FAILED";
      else if (settled.result) status = settled.result.status === "ok" ? "ok" : (settled.result.error?.code ?? "INTERNAL");
      else if (outcome.kind === "dead") status = outcome.error.code;
      else if (outcome.kind === "retry") status = outcome.lastResort.error?.code ?? "UNAVAILABLE";
      else status = "ok"; // a duplicate: the result was published before
      rt.setAttributes({ [ATTR.settleAction]: settled.action, [ATTR.deadLettered]: settled.deadLettered, [ATTR.status]: status });
      rt.end(status, settled.error);
    });
  }

  startServerCall(call: ServerCallInfo, attributes?: Attributes): ServerCallTrace {
    const parent = fromCarrier(call.traceparent ? { traceparent: call.traceparent, ...(call.tracestate ? { tracestate: call.tracestate } : {}) } : undefined);
    return this.attempt<ServerCallTrace>(
      () => {
        const attrs: Attributes = {
          [ATTR.rpcSystem]: "grpc",
          [ATTR.rpcService]: WORKER_RPC_SERVICE,
          [ATTR.rpcMethod]: call.method,
          ...attributes,
        };
        if (call.workerId) attrs[ATTR.worker] = call.workerId;
        if (call.peer) attrs[ATTR.networkPeerAddress] = splitEndpoint(call.peer.replace(/^ipv[46]:/, "")).host;
        const span = this.createSpan(`${WORKER_RPC_SERVICE}/${call.method}`, SpanKind.SERVER, parent, attrs);
        return new ServerCallTraceImpl(this.guard, span, parent, this);
      },
      () => new ServerCallTraceImpl(this.guard, nonRecording(parent), parent, this),
    );
  }

  stats(): TracingStats {
    return { ...this.stopStats };
  }

  forceFlush(): Promise<void> {
    if (!this.pipeline || this.stopping) return Promise.resolve();
    const provider = this.pipeline.provider;
    return bounded(() => provider.forceFlush(), this.config.flushTimeoutMs, this.stopStats);
  }

  shutdown(): Promise<void> {
    const provider = this.pipeline?.provider;
    this.stopping ??= provider ? bounded(() => provider.shutdown(), this.config.flushTimeoutMs, this.stopStats) : Promise.resolve();
    return this.stopping;
  }
}

/** A span that is the parent's own context: records nothing, passes the context on. */
function isContext(x: Context | TraceCarrier): x is Context {
  return typeof (x as Partial<Context>).getValue === "function";
}

function nonRecording(parent: Context): Span {
  return trace.wrapSpanContext(trace.getSpanContext(parent) ?? INVALID_SPAN_CONTEXT);
}

/**
 * Runs `fn` and waits for it at most `ms`; never rejects. A rejection is a failed export,
 * already counted by the exporter; what throws is counted as an error.
 */
function bounded(fn: () => Promise<void>, ms: number, stats: MutableStats): Promise<void> {
  return new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, ms);
    timer.unref();
    const done = (): void => {
      clearTimeout(timer);
      resolve();
    };
    try {
      fn().then(done, done);
    } catch {
      stats.errors++;
      done();
    }
  });
}

function jobAttributes(job: JobInfo): Attributes {
  const attrs: Attributes = {
    [ATTR.messageId]: job.id,
    [ATTR.tenant]: job.tenant,
    [ATTR.model]: job.model,
    [ATTR.priority]: job.priority,
  };
  if (job.version !== undefined) attrs[ATTR.version] = job.version;
  return attrs;
}

function idAttribute(delivery: DeliveryInfo): Attributes {
  const id = safeHeader(delivery, "Nats-Msg-Id");
  return id ? { [ATTR.messageId]: id } : {};
}

function safeHeader(delivery: DeliveryInfo, name: string): string | undefined {
  try {
    return delivery.header(name);
  } catch {
    return undefined;
  }
}

/** `infer.req`, `infer.res`, ...: the low-cardinality part of a subject, for span names. */
function destinationOf(subject: string): string {
  const parts = subject.split(".");
  return parts.length >= 2 ? `${parts[0]}.${parts[1]}` : subject;
}

/** `host:port`, `[v6]:port` or a bare host. */
function splitEndpoint(endpoint: string): { host: string; port?: number } {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(endpoint) ?? /^([^:]+):(\d+)$/.exec(endpoint);
  if (!m) return { host: endpoint };
  return { host: m[1] ?? endpoint, port: Number(m[2]) };
}

function finiteOr(n: number, fallback: number): number {
  return Number.isFinite(n) && n > 0 ? n : fallback;
}

function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function codeOf(err: unknown): string {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" && code ? code : "INTERNAL";
}

// ---------------------------------------------------------------------------------------------
// Worker side.

export interface TraceEngineOptions {
  /** The worker's id, recorded on its spans. */
  workerId?: string;
}

/**
 * Wraps an engine so that every call is traced on the worker: a SERVER span, child of the
 * call's trace context (which the worker server hands the engine), and an `engine` child span
 * around the engine's work. Calls the engine exactly as given; tracing never changes a result.
 *
 * ```ts
 * const worker = await WorkerServer.start({ engine: traceEngine(engine, tracing, { workerId }), workerId });
 * ```
 */
export function traceEngine(engine: Engine, tracing: Tracing, opts: TraceEngineOptions = {}): Engine {
  const serverCall = (method: WorkerMethod, traceparent: string | undefined, attributes: Attributes): ServerCallTrace =>
    tracing.startServerCall({ method, traceparent, workerId: opts.workerId }, attributes);
  return {
    get capacity(): number {
      return engine.capacity;
    },
    close: () => engine.close(),
    infer: async (batch: EngineBatch, signal: AbortSignal): Promise<EngineItemResult[]> => {
      const call = serverCall("Infer", batch.traceparent, {
        [ATTR.model]: batch.model,
        [ATTR.version]: batch.version,
        [ATTR.batchSize]: batch.requests.length,
      });
      const run = call.startEngine("infer", { [ATTR.batchSize]: batch.requests.length });
      try {
        const results = await engine.infer(batch, signal);
        const errors = Array.isArray(results) ? results.filter((r) => !r.ok).length : 0;
        run.setAttributes({ [ATTR.itemErrors]: errors });
        run.end();
        call.end();
        return results;
      } catch (err) {
        run.end(codeOf(err), err);
        call.end(codeOf(err), err);
        throw err;
      }
    },
    generate: (request: EngineRequest, signal: AbortSignal): EngineGeneration => {
      const call = serverCall("Generate", request.traceparent, { [ATTR.model]: request.model, [ATTR.version]: request.version, [ATTR.messageId]: request.id });
      const run = call.startEngine("generate");
      let generation: EngineGeneration;
      try {
        generation = engine.generate(request, signal);
      } catch (err) {
        run.end(codeOf(err), err);
        call.end(codeOf(err), err);
        throw err;
      }
      return tracedGeneration(generation, run, call);
    },
  };
}

function tracedGeneration(generation: EngineGeneration, run: SpanHandle, call: SpanHandle): EngineGeneration {
  return {
    usage: () => generation.usage(),
    [Symbol.asyncIterator]: async function* (): AsyncGenerator<EngineToken, void, undefined> {
      let tokens = 0;
      let status = "CANCELLED"; // unless it finishes or fails: the consumer left early
      let failure: unknown;
      try {
        for await (const token of generation) {
          if (tokens === 0) run.addEvent("first token");
          tokens++;
          yield token;
        }
        status = "ok";
      } catch (err) {
        status = codeOf(err);
        failure = err;
        throw err;
      } finally {
        run.setAttributes({ [ATTR.tokens]: tokens });
        run.end(status, failure);
        call.end(status, failure);
      }
    },
  };
}
