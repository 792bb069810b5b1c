/** The spans of the request path and the tracing that opens them; never throws into the host. */
import { isSpanContextValid, ROOT_CONTEXT, SpanKind, SpanStatusCode, trace, INVALID_SPAN_CONTEXT, type Attributes, type Context, type Link, type Span, type SpanOptions, type Tracer } from "@opentelemetry/api";
import type { Settled } from "../../operators/settle-outcome.js";
import { type SpanHandle, type TraceCarrier, ATTR, type RequestTrace, type JobInfo, type WorkerMethod, type BatchTrace, type ServerCallTrace, type Tracing, type ResolvedTracingConfig, WORKER_RPC_SERVICE, type PublishInfo, REQUEST_SUBJECT_TEMPLATE, type DeliveryInfo, type BatchInfo, type ServerCallInfo, type TracingStats } from "./types.js";
import { injectToCarrier, fromCarrier, extractFromHeaders } from "./propagation.js";
import type { MutableStats, ExportPipeline } from "./export.js";
import { destinationOf, errorMessage, finiteOr, idAttribute, jobAttributes, safeHeader, splitEndpoint } from "./span-attributes.js";

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
    // A span that records nothing (tracing off, or not sampled) is not given attributes.
    if (this.recording) this.setAttributes(jobAttributes(job));
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

export class TracingImpl implements Tracing {
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
    if (!this.tracer) return new SpanHandleImpl(this.guard, nonRecording(parent), parent);
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
    if (!this.tracer) return new SpanHandleImpl(this.guard, nonRecording(parent), parent);
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
    const forget = (): void => void this.requests.delete(delivery);
    // Tracing off: the request's context is what came in, and nothing is recorded.
    if (!this.tracer) return new RequestTraceImpl(this.guard, nonRecording(parent), parent, queueMs, this, forget);
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
    const rt = new RequestTraceImpl(this.guard, span, parent, queueMs, this, forget);
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
    if (!this.tracer) {
      // Tracing off: pass the first request's context through, as it came.
      const first = contexts.find((ctx) => isSpanContextValid(trace.getSpanContext(ctx) ?? INVALID_SPAN_CONTEXT)) ?? ROOT_CONTEXT;
      return new BatchTraceImpl(this.guard, nonRecording(first), first, this, []);
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
