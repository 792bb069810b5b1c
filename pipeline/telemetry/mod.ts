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
export { resolveTracingConfig } from "./config.js";
export { traceEngine, type TraceEngineOptions } from "./engine.js";
export { startTracing } from "./export.js";
export { PipelineMetrics } from "./metrics.js";
export { MetricsServer } from "./metrics-server.js";
export { extractFromHeaders, fromCarrier, injectToCarrier } from "./propagation.js";
export {
  SAMPLER_NAMES,
  SERVICE_CLIENT,
  SERVICE_PIPELINE,
  SERVICE_WORKER,
  TRACES_PROTOCOLS,
  type BatchTrace,
  type RequestTrace,
  type ResolvedTracingConfig,
  type SamplerName,
  type SpanHandle,
  type TraceCarrier,
  type TracesExporter,
  type TracesProtocol,
  type Tracing,
  type TracingOptions,
  type TracingStats,
} from "./types.js";
