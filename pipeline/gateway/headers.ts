/**
 * What an HTTP request says in its headers about the sluice request it becomes: its id
 * (`Idempotency-Key`), priority, timeout, trace context, and whether the caller waits.
 */
import type { IncomingHttpHeaders } from "node:http";
import { createHash } from "node:crypto";
import { nuid } from "@nats-io/transport-node";
import { INFER_SESSION_RE, PRIORITIES, type Priority } from "../../proto/wire.js";
import type { GatewaySettings } from "./config.js";
import { HttpError } from "./errors.js";

export const HTTP_HEADERS = {
  idempotencyKey: "idempotency-key",
  requestId: "x-request-id",
  priority: "x-sluice-priority",
  timeoutMs: "x-sluice-timeout-ms",
  session: "x-sluice-session",
  prefer: "prefer",
  traceparent: "traceparent",
  tracestate: "tracestate",
} as const;

/** An Idempotency-Key: it becomes the request id (a suffix is added per embeddings input). */
const IDEMPOTENCY_KEY_RE = /^[A-Za-z0-9_-]{1,100}$/;

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
  /**
   * The conversation (`Infer-Session` on the wire): `X-Sluice-Session`, else taken from the
   * body's `user` by {@link sessionOfUser}.
   */
  session: string | undefined;
}

/**
 * The session of an OpenAI `user`: the value itself when it is a valid `Infer-Session`, otherwise
 * `u-` and 40 hex digits of its SHA-256 (stable, and never the raw value on the wire).
 */
export function sessionOfUser(user: unknown): string | undefined {
  if (typeof user !== "string" || user.length === 0) return undefined;
  if (INFER_SESSION_RE.test(user)) return user;
  return `u-${createHash("sha256").update(user).digest("hex").slice(0, 40)}`;
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
  const session = one(h, HTTP_HEADERS.session);
  if (session !== undefined && !INFER_SESSION_RE.test(session)) {
    throw new HttpError("INVALID_ARGUMENT", "X-Sluice-Session must be 1-128 of A-Z a-z 0-9 . _ : @ -", "X-Sluice-Session");
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
    session,
  };
}
