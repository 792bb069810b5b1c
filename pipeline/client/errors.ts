/** The client's typed error, and a failed publish mapped to the protocol's codes. */
import { InvalidArgumentError } from "@nats-io/transport-node";
import { JetStreamApiError } from "@nats-io/jetstream";
import type { InferResult } from "../../operators/types.js";
import { ERROR_CODES, type ErrorCode } from "../../proto/wire.js";

/** A request that ended in an error result (or could not be sent); `code` is docs/protocol.md's. */
export class InferenceError extends Error {
  override readonly name = "InferenceError";
  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly result?: InferResult,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}


/** Maps a failed publish to the protocol's codes: a full queue is RESOURCE_EXHAUSTED. */
export function publishError(err: unknown, size: { bodyBytes?: number; maxPayload?: number | undefined } = {}): InferenceError {
  if (err instanceof InferenceError) return err;
  const msg = (err as Error)?.message ?? String(err);
  if (err instanceof InvalidArgumentError && /max_payload/i.test(msg)) {
    const limit = size.maxPayload !== undefined ? ` of ${size.maxPayload} bytes` : "";
    return new InferenceError(
      "INVALID_ARGUMENT",
      `the request of ${size.bodyBytes ?? "?"} bytes is over the server's max_payload${limit}: send the body through the object store ` +
        `(the client does so above payloads.thresholdBytes; raw clients follow docs/protocol.md, "Large bodies")`,
      undefined,
      { cause: err },
    );
  }
  if (err instanceof JetStreamApiError || /maximum (messages|bytes)|exceeded|insufficient resources/i.test(msg)) {
    const full = /maximum (messages|bytes)|exceeded|insufficient resources|limit/i.test(msg);
    return new InferenceError(full ? "RESOURCE_EXHAUSTED" : "UNAVAILABLE", full ? `the request queue is full: ${msg}` : msg, undefined, { cause: err });
  }
  if (/no responders|503/i.test(msg)) return new InferenceError("UNAVAILABLE", `no request stream answers: ${msg}`, undefined, { cause: err });
  if (/timeout/i.test(msg)) return new InferenceError("UNAVAILABLE", `publish not confirmed in time: ${msg}`, undefined, { cause: err });
  const code = (ERROR_CODES as readonly string[]).find((c) => msg.includes(c)) as ErrorCode | undefined;
  return new InferenceError(code ?? "INTERNAL", msg, undefined, { cause: err });
}
