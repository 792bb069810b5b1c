/**
 * The gRPC worker: serves `Worker` (docs/protocol.md, "Workers (gRPC)") over an
 * {@link Engine}, and the standard `grpc.health.v1.Health` service.
 *
 * - Infer answers one result per request, in order; a request that is malformed or fails on
 *   its own gets an error result and the rest of the batch still runs.
 * - The gRPC deadline and client cancellation abort the engine's signal.
 * - Generate streams chunks `seq` 0, 1, ... and then one chunk carrying `final`.
 * - `setServing(false)` flips health to NOT_SERVING (to drain traffic) but calls are still
 *   answered; `stop()` drains and shuts down; `kill()` drops everything at once.
 */
import { randomUUID } from "node:crypto";
import * as grpc from "@grpc/grpc-js";
import { HealthServiceDefinition, ServingStatus, WORKER_SERVICE_NAME, WorkerServiceDefinition, type HealthServiceHandlers, type IInferBatchResult, type IInferItemResult, type IWorkerLoad, type WorkerServiceHandlers } from "../proto/service.js";
import { EngineClosedError, EngineError, type Engine, type EngineItemResult, type EngineRequest } from "./engine.js";
import { DEFAULT_STOP_GRACE_MS, DEFAULT_WORKER_HOST, WORKER_KEEPALIVE_TIME_MS, WORKER_KEEPALIVE_TIMEOUT_MS, WORKER_MAX_MESSAGE_BYTES, WorkerServerError, type WorkerCallContext, type WorkerServerOptions } from "./server-options.js";
import { InvalidRequest, toEngineRequest, toItemResult, toStatus } from "./wire-convert.js";
import { deadlineOf, hostPort, metadataString, writeChunk, type GenerateCall, type HealthWatchCall, type InferCall, type LoadCall } from "./grpc-calls.js";

/** The engine offers no load report: the call is answered UNIMPLEMENTED, as by an old worker. */
class UnimplementedError extends Error {
  override readonly name = "UnimplementedError";
}

export class WorkerServer {
  readonly workerId: string;
  readonly engine: Engine;
  private readonly server: grpc.Server;
  private readonly host: string;
  private readonly stopGraceMs: number;
  private readonly onCall: ((context: WorkerCallContext) => void) | undefined;
  private boundPort = 0;
  private readonly statuses = new Map<string, ServingStatus>([
    ["", ServingStatus.SERVING],
    [WORKER_SERVICE_NAME, ServingStatus.SERVING],
  ]);
  private readonly watchers = new Set<{ service: string; call: HealthWatchCall }>();
  /** One per call in flight, so kill() can stop the engine work behind them. */
  private readonly inFlight = new Set<AbortController>();
  private stopping: Promise<void> | undefined;
  private down = false;

  private constructor(server: grpc.Server, opts: WorkerServerOptions) {
    this.server = server;
    this.engine = opts.engine;
    this.host = opts.host ?? DEFAULT_WORKER_HOST;
    this.workerId = opts.workerId ?? `worker-${randomUUID().slice(0, 8)}`;
    this.stopGraceMs = opts.stopGraceMs ?? DEFAULT_STOP_GRACE_MS;
    this.onCall = opts.onCall;
    const worker: WorkerServiceHandlers = {
      Infer: (call, callback) => {
        this.handleInfer(call).then(
          (result) => callback(null, result),
          (err: unknown) => callback(toStatus(err)),
        );
      },
      Generate: (call) => {
        void this.handleGenerate(call);
      },
      GetLoad: (call, callback) => {
        this.handleGetLoad(call).then(
          (load) => callback(null, load),
          (err: unknown) => callback(err instanceof UnimplementedError ? { code: grpc.status.UNIMPLEMENTED, details: err.message } : toStatus(err)),
        );
      },
    };
    const health: HealthServiceHandlers = {
      Check: (call, callback) => {
        const status = this.statuses.get(call.request.service);
        if (status === undefined) {
          callback({ code: grpc.status.NOT_FOUND, details: `unknown service '${call.request.service}'` });
        } else {
          callback(null, { status });
        }
      },
      Watch: (call) => this.handleWatch(call),
    };
    server.addService(WorkerServiceDefinition, worker);
    server.addService(HealthServiceDefinition, health);
  }

  /** Binds and starts a worker server. */
  static async start(opts: WorkerServerOptions): Promise<WorkerServer> {
    const server = new grpc.Server({
      "grpc.max_receive_message_length": WORKER_MAX_MESSAGE_BYTES,
      "grpc.max_send_message_length": WORKER_MAX_MESSAGE_BYTES,
      "grpc.keepalive_time_ms": WORKER_KEEPALIVE_TIME_MS,
      "grpc.keepalive_timeout_ms": WORKER_KEEPALIVE_TIMEOUT_MS,
      ...opts.serverOptions,
    });
    const worker = new WorkerServer(server, opts);
    const address = hostPort(worker.host, opts.port ?? 0);
    worker.boundPort = await new Promise<number>((resolve, reject) => {
      server.bindAsync(address, grpc.ServerCredentials.createInsecure(), (err, port) => {
        if (err) {
          server.forceShutdown();
          reject(new WorkerServerError("BIND_FAILED", `cannot bind ${address}: ${err.message}`, { cause: err }));
        }
        else resolve(port);
      });
    });
    return worker;
  }

  /** The bound port. */
  get port(): number {
    return this.boundPort;
  }

  /** `host:port` to reach this worker at (a wildcard host is reached on loopback). */
  get endpoint(): string {
    const reachable = this.host === "0.0.0.0" ? "127.0.0.1" : this.host === "::" ? "::1" : this.host;
    return hostPort(reachable, this.boundPort);
  }

  /** Whether health says SERVING. */
  get serving(): boolean {
    return this.statuses.get(WORKER_SERVICE_NAME) === ServingStatus.SERVING;
  }

  /**
   * Sets the health status of the worker service (and of the server as a whole, `""`).
   * NOT_SERVING tells clients to stop sending work; calls that still arrive are answered.
   */
  setServing(serving: boolean): void {
    if (this.down) return;
    this.setStatus(serving ? ServingStatus.SERVING : ServingStatus.NOT_SERVING);
  }

  /**
   * Graceful shutdown: health turns NOT_SERVING, no new calls are accepted, calls in flight
   * get `stopGraceMs` to finish, then the rest are cut. Safe to call twice. The engine is not
   * closed: it belongs to whoever created it.
   */
  stop(): Promise<void> {
    this.stopping ??= this.shutdown();
    return this.stopping;
  }

  /** Drops the server at once, as a crash would: calls in flight fail. Safe to call twice. */
  kill(): void {
    if (!this.down) {
      this.down = true;
      this.endWatchers(false);
    }
    this.server.forceShutdown();
    this.abortInFlight();
    this.stopping ??= Promise.resolve();
  }

  private async shutdown(): Promise<void> {
    if (this.down) return;
    this.setStatus(ServingStatus.NOT_SERVING);
    this.down = true;
    // Watch streams never end on their own; close them so tryShutdown need not wait for them.
    this.endWatchers(true);
    await new Promise<void>((resolve) => {
      let done = false;
      const finish = (): void => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        resolve();
      };
      const timer = setTimeout(() => {
        this.server.forceShutdown();
        this.abortInFlight();
        finish();
      }, this.stopGraceMs);
      timer.unref();
      this.server.tryShutdown(() => finish());
    });
  }

  private setStatus(status: ServingStatus): void {
    for (const service of this.statuses.keys()) this.statuses.set(service, status);
    for (const w of this.watchers) {
      const s = this.statuses.get(w.service);
      if (s !== undefined) w.call.write({ status: s });
    }
  }

  private endWatchers(graceful: boolean): void {
    for (const w of this.watchers) {
      if (graceful) w.call.end();
      else w.call.emit("error", { code: grpc.status.UNAVAILABLE, details: "worker is shutting down" });
    }
    this.watchers.clear();
  }

  private abortInFlight(): void {
    for (const ac of this.inFlight) ac.abort(new EngineError("UNAVAILABLE", "worker shut down"));
    this.inFlight.clear();
  }

  private handleWatch(call: HealthWatchCall): void {
    const service = call.request.service;
    if (this.down) {
      call.write({ status: ServingStatus.NOT_SERVING });
      call.end();
      return;
    }
    // The health protocol: an unknown service reads SERVICE_UNKNOWN and the stream stays open.
    call.write({ status: this.statuses.get(service) ?? ServingStatus.SERVICE_UNKNOWN });
    const watcher = { service, call };
    this.watchers.add(watcher);
    call.on("cancelled", () => this.watchers.delete(watcher));
  }

  /**
   * Ties a call to an AbortController: aborted when the client cancels, when the call's
   * deadline passes, and by kill(). `release` must be called when the call is done.
   */
  private track(call: InferCall | GenerateCall, method: WorkerCallContext["method"]) {
    const ac = new AbortController();
    this.inFlight.add(ac);
    const onCancelled = (): void => ac.abort(new EngineError("CANCELLED", "call cancelled by the client"));
    call.on("cancelled", onCancelled);
    const deadlineMs = deadlineOf(call);
    let timer: NodeJS.Timeout | undefined;
    if (deadlineMs !== undefined) {
      timer = setTimeout(
        () => ac.abort(new EngineError("DEADLINE_EXCEEDED", "call deadline exceeded")),
        Math.max(0, deadlineMs - Date.now()),
      );
      timer.unref();
    }
    const context: WorkerCallContext = {
      method,
      traceparent: metadataString(call.metadata, "traceparent"),
      tracestate: metadataString(call.metadata, "tracestate"),
      deadlineMs,
      peer: call.getPeer(),
      workerId: this.workerId,
    };
    if (this.onCall) {
      try {
        this.onCall(context);
      } catch {
        // A hook never breaks a call.
      }
    }
    const release = (): void => {
      if (timer) clearTimeout(timer);
      call.removeListener("cancelled", onCancelled);
      this.inFlight.delete(ac);
    };
    return { signal: ac.signal, context, release };
  }

  private async handleInfer(call: InferCall): Promise<IInferBatchResult> {
    const batch = call.request;
    if (!batch.model || !batch.version) throw new EngineError("INVALID_ARGUMENT", "batch needs a model and a version");
    if (batch.requests.length === 0) throw new EngineError("INVALID_ARGUMENT", "batch has no requests");
    const { signal, context, release } = this.track(call, "Infer");
    try {
      const prepared = batch.requests.map((r) => toEngineRequest(r, batch.model, batch.version, context.traceparent));
      const valid = prepared.filter((p): p is EngineRequest => !(p instanceof InvalidRequest));
      const startedAt = performance.now();
      let answers: EngineItemResult[] = [];
      if (valid.length > 0) {
        answers = await this.engine.infer(
          { model: batch.model, version: batch.version, requests: valid, traceparent: context.traceparent },
          signal,
        );
        if (!Array.isArray(answers) || answers.length !== valid.length) {
          throw new Error(`engine returned ${Array.isArray(answers) ? answers.length : "no"} results for ${valid.length} requests`);
        }
      }
      const engineMs = performance.now() - startedAt;
      let next = 0;
      const results = prepared.map((p, i): IInferItemResult => {
        const id = batch.requests[i]?.id ?? "";
        if (p instanceof InvalidRequest) {
          return { id, status: "error", error: { code: "INVALID_ARGUMENT", message: p.message }, not_started: true };
        }
        return toItemResult(id, answers[next++]);
      });
      return { results, engine_ms: engineMs };
    } finally {
      release();
    }
  }

  private async handleGetLoad(call: LoadCall): Promise<IWorkerLoad> {
    const engine = this.engine;
    if (!engine.load) throw new UnimplementedError("this worker's engine does not report its load");
    const ac = new AbortController();
    const onCancelled = (): void => ac.abort(new EngineError("CANCELLED", "call cancelled by the client"));
    call.on("cancelled", onCancelled);
    try {
      const load = await engine.load({ prefixBlocks: call.request.include_prefix_blocks === true }, ac.signal);
      return {
        waiting: load.waiting,
        running: load.running,
        kv_usage: load.kvUsage,
        kv_capacity_tokens: load.kvCapacityTokens ?? 0,
        prefix_blocks: [...(load.prefixBlocks ?? [])],
        block_tokens: load.prefixBlocks !== undefined ? (load.blockTokens ?? 0) : 0,
      };
    } finally {
      call.removeListener("cancelled", onCancelled);
    }
  }

  private async handleGenerate(call: GenerateCall): Promise<void> {
    const { signal, context, release } = this.track(call, "Generate");
    const id = call.request.request?.id ?? "";
    let seq = 0;
    try {
      const { model, version, request } = call.request;
      if (!model || !version) throw new EngineError("INVALID_ARGUMENT", "generate needs a model and a version");
      if (!request) throw new EngineError("INVALID_ARGUMENT", "generate needs a request");
      const prepared = toEngineRequest(request, model, version, context.traceparent);
      if (prepared instanceof InvalidRequest) throw new EngineError("INVALID_ARGUMENT", prepared.message);

      const generation = this.engine.generate(prepared, signal);
      let text = "";
      for await (const token of generation) {
        if (signal.aborted) break;
        text += token.text;
        await writeChunk(call, { seq: seq++, text: token.text }, signal);
      }
      if (signal.aborted) return;
      const final: IInferItemResult = { id, status: "ok", output: { text }, usage: generation.usage() };
      await writeChunk(call, { seq, final }, signal);
      call.end();
    } catch (err) {
      // Cancelled or past its deadline: grpc-js has answered the call already.
      if (signal.aborted || call.cancelled) return;
      if (err instanceof EngineError && !(err instanceof EngineClosedError) && err.code !== "INVALID_ARGUMENT") {
        // The request's own error: the stream ends normally with an error result, as an
        // Infer item would.
        call.write({ seq, final: { id, status: "error", error: { code: err.code, message: err.message } } });
        call.end();
      } else {
        call.emit("error", toStatus(err));
      }
    } finally {
      release();
    }
  }
}
