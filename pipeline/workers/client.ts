/**
 * The pipeline's side of the worker contract (docs/protocol.md, "Workers (gRPC)"): one
 * {@link WorkerClient} per worker endpoint, over one gRPC channel, for `Infer`, `Generate` and
 * the standard health service. Results come back as plain objects; failures of the call itself
 * as a {@link WorkerCallError} that says whether another try (on another worker) makes sense.
 */
import * as grpc from "@grpc/grpc-js";
import type { ErrorInfo, Usage } from "../../operators/types.js";
import { ERROR_CODES, type ErrorCode } from "../../proto/wire.js";
import { fromValue, JsonValueError, toStruct, toValue } from "../../proto/json.js";
import {
  HealthServiceDefinition,
  ServingStatus,
  WORKER_SERVICE_NAME,
  WorkerGrpcClient,
  WorkerServiceDefinition,
  type IInferItemResult,
  type IInferRequest,
  type IGenerateRequest,
  type IInferBatch,
  type WireMethodDefinition,
} from "../../proto/service.js";

/** What a client needs of a method definition. */
type ClientMethod<Req, Res> = Pick<WireMethodDefinition<Req, unknown, unknown, Res>, "path" | "requestSerialize" | "responseDeserialize">;

/** Largest message accepted from a worker (a batch of long outputs is big). */
export const WORKER_CLIENT_MAX_RECEIVE_MESSAGE_BYTES = 64 * 1024 * 1024;
/**
 * Inputs (prompt and JSON inputs, in bytes) sent in one Infer call: a batch of large requests goes
 * in consecutive parts of at most this much, a request larger than it alone, so that a part and
 * its results (an output about as large as its input) stay within the 64 MiB message limits on
 * both sides.
 */
export const WORKER_CLIENT_MAX_BATCH_BYTES = 24 * 1024 * 1024;
/** HTTP/2 keepalive ping interval while calls are open: finds a dead worker under a long call. */
export const WORKER_CLIENT_KEEPALIVE_TIME_MS = 30_000;
/** A keepalive ping not answered within this closes the connection (calls fail UNAVAILABLE). */
export const WORKER_CLIENT_KEEPALIVE_TIMEOUT_MS = 10_000;
/** First and longest wait before reconnecting to a worker that went away. */
export const WORKER_CLIENT_INITIAL_RECONNECT_BACKOFF_MS = 250;
export const WORKER_CLIENT_MAX_RECONNECT_BACKOFF_MS = 5_000;
/** Deadline of a health check. */
export const HEALTH_CHECK_TIMEOUT_MS = 2_000;
/** Chunks buffered from a stream before the client stops reading (HTTP/2 flow control takes over). */
export const STREAM_HIGH_WATER_MARK = 64;

export interface WorkerClientOptions {
  /** Default: insecure (workers sit inside the cluster network). */
  readonly credentials?: grpc.ChannelCredentials;
  /** Extra grpc-js channel options, merged over the defaults. */
  readonly channelOptions?: grpc.ChannelOptions;
  /** Deadline of {@link WorkerClient.check}; default {@link HEALTH_CHECK_TIMEOUT_MS}. */
  readonly healthCheckTimeoutMs?: number;
}

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

/** A client of one worker endpoint, over one gRPC channel. */
export class WorkerClient {
  readonly endpoint: string;
  private readonly client: grpc.Client;
  private readonly healthCheckTimeoutMs: number;
  /** Cancels of the calls in flight, so close() leaves nothing hanging. */
  private readonly inFlight = new Set<() => void>();
  private closed = false;

  constructor(endpoint: string, opts: WorkerClientOptions = {}) {
    this.endpoint = endpoint;
    this.healthCheckTimeoutMs = opts.healthCheckTimeoutMs ?? HEALTH_CHECK_TIMEOUT_MS;
    this.client = new WorkerGrpcClient(endpoint, opts.credentials ?? grpc.credentials.createInsecure(), {
      "grpc.max_receive_message_length": WORKER_CLIENT_MAX_RECEIVE_MESSAGE_BYTES,
      "grpc.keepalive_time_ms": WORKER_CLIENT_KEEPALIVE_TIME_MS,
      "grpc.keepalive_timeout_ms": WORKER_CLIENT_KEEPALIVE_TIMEOUT_MS,
      "grpc.initial_reconnect_backoff_ms": WORKER_CLIENT_INITIAL_RECONNECT_BACKOFF_MS,
      "grpc.max_reconnect_backoff_ms": WORKER_CLIENT_MAX_RECONNECT_BACKOFF_MS,
      ...opts.channelOptions,
    });
  }

  /**
   * Runs a batch on the worker. Resolves with one result per request, in order (each ok or
   * its own error); rejects with a {@link WorkerCallError} when the call as a whole fails.
   */
  async infer(batch: WorkerBatch, opts: WorkerCallOptions = {}): Promise<WorkerBatchResult> {
    const parts = splitByBytes(batch.requests, WORKER_CLIENT_MAX_BATCH_BYTES);
    if (parts.length <= 1) return this.inferPart(batch, opts);
    // One part after the other: the worker runs one batch per slot, as the pool counts it.
    const out: WorkerBatchResult = { results: [], engine_ms: 0 };
    for (const requests of parts) {
      const r = await this.inferPart({ ...batch, requests }, opts);
      out.results.push(...r.results);
      out.engine_ms += r.engine_ms;
    }
    return out;
  }

  private inferPart(batch: WorkerBatch, opts: WorkerCallOptions): Promise<WorkerBatchResult> {
    let message: IInferBatch;
    try {
      message = { model: batch.model, version: batch.version, requests: batch.requests.map(toWireRequest) };
    } catch (err) {
      // Inputs or parameters JSON cannot carry: the request is malformed.
      return Promise.reject(toWorkerCallError(err, this.endpoint));
    }
    return this.unary(WorkerServiceDefinition.Infer, message, opts, this.deadlineOf(opts)).then((r) => ({
      results: r.results.map(fromItemResult),
      engine_ms: r.engine_ms,
    }));
  }

  /**
   * Streams one generation. Chunks come in order, `seq` from 0; the last one carries `final`.
   * Leaving the loop early (break, return, a throw) cancels the call and so the generation.
   * A failed call throws a {@link WorkerCallError} from the loop.
   */
  async *generate(req: WorkerGenerateRequest, opts: WorkerCallOptions = {}): AsyncGenerator<WorkerChunk, void, undefined> {
    let message: IGenerateRequest;
    try {
      message = { model: req.model, version: req.version, request: toWireRequest(req.request) };
    } catch (err) {
      throw toWorkerCallError(err, this.endpoint);
    }
    const def = WorkerServiceDefinition.Generate;
    for await (const chunk of this.serverStream(def, message, opts, this.deadlineOf(opts))) {
      const out: WorkerChunk = { seq: chunk.seq, text: chunk.text };
      if (chunk.final) out.final = fromItemResult(chunk.final);
      yield out;
    }
  }

  /**
   * Asks the worker's health service. An unknown service reads SERVICE_UNKNOWN (the worker
   * answers NOT_FOUND); an unreachable worker rejects with a {@link WorkerCallError}.
   */
  async check(service: string = WORKER_SERVICE_NAME, opts: { signal?: AbortSignal } = {}): Promise<HealthStatus> {
    try {
      const r = await this.unary(HealthServiceDefinition.Check, { service }, opts, Date.now() + this.healthCheckTimeoutMs);
      return statusName(r.status);
    } catch (err) {
      if (err instanceof WorkerCallError && err.grpcCode === (grpc.status.NOT_FOUND as number)) return "SERVICE_UNKNOWN";
      throw err;
    }
  }

  /**
   * Asks the worker for its load. Resolves `undefined` when the worker does not report one (it
   * answers UNIMPLEMENTED: older workers, engines without load); rejects with a
   * {@link WorkerCallError} when the worker cannot be reached.
   */
  async load(opts: { prefixBlocks?: boolean; signal?: AbortSignal; timeoutMs?: number } = {}): Promise<WorkerLoadReport | undefined> {
    try {
      const r = await this.unary(
        WorkerServiceDefinition.GetLoad,
        { include_prefix_blocks: opts.prefixBlocks === true },
        opts.signal ? { signal: opts.signal } : {},
        Date.now() + (opts.timeoutMs ?? this.healthCheckTimeoutMs),
      );
      const kvUsage = Number.isFinite(r.kv_usage) ? Math.min(1, Math.max(0, r.kv_usage)) : 0;
      return {
        waiting: r.waiting,
        running: r.running,
        kvUsage,
        kvCapacityTokens: r.kv_capacity_tokens,
        prefixBlocks: [...r.prefix_blocks],
        blockTokens: r.block_tokens,
      };
    } catch (err) {
      if (err instanceof WorkerCallError && err.grpcCode === (grpc.status.UNIMPLEMENTED as number)) return undefined;
      throw err;
    }
  }

  /**
   * Follows the worker's health: yields the status now and on every change, until the loop is
   * left, the signal aborts, or the worker ends the stream (it does when it stops).
   */
  async *watch(service: string = WORKER_SERVICE_NAME, opts: { signal?: AbortSignal } = {}): AsyncGenerator<HealthStatus, void, undefined> {
    for await (const r of this.serverStream(HealthServiceDefinition.Watch, { service }, opts, undefined)) {
      yield statusName(r.status);
    }
  }

  /** Closes the channel; calls still in flight are cancelled. Safe to call twice. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const cancel of [...this.inFlight]) cancel();
    this.inFlight.clear();
    this.client.close();
  }

  private deadlineOf(opts: WorkerCallOptions): number | undefined {
    return opts.deadlineMs !== undefined && opts.deadlineMs > 0 ? opts.deadlineMs : undefined;
  }

  private metadataOf(opts: WorkerCallOptions): grpc.Metadata {
    const md = new grpc.Metadata();
    if (opts.traceparent) md.set("traceparent", opts.traceparent);
    if (opts.tracestate) md.set("tracestate", opts.tracestate);
    return md;
  }

  private closedError(): WorkerCallError {
    return new WorkerCallError(`worker ${this.endpoint}: client closed`, {
      grpcCode: grpc.status.UNAVAILABLE,
      code: "UNAVAILABLE",
      retriable: true,
      endpoint: this.endpoint,
    });
  }

  private cancelledError(): WorkerCallError {
    return new WorkerCallError(`worker ${this.endpoint}: call cancelled by the caller`, {
      grpcCode: grpc.status.CANCELLED,
      code: "CANCELLED",
      retriable: false,
      endpoint: this.endpoint,
    });
  }

  private unary<Req, Res>(
    def: ClientMethod<Req, Res>,
    message: Req,
    opts: WorkerCallOptions,
    deadline: number | undefined,
  ): Promise<Res> {
    if (this.closed) return Promise.reject(this.closedError());
    const signal = opts.signal;
    if (signal?.aborted) return Promise.reject(this.cancelledError());
    return new Promise<Res>((resolve, reject) => {
      let cancelledByCaller = false;
      const callOptions: grpc.CallOptions = deadline !== undefined ? { deadline } : {};
      let call: grpc.ClientUnaryCall;
      try {
        call = this.client.makeUnaryRequest(
          def.path,
          def.requestSerialize,
          def.responseDeserialize,
          message,
          this.metadataOf(opts),
          callOptions,
          (err, value) => {
            signal?.removeEventListener("abort", onAbort);
            this.inFlight.delete(cancel);
            if (err) reject(toWorkerCallError(err, this.endpoint, cancelledByCaller));
            else if (value === undefined) reject(toWorkerCallError(new Error("empty response"), this.endpoint));
            else resolve(value);
          },
        );
      } catch (err) {
        // The channel refused to start the call (for example it was closed meanwhile).
        reject(toWorkerCallError(err, this.endpoint));
        return;
      }
      const cancel = (): void => call.cancel();
      const onAbort = (): void => {
        cancelledByCaller = true;
        call.cancel();
      };
      this.inFlight.add(cancel);
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** A server-streaming call as an async iterator, reading no further ahead than the consumer. */
  private async *serverStream<Req, Res>(
    def: ClientMethod<Req, Res>,
    message: Req,
    opts: WorkerCallOptions,
    deadline: number | undefined,
  ): AsyncGenerator<Res, void, undefined> {
    if (this.closed) throw this.closedError();
    const signal = opts.signal;
    if (signal?.aborted) throw this.cancelledError();
    const callOptions: grpc.CallOptions = deadline !== undefined ? { deadline } : {};
    let call: grpc.ClientReadableStream<Res>;
    try {
      call = this.client.makeServerStreamRequest(
        def.path,
        def.requestSerialize,
        def.responseDeserialize,
        message,
        this.metadataOf(opts),
        callOptions,
      );
    } catch (err) {
      throw toWorkerCallError(err, this.endpoint);
    }
    const queue: Res[] = [];
    let ended = false;
    let failure: unknown;
    let cancelledByCaller = false;
    let wake: (() => void) | undefined;
    const notify = (): void => {
      const w = wake;
      wake = undefined;
      w?.();
    };
    call.on("data", (chunk: Res) => {
      queue.push(chunk);
      if (queue.length >= STREAM_HIGH_WATER_MARK) call.pause();
      notify();
    });
    // grpc-js reports a failed status as 'error' (after the last message); the listener also
    // keeps the CANCELLED of our own cancel below from becoming an unhandled 'error' event.
    call.on("error", (err: unknown) => {
      failure ??= err;
      ended = true;
      notify();
    });
    call.on("end", () => {
      ended = true;
      notify();
    });
    const cancel = (): void => call.cancel();
    const onAbort = (): void => {
      cancelledByCaller = true;
      call.cancel();
    };
    this.inFlight.add(cancel);
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      for (;;) {
        const next = queue.shift();
        if (next !== undefined) {
          if (call.isPaused() && queue.length < STREAM_HIGH_WATER_MARK / 2) call.resume();
          yield next;
          continue;
        }
        if (ended) break;
        await new Promise<void>((resolve) => {
          wake = resolve;
        });
      }
      if (failure !== undefined) throw toWorkerCallError(failure, this.endpoint, cancelledByCaller);
    } finally {
      signal?.removeEventListener("abort", onAbort);
      this.inFlight.delete(cancel);
      // A no-op when the call has ended; otherwise the consumer left early: stop the worker.
      call.cancel();
    }
  }
}

/**
 * A request to its wire form (`InferRequest`). Throws a `JsonValueError` for inputs or
 * parameters that JSON cannot carry (NaN, Infinity, functions, ...).
 */
export function toWireRequest(r: WorkerRequest): IInferRequest {
  const m: IInferRequest = { id: r.id };
  if (r.tenant !== undefined) m.tenant = r.tenant;
  if (r.prompt !== undefined) m.prompt = r.prompt;
  if (r.inputs !== undefined) m.inputs = toValue(r.inputs);
  if (r.parameters !== undefined) m.parameters = toStruct(r.parameters);
  if (r.deadlineMs !== undefined && r.deadlineMs > 0) m.deadline_unix_ms = Math.floor(r.deadlineMs);
  return m;
}

function fromItemResult(r: IInferItemResult): WorkerItemResult {
  const id = r.id ?? "";
  const notStarted = r.not_started === true;
  if (r.status === "ok") {
    const output: { text: string; data?: unknown } = { text: r.output?.text ?? "" };
    if (r.output?.data !== null && r.output?.data !== undefined) output.data = fromValue(r.output.data);
    return {
      id,
      status: "ok",
      output,
      usage: { prompt_tokens: r.usage?.prompt_tokens ?? 0, completion_tokens: r.usage?.completion_tokens ?? 0 },
      not_started: notStarted,
    };
  }
  const sent = r.error?.code ?? "";
  const code = ERROR_CODES.find((c) => c === sent);
  let message = r.error?.message ?? "";
  if (r.status !== "error") message = `worker answered status '${r.status ?? ""}'${message ? `: ${message}` : ""}`;
  else if (!code) message = `${sent || "no error code"}${message ? `: ${message}` : ""}`;
  return { id, status: "error", error: { code: code ?? "INTERNAL", message }, not_started: notStarted };
}

function statusName(status: ServingStatus | null | undefined): HealthStatus {
  switch (status) {
    case ServingStatus.SERVING:
      return "SERVING";
    case ServingStatus.NOT_SERVING:
      return "NOT_SERVING";
    case ServingStatus.SERVICE_UNKNOWN:
      return "SERVICE_UNKNOWN";
    default:
      return "UNKNOWN";
  }
}

/** Consecutive parts of `requests` with at most `maxBytes` of inputs each (a larger request alone). */
function splitByBytes(requests: readonly WorkerRequest[], maxBytes: number): WorkerRequest[][] {
  const parts: WorkerRequest[][] = [];
  let part: WorkerRequest[] = [];
  let bytes = 0;
  for (const r of requests) {
    // Characters, not UTF-8 bytes: a cheap bound that is exact for ASCII and within 3x otherwise.
    const size = (r.prompt?.length ?? 0) + (r.inputs === undefined ? 0 : approxJsonLength(r.inputs));
    if (part.length > 0 && bytes + size > maxBytes) {
      parts.push(part);
      part = [];
      bytes = 0;
    }
    part.push(r);
    bytes += size;
  }
  if (part.length > 0) parts.push(part);
  return parts;
}

/** Length of a JSON value's text; 0 when it has none (the encoder reports that later). */
function approxJsonLength(v: unknown): number {
  if (typeof v === "string") return v.length;
  try {
    return JSON.stringify(v)?.length ?? 0;
  } catch {
    return 0;
  }
}
