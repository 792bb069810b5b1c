/** What the client is given: connection options, request bodies and options; and what it answers besides results. */
import type { InferResult } from "../../operators/types.js";
import type { Priority } from "../../proto/wire.js";
import type { Tracing } from "../telemetry/types.js";
import type { ClientPayloadOptions } from "../payloads/client-claim-check.js";

export interface InferBody {
  prompt?: string;
  inputs?: unknown;
  parameters?: Record<string, unknown>;
}

export interface InferOptions {
  /** Request id (idempotency key); a new unique one by default. */
  id?: string;
  priority?: Priority;
  /** Pin a model version. */
  version?: string;
  /**
   * Absolute deadline, Unix epoch milliseconds (e.g. `Date.now() + 5_000`), sent as
   * `Infer-Deadline`. (The CLI's `--deadline-ms N` is relative: N ms from now.)
   */
  deadlineMs?: number;
  /** How long `infer()` waits for the result. */
  timeoutMs?: number;
  traceparent?: string;
  tracestate?: string;
  /** Requests of one conversation (`Infer-Session`): routed to the worker that served the last one when it can. */
  session?: string;
  /** Ask for token streaming (`Infer-Stream: 1`). */
  stream?: boolean;
  /**
   * Called once the request is queued (or found to be a duplicate), before its result arrives:
   * its id, stream sequence, whether it reused an id, and its trace context.
   */
  onPublished?: (receipt: PublishReceipt) => void;
}

/** What {@link InferenceClient.publish} learns when a request is queued. */
export interface PublishReceipt {
  id: string;
  /** Sequence of the request in INFER_REQ (of the first request, for a duplicate). */
  seq: number;
  /**
   * True when the id was used before within the request stream's duplicate window: nothing new
   * was queued, and the result is the first request's (stored, or still to come).
   */
  duplicate: boolean;
  /** The request's `traceparent`, when it has one (client tracing on, or given). */
  traceparent?: string;
}

export interface ClientOptions {
  servers: string | string[];
  tenant: string;
  name?: string;
  /** Publish spans (PRODUCER) whose context rides in the request headers. */
  tracing?: Tracing;
  /**
   * Largest request body sent, bytes: the pipeline's `pipeline.maxPayloadBytes` (256 KiB by
   * default). A larger one is refused before it is sent (INVALID_ARGUMENT).
   */
  maxPayloadBytes?: number;
  /** Claim check: bodies through the object store (docs/protocol.md, "Large bodies"). */
  payloads?: ClientPayloadOptions;
}

/** What {@link InferenceClient.stream} yields: chunks, then the result. */
export type StreamEvent = { seq: number; text: string } | { result: InferResult };
