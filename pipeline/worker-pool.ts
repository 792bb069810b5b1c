/**
 * The workers of each model@version, and the choice of one for each batch: the least loaded
 * (batches in flight against what it can hold) among those not ejected after failures. A batch
 * whose call fails in a way worth retrying goes to another worker, then back to the queue.
 */
import { Subject, type Observable } from "rxjs";
import { DispatchError, type BatchDispatcher, type BatchReply, type ItemReply } from "../operators/dispatch-batch.js";
import type { Batch, ErrorCode, RoutedJob } from "../operators/types.js";
import type { WorkerBatch, WorkerRequest } from "./worker-client.js";

/** What the pool needs of a connection to one worker. */
export interface WorkerConnection {
  infer(
    batch: WorkerBatch,
    opts: { deadlineMs?: number; traceparent?: string; tracestate?: string },
  ): Promise<{ results: ItemReply[]; engine_ms?: number }>;
  close(): void | Promise<void>;
}

export interface WorkerPoolOptions {
  /** Batches in flight per worker before it counts as busy. */
  batchesPerWorker: number;
  /** Call timeout per model (the registry's `timeout_ms`). */
  timeoutMs: (model: string) => number;
  /** Opens a connection to an endpoint. */
  connect: (endpoint: string) => WorkerConnection;
  /** Consecutive failures that eject a worker. */
  ejectAfterFailures?: number;
  /** How long an ejected worker gets no traffic before it is tried again. */
  ejectForMs?: number;
}

export const DEFAULT_EJECT_AFTER_FAILURES = 3;
export const DEFAULT_EJECT_FOR_MS = 2_000;

interface Endpoint {
  readonly endpoint: string;
  readonly conn: WorkerConnection;
  inflight: number;
  failures: number;
  ejectedUntil: number;
  /** model@version keys served here */
  readonly keys: Set<string>;
}

export interface WorkerSnapshot {
  endpoint: string;
  keys: string[];
  inflight: number;
  failures: number;
  ejected: boolean;
}

const keyOf = (model: string, version: string): string => `${model}@${version}`;

export class WorkerPool implements BatchDispatcher {
  private readonly endpoints = new Map<string, Endpoint>();
  private readonly byKey = new Map<string, Set<Endpoint>>();
  private readonly freed = new Subject<string>();
  private stopped = false;

  constructor(private readonly opts: WorkerPoolOptions) {}

  /** Emits a model@version key whenever one of its workers finishes a batch. */
  get capacityFreed$(): Observable<string> {
    return this.freed.asObservable();
  }

  add(model: string, version: string, endpoint: string): void {
    let ep = this.endpoints.get(endpoint);
    if (!ep) {
      ep = { endpoint, conn: this.opts.connect(endpoint), inflight: 0, failures: 0, ejectedUntil: 0, keys: new Set() };
      this.endpoints.set(endpoint, ep);
    }
    const key = keyOf(model, version);
    ep.keys.add(key);
    let set = this.byKey.get(key);
    if (!set) this.byKey.set(key, (set = new Set()));
    set.add(ep);
  }

  remove(model: string, version: string, endpoint: string): void {
    const key = keyOf(model, version);
    const ep = this.endpoints.get(endpoint);
    if (!ep) return;
    ep.keys.delete(key);
    this.byKey.get(key)?.delete(ep);
    if (ep.keys.size === 0) {
      this.endpoints.delete(endpoint);
      // In-flight calls finish on their own; the connection closes after them.
      const close = (): void => void Promise.resolve(ep.conn.close()).catch(() => undefined);
      if (ep.inflight === 0) close();
      else (ep as Endpoint & { closeWhenIdle?: () => void }).closeWhenIdle = close;
    }
  }

  /** True when some worker of the key could start a batch now: the batcher need not wait. */
  hasIdleCapacity(key: string): boolean {
    const set = this.byKey.get(key);
    if (!set) return false;
    const now = Date.now();
    for (const ep of set) if (ep.ejectedUntil <= now && ep.inflight < this.opts.batchesPerWorker) return true;
    return false;
  }

  snapshot(): WorkerSnapshot[] {
    const now = Date.now();
    return [...this.endpoints.values()].map((ep) => ({
      endpoint: ep.endpoint,
      keys: [...ep.keys],
      inflight: ep.inflight,
      failures: ep.failures,
      ejected: ep.ejectedUntil > now,
    }));
  }

  private pick(key: string, exclude: Set<Endpoint>): Endpoint | undefined {
    const set = this.byKey.get(key);
    if (!set) return undefined;
    const now = Date.now();
    let best: Endpoint | undefined;
    let fallback: Endpoint | undefined;
    for (const ep of set) {
      if (exclude.has(ep)) continue;
      if (ep.ejectedUntil > now) {
        // An ejected worker is tried only when nothing else is left (a probe).
        if (!fallback || ep.ejectedUntil < fallback.ejectedUntil) fallback = ep;
        continue;
      }
      if (!best || ep.inflight < best.inflight) best = ep;
    }
    return best ?? fallback;
  }

  async dispatch(batch: Batch): Promise<BatchReply> {
    if (this.stopped) throw new DispatchError("the pipeline is stopping", "UNAVAILABLE", true);
    const tried = new Set<Endpoint>();
    let lastErr: DispatchError | undefined;
    const request = toWorkerBatch(batch);
    const deadlineMs = batchDeadline(batch, this.opts.timeoutMs(batch.model));
    for (;;) {
      const ep = this.pick(batch.key, tried);
      if (!ep) {
        throw lastErr ?? new DispatchError(`no worker serves ${batch.key}`, "UNAVAILABLE", true);
      }
      tried.add(ep);
      ep.inflight++;
      const t0 = performance.now();
      try {
        const reply = await ep.conn.infer(request, { deadlineMs, ...(batch.jobs[0]?.traceparent ? { traceparent: batch.jobs[0].traceparent } : {}) });
        ep.failures = 0;
        ep.ejectedUntil = 0;
        return { results: reply.results, workerMs: performance.now() - t0, worker: ep.endpoint };
      } catch (err) {
        const e = asDispatchError(err);
        if (e.retriable) {
          ep.failures++;
          if (ep.failures >= (this.opts.ejectAfterFailures ?? DEFAULT_EJECT_AFTER_FAILURES)) {
            ep.ejectedUntil = Date.now() + (this.opts.ejectForMs ?? DEFAULT_EJECT_FOR_MS);
          }
          lastErr = e;
          if (Date.now() < deadlineMs) continue;
        }
        throw e;
      } finally {
        ep.inflight--;
        const pending = (ep as Endpoint & { closeWhenIdle?: () => void }).closeWhenIdle;
        if (pending && ep.inflight === 0) pending();
        if (!this.stopped) for (const k of ep.keys) this.freed.next(k);
      }
    }
  }

  /** Closes every connection. Safe to call twice. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.freed.complete();
    await Promise.all([...this.endpoints.values()].map((ep) => Promise.resolve(ep.conn.close()).catch(() => undefined)));
    this.endpoints.clear();
    this.byKey.clear();
  }
}

function batchDeadline(batch: Batch, timeoutMs: number): number {
  let d = Date.now() + timeoutMs;
  // The call need not outlive the latest request deadline in the batch.
  const deadlines = batch.jobs.map((j) => j.deadlineMs);
  if (deadlines.every((x): x is number => x !== undefined)) d = Math.min(d, Math.max(...deadlines));
  return d;
}

function toWorkerRequest(job: RoutedJob): WorkerRequest {
  return {
    id: job.id,
    tenant: job.tenant,
    ...(job.prompt !== undefined ? { prompt: job.prompt } : {}),
    ...(job.inputs !== undefined ? { inputs: job.inputs } : {}),
    ...(job.parameters !== undefined ? { parameters: job.parameters } : {}),
    ...(job.deadlineMs !== undefined ? { deadlineMs: job.deadlineMs } : {}),
  };
}

export function toWorkerBatch(batch: Batch): WorkerBatch {
  return { model: batch.model, version: batch.version, requests: batch.jobs.map(toWorkerRequest) };
}

function asDispatchError(err: unknown): DispatchError {
  if (err instanceof DispatchError) return err;
  const e = err as { code?: unknown; retriable?: unknown; message?: string };
  const code = typeof e?.code === "string" ? (e.code as ErrorCode) : "INTERNAL";
  return new DispatchError(e?.message ?? String(err), code, e?.retriable === true, { cause: err });
}
