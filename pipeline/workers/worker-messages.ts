/** What the pipeline sends a worker and gets back, as plain objects (the client encodes them). */
import type { ErrorInfo, Usage } from "../../operators/types.js";

/** One request of a batch, as the pipeline holds it (plain JSON; the client encodes it). */
export interface WorkerRequest {
  readonly id: string;
  readonly tenant?: string;
  readonly prompt?: string;
  /** Any JSON value. */
  readonly inputs?: unknown;
  readonly parameters?: Readonly<Record<string, unknown>>;
  /** Absolute deadline of the request, epoch ms. */
  readonly deadlineMs?: number;
}

export interface WorkerBatch {
  readonly model: string;
  readonly version: string;
  readonly requests: readonly WorkerRequest[];
}

export interface WorkerGenerateRequest {
  readonly model: string;
  readonly version: string;
  readonly request: WorkerRequest;
}

export interface WorkerCallOptions {
  /** Deadline of the call, absolute epoch ms (sent as the gRPC deadline). */
  readonly deadlineMs?: number;
  /** W3C trace context, sent as gRPC metadata. */
  readonly traceparent?: string;
  readonly tracestate?: string;
  /** Aborting cancels the call; it then rejects with code CANCELLED. */
  readonly signal?: AbortSignal;
}

/** A worker's answer for one request. */
export interface WorkerItemResult {
  id: string;
  status: "ok" | "error";
  /** Present when ok. */
  output?: { text: string; data?: unknown };
  /** Present when ok. */
  usage?: Usage;
  /** Present when error. */
  error?: ErrorInfo;
  /** The worker never started the request. */
  not_started: boolean;
}

export interface WorkerBatchResult {
  /** One per request, in the order of the batch. */
  results: WorkerItemResult[];
  /** Time the worker's engine spent on the batch, ms. */
  engine_ms: number;
}

/** A chunk of a generation: `seq` counts from 0; the last chunk carries `final` instead of text. */
export interface WorkerChunk {
  seq: number;
  text: string;
  final?: WorkerItemResult;
}

/** A worker's load report (the `WorkerLoad` message). */
export interface WorkerLoadReport {
  waiting: number;
  running: number;
  /** Share of the KV cache in use, 0 to 1. */
  kvUsage: number;
  /** 0 when unknown. */
  kvCapacityTokens: number;
  /** Hashes of the prefix blocks held, when asked for and known. */
  prefixBlocks: string[];
  blockTokens: number;
}

/** A serving status of the standard health protocol. */
export type HealthStatus = "SERVING" | "NOT_SERVING" | "UNKNOWN" | "SERVICE_UNKNOWN";
