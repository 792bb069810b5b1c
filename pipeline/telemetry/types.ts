/** Tracing's names, tunables and interfaces (see `mod.ts` for the span tree). */
import { type Attributes, type Context } from "@opentelemetry/api";
import { ATTR_ERROR_TYPE, ATTR_SERVER_ADDRESS, ATTR_SERVER_PORT } from "@opentelemetry/semantic-conventions";
import type { Settled } from "../../operators/settle-outcome.js";

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

export const INSTRUMENTATION_NAME = "sluice";
export const REQUEST_SUBJECT_TEMPLATE = "infer.req.{priority}.{tenant}.{model}";
export const WORKER_RPC_SERVICE = "infer.v1.Worker";

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
