/** What spans are made of: the attributes of a request, names from subjects and endpoints, error codes and messages. */
import type { Attributes } from "@opentelemetry/api";
import { ATTR, type DeliveryInfo, type JobInfo } from "./types.js";

/** The attributes of a span about one request. */
export function jobAttributes(job: JobInfo): Attributes {
  const attrs: Attributes = {
    [ATTR.messageId]: job.id,
    [ATTR.tenant]: job.tenant,
    [ATTR.model]: job.model,
    [ATTR.priority]: job.priority,
  };
  if (job.version !== undefined) attrs[ATTR.version] = job.version;
  return attrs;
}

export function idAttribute(delivery: DeliveryInfo): Attributes {
  const id = safeHeader(delivery, "Nats-Msg-Id");
  return id ? { [ATTR.messageId]: id } : {};
}

export function safeHeader(delivery: DeliveryInfo, name: string): string | undefined {
  try {
    return delivery.header(name);
  } catch {
    return undefined;
  }
}

/** `infer.req`, `infer.res`, ...: the low-cardinality part of a subject, for span names. */
export function destinationOf(subject: string): string {
  // The first two tokens, without splitting the whole subject (once per request).
  const first = subject.indexOf(".");
  if (first < 0) return subject;
  const second = subject.indexOf(".", first + 1);
  return second < 0 ? subject : subject.slice(0, second);
}

/** `host:port`, `[v6]:port` or a bare host. */
export function splitEndpoint(endpoint: string): { host: string; port?: number } {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(endpoint) ?? /^([^:]+):(\d+)$/.exec(endpoint);
  if (!m) return { host: endpoint };
  return { host: m[1] ?? endpoint, port: Number(m[2]) };
}

/** `n` when it is a positive finite number, else `fallback`. */
export function finiteOr(n: number, fallback: number): number {
  return Number.isFinite(n) && n > 0 ? n : fallback;
}

/** The message of an error (or what was thrown). */
export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** The `code` of an error when it has a string one, else INTERNAL. */
export function codeOf(err: unknown): string {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" && code ? code : "INTERNAL";
}
