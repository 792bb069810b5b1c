/** Tracing configuration: options first, then the standard OTEL_* environment variables. */
import { ATTR_SERVICE_NAME } from "@opentelemetry/semantic-conventions";
import { type TracingOptions, type ResolvedTracingConfig, type Env, type TracesProtocol, TRACES_PROTOCOLS, type SamplerName, SAMPLER_NAMES, DEFAULT_MAX_QUEUE_SIZE, DEFAULT_OTLP_TIMEOUT_MS, DEFAULT_MAX_EXPORT_BATCH_SIZE, DEFAULT_SCHEDULED_DELAY_MS, DEFAULT_EXPORT_TIMEOUT_MS, DEFAULT_FLUSH_TIMEOUT_MS, type TracesExporter } from "./types.js";

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
