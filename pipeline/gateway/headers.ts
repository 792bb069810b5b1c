/**
 * What an HTTP request says in its headers about the sluice request it becomes: its id
 * (`Idempotency-Key`), priority, timeout, trace context, and whether the caller waits.
 */
import type { IncomingHttpHeaders } from "node:http";
import { nuid } from "@nats-io/transport-node";
import { PRIORITIES, type Priority } from "../../proto/wire.js";
import type { GatewaySettings } from "./config.js";
import { HttpError } from "./errors.js";

export const HTTP_HEADERS = {
  idempotencyKey: "idempotency-key",
  requestId: "x-request-id",
  priority: "x-sluice-priority",
  timeoutMs: "x-sluice-timeout-ms",
  prefer: "prefer",
  traceparent: "traceparent",
  tracestate: "tracestate",
} as const;

/** An Idempotency-Key: it becomes the request id (a suffix is added per embeddings input). */
export const IDEMPOTENCY_KEY_RE = /^[A-Za-z0-9_-]{1,100}$/;

export interface HttpRequestOptions {
  id: string;
  /** The caller named the id (Idempotency-Key): a retry must find the first result. */
  idempotent: boolean;
  priority: Priority;
  /** Absolute deadline (epoch ms), when the caller set a timeout. */
  deadlineMs: number | undefined;
  /** How long the gateway waits for the result. */
  timeoutMs: number;
  traceparent: string | undefined;
  tracestate: string | undefined;
  /** `Prefer: respond-async`: answer 202 at once. */
  respondAsync: boolean;
}

function one(h: IncomingHttpHeaders, name: string): string | undefined {
  const v = h[name];
  return Array.isArray(v) ? v[0] : v;
}

export function requestOptions(h: IncomingHttpHeaders, s: GatewaySettings, now = Date.now()): HttpRequestOptions {
  const key = one(h, HTTP_HEADERS.idempotencyKey);
  if (key !== undefined && !IDEMPOTENCY_KEY_RE.test(key)) {
    throw new HttpError("INVALID_ARGUMENT", "Idempotency-Key must be 1-100 of A-Z a-z 0-9 _ -", "Idempotency-Key");
  }
  const p = one(h, HTTP_HEADERS.priority);
  if (p !== undefined && !(PRIORITIES as readonly string[]).includes(p)) {
    throw new HttpError("INVALID_ARGUMENT", `X-Sluice-Priority must be one of ${PRIORITIES.join(", ")}; got '${p}'`, "X-Sluice-Priority");
  }
  const t = one(h, HTTP_HEADERS.timeoutMs);
  let timeoutMs = s.defaultTimeoutMs;
  let deadlineMs: number | undefined;
  if (t !== undefined) {
    const n = Number(t);
    if (!/^\d+$/.test(t.trim()) || n < 1 || n > s.maxTimeoutMs) {
      throw new HttpError("INVALID_ARGUMENT", `X-Sluice-Timeout-Ms must be an integer from 1 to ${s.maxTimeoutMs}; got '${t}'`, "X-Sluice-Timeout-Ms");
    }
    timeoutMs = n;
    deadlineMs = now + n;
  }
  const prefer = one(h, HTTP_HEADERS.prefer) ?? "";
  return {
    id: key ?? nuid.next(),
    idempotent: key !== undefined,
    priority: (p as Priority | undefined) ?? "normal",
    deadlineMs,
    timeoutMs,
    traceparent: one(h, HTTP_HEADERS.traceparent),
    tracestate: one(h, HTTP_HEADERS.tracestate),
    respondAsync: /(^|[,;\s])respond-async([,;\s]|$)/i.test(prefer),
  };
}
