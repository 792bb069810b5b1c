/** A call to a worker that failed as a whole, classified: its error code and whether another try may succeed. */
import * as grpc from "@grpc/grpc-js";
import { type ErrorCode } from "../../proto/wire.js";
import { JsonValueError } from "../../proto/json.js";

/** A call to a worker failed as a whole (its transport, deadline, or the worker itself). */
export class WorkerCallError extends Error {
  override readonly name = "WorkerCallError";
  /** The gRPC status code (`grpc.status`). */
  readonly grpcCode: number;
  /** The error code a request failing with this error gets. */
  readonly code: ErrorCode;
  /** Trying again, on this or another worker, may succeed. */
  readonly retriable: boolean;
  /** The worker called. */
  readonly endpoint: string;

  constructor(
    message: string,
    details: { grpcCode: number; code: ErrorCode; retriable: boolean; endpoint: string },
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.grpcCode = details.grpcCode;
    this.code = details.code;
    this.retriable = details.retriable;
    this.endpoint = details.endpoint;
  }
}

/**
 * Classifies a failed call. `cancelledByCaller` tells a cancel of our own (the caller's
 * signal) from one the transport made up (a connection reset reads as CANCELLED too).
 */
export function toWorkerCallError(err: unknown, endpoint: string, cancelledByCaller = false): WorkerCallError {
  if (err instanceof WorkerCallError) return err;
  const grpcCode: grpc.status = grpcCodeOf(err);
  const detail = err instanceof Error ? ((err as Partial<grpc.ServiceError>).details ?? err.message) : String(err);
  let code: ErrorCode;
  let retriable = false;
  switch (grpcCode) {
    case grpc.status.UNAVAILABLE:
      code = "UNAVAILABLE";
      retriable = true;
      break;
    case grpc.status.CANCELLED:
      code = cancelledByCaller ? "CANCELLED" : "UNAVAILABLE";
      retriable = !cancelledByCaller;
      break;
    case grpc.status.RESOURCE_EXHAUSTED:
      code = "RESOURCE_EXHAUSTED";
      retriable = true;
      break;
    case grpc.status.DEADLINE_EXCEEDED:
      code = "DEADLINE_EXCEEDED";
      break;
    case grpc.status.INVALID_ARGUMENT:
      code = "INVALID_ARGUMENT";
      break;
    case grpc.status.NOT_FOUND:
      code = "NOT_FOUND";
      break;
    default:
      code = "INTERNAL";
  }
  const name = grpc.status[grpcCode] ?? String(grpcCode);
  return new WorkerCallError(`worker ${endpoint}: ${name}: ${detail}`, { grpcCode, code, retriable, endpoint }, { cause: err });
}

function grpcCodeOf(err: unknown): grpc.status {
  if (err instanceof JsonValueError) return grpc.status.INVALID_ARGUMENT;
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "number" && grpc.status[code] !== undefined ? code : grpc.status.INTERNAL;
}
