/** What the gRPC worker is given, its tunables, the context of a call, and its typed error. */
import * as grpc from "@grpc/grpc-js";
import { type Engine } from "./engine.js";
import { CodedError } from "../proto/coded-error.js";

export const DEFAULT_WORKER_HOST = "127.0.0.1";
/** How long `stop()` lets calls in flight finish before it forces the shutdown. */
export const DEFAULT_STOP_GRACE_MS = 10_000;
/** Largest message the worker accepts or sends (a batch of long prompts is big). */
export const WORKER_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
/** Server-side HTTP/2 keepalive: ping an idle connection this often... */
export const WORKER_KEEPALIVE_TIME_MS = 60_000;
/** ...and drop it when the ping is not answered within this. */
export const WORKER_KEEPALIVE_TIMEOUT_MS = 20_000;

/** What a call carries besides its message; handed to {@link WorkerServerOptions.onCall}. */
export interface WorkerCallContext {
  readonly method: "Infer" | "Generate";
  /** W3C trace context from the call's metadata. */
  readonly traceparent?: string;
  readonly tracestate?: string;
  /** The call's gRPC deadline, epoch ms. */
  readonly deadlineMs?: number;
  readonly peer: string;
  readonly workerId: string;
}

export interface WorkerServerOptions {
  readonly engine: Engine;
  /** Address to bind; default 127.0.0.1. */
  readonly host?: string;
  /** Port to bind; 0 (the default) picks a free one. */
  readonly port?: number;
  /** Name of this worker (the registry key's last part); a random one when omitted. */
  readonly workerId?: string;
  /** Grace of `stop()` before calls still in flight are cut; default {@link DEFAULT_STOP_GRACE_MS}. */
  readonly stopGraceMs?: number;
  /** Extra grpc-js server options, merged over the defaults. */
  readonly serverOptions?: grpc.ServerOptions;
  /**
   * Called at the start of every Infer and Generate call with its context (trace context
   * among it): where tracing hooks in. Whatever it throws is ignored.
   */
  readonly onCall?: (context: WorkerCallContext) => void;
}

export type WorkerServerErrorCode = "BIND_FAILED";

export class WorkerServerError extends CodedError<WorkerServerErrorCode> {
  override readonly name = "WorkerServerError";
}
