/**
 * HTTP errors of an engine adapter: a status as an error code, an error body as a short detail,
 * a network failure with its causes, an abort's reason.
 */
import type { ErrorCode } from "../../proto/wire.js";
import { EngineError } from "../engine.js";
import { isRecord } from "./batch.js";

/** Longest piece of a server's error body quoted in an error message. */
const MAX_ERROR_DETAIL_CHARS = 500;
/** The server answered with an HTTP error status. */
export class HttpStatusError extends EngineError {
  override readonly name: string = "HttpStatusError";
  constructor(
    code: ErrorCode,
    readonly status: number,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
  }
}

/** The error code an HTTP error status maps to (see the module comment for why). */
export function errorCodeForStatus(status: number): ErrorCode {
  switch (status) {
    case 400:
    case 413:
    case 422:
      return "INVALID_ARGUMENT";
    case 404:
      return "NOT_FOUND";
    case 408:
    case 429:
    case 502:
    case 503:
    case 504:
      return "UNAVAILABLE";
    default:
      return "INTERNAL";
  }
}

/**
 * The message in an error body: vLLM's `{"error": {"message"}}` or older
 * `{"object": "error", "message"}`, Flask's `{"message"}`, FastAPI's `{"detail"}`, an HTML
 * error page's text, or the text itself; clipped to {@link MAX_ERROR_DETAIL_CHARS}.
 */
export function errorDetail(body: string): string {
  const trimmed = body.trim();
  if (trimmed === "") return "";
  let parsed: unknown;
  try {
    parsed = JSON.parse(trimmed);
  } catch {
    parsed = undefined;
  }
  const fromJson = parsed === undefined ? undefined : messageOf(parsed);
  const text = fromJson ?? trimmed.replace(/<[^>]*>/g, " ");
  const oneLine = text.replace(/\s+/g, " ").trim();
  return oneLine.length > MAX_ERROR_DETAIL_CHARS ? `${oneLine.slice(0, MAX_ERROR_DETAIL_CHARS)}...` : oneLine;
}

function messageOf(value: unknown): string | undefined {
  if (typeof value === "string") return value;
  if (!isRecord(value)) return undefined;
  const error = value["error"];
  if (isRecord(error) && typeof error["message"] === "string") return error["message"];
  if (typeof error === "string") return error;
  if (typeof value["message"] === "string") return value["message"];
  const detail = value["detail"];
  if (typeof detail === "string") return detail;
  if (detail !== undefined) return JSON.stringify(detail);
  return undefined;
}

/** The reason a signal was aborted with, as an Error (AbortSignal allows any value). */
export function abortReason(signal: AbortSignal): Error {
  const reason: unknown = signal.reason;
  return reason instanceof Error ? reason : new EngineError("CANCELLED", `aborted: ${String(reason)}`, { cause: reason });
}

/** A network error with its causes, e.g. `fetch failed: connect ECONNREFUSED 127.0.0.1:9 (ECONNREFUSED)`. */
export function describeNetworkError(err: unknown): string {
  const parts: string[] = [];
  let e: unknown = err;
  for (let depth = 0; depth < 4 && e !== undefined && e !== null; depth++) {
    if (e instanceof Error) {
      const code = (e as { code?: unknown }).code;
      parts.push(typeof code === "string" && !e.message.includes(code) ? `${e.message} (${code})` : e.message);
      e = e.cause;
    } else {
      parts.push(typeof e === "string" ? e : JSON.stringify(e));
      break;
    }
  }
  return parts.join(": ");
}
