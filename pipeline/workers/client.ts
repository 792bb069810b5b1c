/**
 * The pipeline's side of the worker contract (docs/protocol.md, "Workers (gRPC)"): one
 * {@link WorkerClient} per worker endpoint, over one gRPC channel, for `Infer`, `Generate` and
 * the standard health service. Results come back as plain objects; failures of the call itself
 * as a {@link WorkerCallError} that says whether another try (on another worker) makes sense.
 */
import * as grpc from "@grpc/grpc-js";
import { HealthServiceDefinition, WORKER_SERVICE_NAME, WorkerGrpcClient, WorkerServiceDefinition, type IGenerateRequest, type IInferBatch, type WireMethodDefinition } from "../../proto/service.js";
import { toWorkerCallError, WorkerCallError } from "./call-error.js";
import { fromItemResult, splitByBytes, statusName, toWireRequest } from "./wire-convert.js";
import type { HealthStatus, WorkerBatch, WorkerBatchResult, WorkerCallOptions, WorkerChunk, WorkerGenerateRequest, WorkerLoadReport } from "./worker-messages.js";

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
const WORKER_CLIENT_KEEPALIVE_TIME_MS = 30_000;
/** A keepalive ping not answered within this closes the connection (calls fail UNAVAILABLE). */
const WORKER_CLIENT_KEEPALIVE_TIMEOUT_MS = 10_000;
/** First and longest wait before reconnecting to a worker that went away. */
const WORKER_CLIENT_INITIAL_RECONNECT_BACKOFF_MS = 250;
const WORKER_CLIENT_MAX_RECONNECT_BACKOFF_MS = 5_000;
/** Deadline of a health check. */
export const HEALTH_CHECK_TIMEOUT_MS = 2_000;
/** Chunks buffered from a stream before the client stops reading (HTTP/2 flow control takes over). */
const STREAM_HIGH_WATER_MARK = 64;

export interface WorkerClientOptions {
  /** Default: insecure (workers sit inside the cluster network). */
  readonly credentials?: grpc.ChannelCredentials;
  /** Extra grpc-js channel options, merged over the defaults. */
  readonly channelOptions?: grpc.ChannelOptions;
  /** Deadline of {@link WorkerClient.check}; default {@link HEALTH_CHECK_TIMEOUT_MS}. */
  readonly healthCheckTimeoutMs?: number;
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

  /** The arguments every call of a method starts with: the method, the message, metadata, the deadline. */
  private callArgs<Req, Res>(def: ClientMethod<Req, Res>, message: Req, opts: WorkerCallOptions, deadline: number | undefined) {
    const callOptions: grpc.CallOptions = deadline !== undefined ? { deadline } : {};
    return [def.path, def.requestSerialize, def.responseDeserialize, message, this.metadataOf(opts), callOptions] as const;
  }

  private metadataOf(opts: WorkerCallOptions): grpc.Metadata {
    const md = new grpc.Metadata();
    if (opts.traceparent) md.set("traceparent", opts.traceparent);
    if (opts.tracestate) md.set("tracestate", opts.tracestate);
    return md;
  }

  /** Why a call cannot start: the client is closed, or the caller has already given up. */
  private refusal(signal: AbortSignal | undefined): WorkerCallError | undefined {
    if (this.closed) return this.ownError("client closed", grpc.status.UNAVAILABLE, "UNAVAILABLE", true);
    if (signal?.aborted) return this.ownError("call cancelled by the caller", grpc.status.CANCELLED, "CANCELLED", false);
    return undefined;
  }

  private ownError(what: string, grpcCode: grpc.status, code: "UNAVAILABLE" | "CANCELLED", retriable: boolean): WorkerCallError {
    return new WorkerCallError(`worker ${this.endpoint}: ${what}`, { grpcCode, code, retriable, endpoint: this.endpoint });
  }

  /** Ties a started call to the caller's signal and to close(); `untie` when it has ended. */
  private tie(call: { cancel(): void }, signal: AbortSignal | undefined): { cancelledByCaller: () => boolean; untie: () => void } {
    let byCaller = false;
    const cancel = (): void => call.cancel();
    const onAbort = (): void => {
      byCaller = true;
      call.cancel();
    };
    this.inFlight.add(cancel);
    signal?.addEventListener("abort", onAbort, { once: true });
    return {
      cancelledByCaller: () => byCaller,
      untie: () => {
        signal?.removeEventListener("abort", onAbort);
        this.inFlight.delete(cancel);
      },
    };
  }

  private unary<Req, Res>(
    def: ClientMethod<Req, Res>,
    message: Req,
    opts: WorkerCallOptions,
    deadline: number | undefined,
  ): Promise<Res> {
    const signal = opts.signal;
    const refused = this.refusal(signal);
    if (refused) return Promise.reject(refused);
    return new Promise<Res>((resolve, reject) => {
      let call: grpc.ClientUnaryCall;
      try {
        call = this.client.makeUnaryRequest(
          ...this.callArgs(def, message, opts, deadline),
          (err: grpc.ServiceError | null, value?: Res) => {
            tie.untie();
            if (err) reject(toWorkerCallError(err, this.endpoint, tie.cancelledByCaller()));
            else if (value === undefined) reject(toWorkerCallError(new Error("empty response"), this.endpoint));
            else resolve(value);
          },
        );
      } catch (err) {
        // The channel refused to start the call (for example it was closed meanwhile).
        reject(toWorkerCallError(err, this.endpoint));
        return;
      }
      const tie = this.tie(call, signal);
    });
  }

  /** A server-streaming call as an async iterator, reading no further ahead than the consumer. */
  private async *serverStream<Req, Res>(
    def: ClientMethod<Req, Res>,
    message: Req,
    opts: WorkerCallOptions,
    deadline: number | undefined,
  ): AsyncGenerator<Res, void, undefined> {
    const signal = opts.signal;
    const refused = this.refusal(signal);
    if (refused) throw refused;
    let call: grpc.ClientReadableStream<Res>;
    try {
      call = this.client.makeServerStreamRequest(...this.callArgs(def, message, opts, deadline));
    } catch (err) {
      throw toWorkerCallError(err, this.endpoint);
    }
    const queue: Res[] = [];
    let ended = false;
    let failure: unknown;
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
    const tie = this.tie(call, signal);
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
      if (failure !== undefined) throw toWorkerCallError(failure, this.endpoint, tie.cancelledByCaller());
    } finally {
      tie.untie();
      // A no-op when the call has ended; otherwise the consumer left early: stop the worker.
      call.cancel();
    }
  }
}
