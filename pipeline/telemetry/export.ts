/**
 * Starting tracing for one service: its own tracer provider, the OTLP exporter of the configured
 * protocol, the sampler, and a bounded export queue that counts what it drops.
 */
import { randomUUID } from "node:crypto";
import { hostname } from "node:os";
import * as grpc from "@grpc/grpc-js";
import { isSpanContextValid, SamplingDecision, SpanKind, trace, TraceFlags, type Attributes, type Context, type Link, type Sampler as ApiSampler, type SamplingResult, type Tracer } from "@opentelemetry/api";
import { ExportResultCode, type ExportResult } from "@opentelemetry/core";
import { OTLPTraceExporter as GrpcTraceExporter } from "@opentelemetry/exporter-trace-otlp-grpc";
import { OTLPTraceExporter as JsonTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { OTLPTraceExporter as ProtoTraceExporter } from "@opentelemetry/exporter-trace-otlp-proto";
import { defaultResource, resourceFromAttributes } from "@opentelemetry/resources";
import { AlwaysOffSampler, AlwaysOnSampler, BatchSpanProcessor, NodeTracerProvider, ParentBasedSampler, TraceIdRatioBasedSampler, type ReadableSpan, type Sampler, type Span as SdkSpan, type SpanExporter, type SpanProcessor } from "@opentelemetry/sdk-trace-node";
import { ATTR_SERVICE_NAME } from "@opentelemetry/semantic-conventions";
import { type TracingOptions, type Tracing, type ResolvedTracingConfig, INSTRUMENTATION_NAME } from "./types.js";
import { resolveTracingConfig } from "./config.js";
import { TracingImpl } from "./spans.js";
import { errorMessage } from "./span-attributes.js";
import { ConsoleLineExporter } from "./console-exporter.js";

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

export interface MutableStats {
  spansExported: number;
  spansDropped: number;
  spansFailed: number;
  errors: number;
}

export interface ExportPipeline {
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
