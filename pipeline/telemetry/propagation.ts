/** W3C trace context in message headers and carriers: plain functions, independent of any tracing instance. */
import { defaultTextMapSetter, ROOT_CONTEXT, type Context, type TextMapGetter } from "@opentelemetry/api";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import type { TraceCarrier } from "./types.js";

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
