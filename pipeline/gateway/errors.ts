/**
 * Errors of the HTTP surface: OpenAI's shape `{"error": {"message", "type", "param", "code"}}`,
 * with the HTTP status that the sluice error code maps to.
 */
import type { ServerResponse } from "node:http";
import type { ErrorCode } from "../../proto/wire.js";

/** Codes the gateway itself answers with, besides the pipeline's error codes. */
export type GatewayCode = ErrorCode | "UNAUTHENTICATED" | "PERMISSION_DENIED" | "PAYLOAD_TOO_LARGE" | "METHOD_NOT_ALLOWED";

/** HTTP status of each code (docs/protocol.md, "HTTP gateway"). */
export const HTTP_STATUS: Readonly<Record<GatewayCode, number>> = {
  INVALID_ARGUMENT: 400,
  UNAUTHENTICATED: 401,
  PERMISSION_DENIED: 403,
  NOT_FOUND: 404,
  METHOD_NOT_ALLOWED: 405,
  PAYLOAD_TOO_LARGE: 413,
  RESOURCE_EXHAUSTED: 429,
  CANCELLED: 499,
  INTERNAL: 500,
  UNAVAILABLE: 503,
  DEADLINE_EXCEEDED: 504,
};

/** OpenAI's `error.type` for each code. */
const ERROR_TYPE: Readonly<Record<GatewayCode, string>> = {
  INVALID_ARGUMENT: "invalid_request_error",
  UNAUTHENTICATED: "authentication_error",
  PERMISSION_DENIED: "permission_error",
  NOT_FOUND: "not_found_error",
  METHOD_NOT_ALLOWED: "invalid_request_error",
  PAYLOAD_TOO_LARGE: "invalid_request_error",
  RESOURCE_EXHAUSTED: "rate_limit_error",
  CANCELLED: "cancelled",
  INTERNAL: "server_error",
  UNAVAILABLE: "service_unavailable",
  DEADLINE_EXCEEDED: "timeout",
};

/** An error answered as an HTTP status with OpenAI's error body. */
export class HttpError extends Error {
  override readonly name = "HttpError";
  readonly status: number;
  constructor(
    readonly code: GatewayCode,
    message: string,
    /** The request field at fault, when there is one (`error.param`). */
    readonly param?: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.status = HTTP_STATUS[code];
  }
}

/** A 400 naming the field at fault. */
export function badField(param: string, message: string): HttpError {
  return new HttpError("INVALID_ARGUMENT", message, param);
}

export interface ErrorBody {
  error: { message: string; type: string; param: string | null; code: string };
}

export function errorBody(code: GatewayCode, message: string, param?: string): ErrorBody {
  return { error: { message, type: ERROR_TYPE[code], param: param ?? null, code } };
}

/** Any thrown value as an HttpError (an unknown one is INTERNAL). */
export function toHttpError(err: unknown): HttpError {
  if (err instanceof HttpError) return err;
  const e = err as { code?: unknown; message?: unknown } | null;
  const code = typeof e?.code === "string" && e.code in HTTP_STATUS ? (e.code as GatewayCode) : "INTERNAL";
  return new HttpError(code, typeof e?.message === "string" ? e.message : String(err), undefined, { cause: err });
}

/** Writes an error response (with `Retry-After` for a 429). */
export function sendError(res: ServerResponse, err: HttpError, retryAfterSeconds: number): void {
  if (res.headersSent) return;
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (err.status === 429) headers["retry-after"] = String(retryAfterSeconds);
  res.writeHead(err.status, headers);
  res.end(JSON.stringify(errorBody(err.code, err.message, err.param)));
}
