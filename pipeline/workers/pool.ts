/**
 * The workers of each model@version and the choice of one for each batch.
 *
 * - **Routing policy** per model (pipeline/workers/routing-policy.ts): `prefix` (the prompt tokens
 *   a worker would have to prefill plus its load, bounded; default for generative models),
 *   `least-loaded` (items in flight against capacity; default otherwise) or `round-robin`. The
 *   pool keeps its own index of the prompt blocks it sent where, and asks workers for their load
 *   (`GetLoad`) every `loadIntervalMs`; a worker that does not report is routed by what the pool
 *   knows of it.
 * - **Health-checked**: each worker is asked `grpc.health.v1.Health/Check` every
 *   `healthIntervalMs`; one that is not SERVING (or does not answer) gets no traffic until it is.
 * - **Circuit breaker**: after `ejectAfterFailures` consecutive failed calls a worker is ejected
 *   for `ejectForMs` (doubling while it keeps failing); then one probe call may go through, and
 *   its success closes the breaker.
 * - **Retries**: a call that fails with UNAVAILABLE or a lost connection is retried on another
 *   worker, with backoff, within a retry budget (a fraction of calls), and never past the
 *   batch's deadline. When no worker can take it, the batch fails as `noWorker`, and its
 *   requests wait in the queue for one to appear.
 * - **Draining**: a removed worker takes no new calls; its calls in flight finish, then its
 *   connection closes.
 */
import { Subject, type Observable } from "rxjs";
import { DispatchError, type BatchDispatcher, type BatchReply, type ItemReply } from "../../operators/dispatch-batch.js";
import type { Batch, RoutedJob } from "../../operators/types.js";
import type { ErrorCode, Priority } from "../../proto/wire.js";
import type { BatchTrace, Tracing } from "../telemetry/types.js";
import type { Chunk, GenerationReply, Generator } from "../../operators/generate-each.js";
import type { HealthStatus, WorkerBatch, WorkerChunk, WorkerGenerateRequest, WorkerLoadReport, WorkerRequest } from "./client.js";
import { BLOCK_TOKENS, estimateTokens, prefixBlockHashes } from "../../proto/prefix-blocks.js";
import { stableHash } from "../routing/registry.js";
import { PrefixIndex } from "./prefix-index.js";
import { chooseWorker, type Candidate, type RoutingPolicyName, type RoutingTunables } from "./routing-policy.js";
import { backoffMs } from "../../operators/support/backoff.js";
import { sleep } from "../../operators/support/sleep.js";
import { Breaker, type BreakerState } from "./breaker.js";

/** What the pool needs of a connection to one worker. */
export interface WorkerConnection {
  generate?(
    req: WorkerGenerateRequest,
    opts: { deadlineMs?: number; traceparent?: string; tracestate?: string; signal?: AbortSignal },
  ): AsyncIterable<WorkerChunk>;
  infer(
    batch: WorkerBatch,
    opts: { deadlineMs?: number; traceparent?: string; tracestate?: string },
  ): Promise<{ results: ItemReply[]; engine_ms?: number }>;
  /** Load report (`GetLoad`); undefined when the worker has none. */
  load?(opts: { prefixBlocks?: boolean }): Promise<WorkerLoadReport | undefined>;
  /** Standard health check; rejects when the worker cannot be reached. */
  check?(): Promise<HealthStatus>;
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
  /** First ejection period; doubles while the worker keeps failing, up to `maxEjectForMs`. */
  ejectForMs?: number;
  maxEjectForMs?: number;
  /** Health check period; 0 turns health checks off. */
  healthIntervalMs?: number;
  /** Retries allowed as a fraction of calls (plus `minRetriesPerSecond`). */
  retryBudgetRatio?: number;
  minRetriesPerSecond?: number;
  /** Backoff before retrying on another worker. */
  retryBackoffMs?: number;
  /** Hears pool events (for logs and metrics). Must not throw. */
  onEvent?: (e: PoolEvent) => void;
  /** Batch and gRPC client spans. */
  tracing?: Tracing;
  /** Routing policy per model; default `least-loaded`. */
  routing?: (model: string) => RoutingPolicyName;
  /** Period of the load reports asked of workers; 0 turns them off. */
  loadIntervalMs?: number;
  /** How long a prompt block sent to a worker is assumed cached there. */
  prefixTtlMs?: number;
  /** Weights of the `prefix` policy. */
  routingTunables?: RoutingTunables;
  /** Hears each finished batch call (for metrics). Must not throw. */
  onBatch?: (b: { model: string; version: string; size: number; workerSeconds: number; ok: boolean }) => void;
}

export type PoolEvent =
  | { type: "added" | "removed"; endpoint: string; key: string }
  | { type: "healthy" | "unhealthy"; endpoint: string; reason?: string }
  | { type: "ejected"; endpoint: string; forMs: number }
  | { type: "restored"; endpoint: string }
  | { type: "retry"; endpoint: string; key: string; reason: string }
  | { type: "retry-budget-exhausted"; key: string };

export const DEFAULT_EJECT_AFTER_FAILURES = 3;
export const DEFAULT_EJECT_FOR_MS = 1_000;
export const DEFAULT_MAX_EJECT_FOR_MS = 30_000;
export const DEFAULT_HEALTH_INTERVAL_MS = 1_000;
export const DEFAULT_RETRY_BUDGET_RATIO = 0.2;
export const DEFAULT_MIN_RETRIES_PER_SECOND = 10;
export const DEFAULT_RETRY_BACKOFF_MS = 25;
/** Cap of the backoff between attempts of one batch. */
const MAX_RETRY_BACKOFF_MS = 1_000;
/** Capacity assumed for a worker that does not advertise one. */
export const DEFAULT_WORKER_CAPACITY = 64;
export const DEFAULT_LOAD_INTERVAL_MS = 500;
/** A load report older than this many intervals is no longer used. */
export const LOAD_REPORT_STALE_INTERVALS = 4;
/** A worker that answered UNIMPLEMENTED is asked again after this. */
export const LOAD_REPORT_RETRY_MS = 60_000;

interface Worker {
  readonly endpoint: string;
  readonly conn: WorkerConnection;
  capacity: number;
  /** Batches and items in flight. */
  batches: number;
  items: number;
  readonly breaker: Breaker;
  /** Health as last checked; a worker starts healthy so traffic flows before the first check. */
  healthy: boolean;
  /** Removed from every key: finish what is in flight, then close. */
  draining: boolean;
  readonly keys: Set<string>;
  /** Its last load report and when it came. */
  report?: { load: WorkerLoadReport; atMs: number };
  /** It answered UNIMPLEMENTED: not asked again before this time. */
  noReportUntil: number;
  loadPending: boolean;
}

/** What routing needs of a request (or of a batch's first request). */
interface RouteOf {
  readonly model: string;
  readonly promptTokens: number;
  readonly hashes: string[];
  readonly session?: string;
}

export interface WorkerSnapshot {
  endpoint: string;
  keys: string[];
  capacity: number;
  inflightBatches: number;
  inflightItems: number;
  failures: number;
  healthy: boolean;
  breaker: BreakerState;
  /** The worker's last load report, when it sends them. */
  load?: { waiting: number; running: number; kvUsage: number };
}

const keyOf = (model: string, version: string): string => `${model}@${version}`;
const PRIORITY_RANK: Record<Priority, number> = { high: 0, normal: 1, low: 2 };

export class WorkerPool implements BatchDispatcher, Generator {
  private readonly workers = new Map<string, Worker>();
  private readonly byKey = new Map<string, Set<Worker>>();
  private readonly freed = new Subject<string>();
  private healthTimer: NodeJS.Timeout | undefined;
  private loadTimer: NodeJS.Timeout | undefined;
  private readonly prefixes: PrefixIndex;
  /** Choices made per key, for round-robin. */
  private readonly turns = new Map<string, number>();
  private stopped = false;
  /** Retry budget: a sliding count of calls and retries over the last 10 s. */
  private budget = { since: Date.now(), calls: 0, retries: 0 };
  /** Calls waiting for a free slot, per key: served by priority rank, then in arrival order. */
  private readonly slotWaiters = new Map<string, Array<{ rank: number; seq: number; wake: () => void }>>();
  private waiterSeq = 0;
  /** Aborts for generations (cancellation), by job. */
  signalFor: (job: RoutedJob) => { signal: AbortSignal; done: () => void } = () => ({ signal: new AbortController().signal, done: () => undefined });

  constructor(private readonly opts: WorkerPoolOptions) {
    const every = opts.healthIntervalMs ?? DEFAULT_HEALTH_INTERVAL_MS;
    if (every > 0) {
      this.healthTimer = setInterval(() => void this.checkHealth(), every);
      this.healthTimer.unref();
    }
    this.prefixes = new PrefixIndex(opts.prefixTtlMs !== undefined ? { ttlMs: opts.prefixTtlMs } : {});
    const loadEvery = opts.loadIntervalMs ?? DEFAULT_LOAD_INTERVAL_MS;
    if (loadEvery > 0) {
      this.loadTimer = setInterval(() => void this.pollLoad(), loadEvery);
      this.loadTimer.unref();
    }
  }

  /** Emits a model@version key whenever one of its workers finishes a batch or becomes usable. */
  get capacityFreed$(): Observable<string> {
    return this.freed.asObservable();
  }

  private notifyFreed(key: string): void {
    this.freed.next(key);
    this.wake(key);
  }

  private wake(key: string): void {
    const list = this.slotWaiters.get(key);
    if (!list || list.length === 0) return;
    this.slotWaiters.delete(key);
    // Highest priority first, then oldest: each re-checks for a slot in this order.
    list.sort((a, b) => a.rank - b.rank || a.seq - b.seq);
    for (const w of list) w.wake();
  }

  /** Waits until `wake(key)`, the deadline or an abort; the caller then checks again. */
  private waitForSlot(key: string, rank: number, deadlineMs: number, signal?: AbortSignal): Promise<void> {
    return new Promise<void>((resolve) => {
      let list = this.slotWaiters.get(key);
      if (!list) this.slotWaiters.set(key, (list = []));
      const entry = { rank, seq: this.waiterSeq++, wake: (): void => done() };
      const done = (): void => {
        clearTimeout(t);
        signal?.removeEventListener("abort", done);
        const l = this.slotWaiters.get(key);
        if (l) {
          const i = l.indexOf(entry);
          if (i >= 0) l.splice(i, 1);
        }
        resolve();
      };
      const t = setTimeout(done, Math.min(2_147_483_647, Math.max(1, deadlineMs - Date.now())));
      t.unref();
      signal?.addEventListener("abort", done, { once: true });
      list.push(entry);
    });
  }

  private emit(e: PoolEvent): void {
    try {
      this.opts.onEvent?.(e);
    } catch {
      // a listener's failure is its own
    }
  }

  /** Adds a worker for a model version (again: updates its capacity). */
  add(model: string, version: string, endpoint: string, capacity = DEFAULT_WORKER_CAPACITY): void {
    if (this.stopped) return;
    let w = this.workers.get(endpoint);
    if (!w || w.draining) {
      w = {
        endpoint,
        conn: this.opts.connect(endpoint),
        capacity,
        batches: 0,
        items: 0,
        breaker: new Breaker({
          ejectAfterFailures: this.opts.ejectAfterFailures ?? DEFAULT_EJECT_AFTER_FAILURES,
          ejectForMs: this.opts.ejectForMs ?? DEFAULT_EJECT_FOR_MS,
          maxEjectForMs: this.opts.maxEjectForMs ?? DEFAULT_MAX_EJECT_FOR_MS,
        }),
        healthy: true,
        draining: false,
        keys: new Set(),
        noReportUntil: 0,
        loadPending: false,
      };
      this.workers.set(endpoint, w);
    }
    w.capacity = Math.max(1, capacity);
    const key = keyOf(model, version);
    if (!w.keys.has(key)) {
      w.keys.add(key);
      let set = this.byKey.get(key);
      if (!set) this.byKey.set(key, (set = new Set()));
      set.add(w);
      this.emit({ type: "added", endpoint, key });
      this.notifyFreed(key);
    }
  }

  /** Removes a worker from a model version; with no version left it drains and closes. */
  remove(model: string, version: string, endpoint: string): void {
    const key = keyOf(model, version);
    const w = this.workers.get(endpoint);
    if (!w || !w.keys.has(key)) return;
    w.keys.delete(key);
    this.byKey.get(key)?.delete(w);
    if (this.byKey.get(key)?.size === 0) this.byKey.delete(key);
    this.emit({ type: "removed", endpoint, key });
    if (w.keys.size === 0) {
      w.draining = true;
      this.workers.delete(endpoint);
      this.prefixes.forget(endpoint);
      if (w.batches === 0) this.close(w);
    }
  }

  private close(w: Worker): void {
    void Promise.resolve()
      .then(() => w.conn.close())
      .catch(() => undefined);
  }

  /** Keys served now. */
  keys(): string[] {
    return [...this.byKey.keys()];
  }

  private usable(w: Worker, now: number): boolean {
    if (w.draining || !w.healthy) return false;
    return w.breaker.allows(now, w.batches);
  }

  /**
   * True when the batcher need not wait: some usable worker of the key could start a batch now,
   * or the key has no usable worker at all (then waiting here helps nothing: the batch goes to
   * dispatch, which answers "no worker" and the requests wait in the queue, deadlines counted).
   */
  hasIdleCapacity(key: string): boolean {
    const now = Date.now();
    let usable = false;
    for (const w of this.byKey.get(key) ?? []) {
      if (!this.usable(w, now)) continue;
      usable = true;
      if (w.batches < this.opts.batchesPerWorker && w.items < w.capacity) return true;
    }
    return !usable;
  }

  /** True when the key has at least one usable worker. */
  hasWorker(key: string): boolean {
    const set = this.byKey.get(key);
    if (!set) return false;
    const now = Date.now();
    for (const w of set) if (this.usable(w, now)) return true;
    return false;
  }

  snapshot(): WorkerSnapshot[] {
    return [...this.workers.values()].map((w) => ({
      endpoint: w.endpoint,
      keys: [...w.keys],
      capacity: w.capacity,
      inflightBatches: w.batches,
      inflightItems: w.items,
      failures: w.breaker.failures,
      healthy: w.healthy,
      breaker: w.breaker.state,
      ...(w.report ? { load: { waiting: w.report.load.waiting, running: w.report.load.running, kvUsage: w.report.load.kvUsage } } : {}),
    }));
  }

  private hasBatchSlot(key: string, exclude: Set<Worker>): boolean {
    const now = Date.now();
    for (const w of this.byKey.get(key) ?? []) {
      if (!exclude.has(w) && this.usable(w, now) && w.batches < this.opts.batchesPerWorker) return true;
    }
    return false;
  }

  private pick(key: string, exclude: Set<Worker>): Worker | undefined {
    const set = this.byKey.get(key);
    if (!set) return undefined;
    const now = Date.now();
    let best: Worker | undefined;
    let bestLoad = Infinity;
    for (const w of set) {
      if (exclude.has(w) || !this.usable(w, now)) continue;
      // Busy workers (all batch slots taken) only when no other is free.
      const load = w.items / w.capacity + (w.batches >= this.opts.batchesPerWorker ? 1_000 : 0);
      if (load < bestLoad) {
        best = w;
        bestLoad = load;
      }
    }
    return best;
  }

  /** The route facts of a request: its prompt's blocks, its session. */
  private routeOf(job: RoutedJob): RouteOf {
    const prompt = job.prompt ?? (job.inputs !== undefined ? JSON.stringify(job.inputs) : "");
    return {
      model: job.model,
      promptTokens: estimateTokens(prompt),
      hashes: this.policyOf(job.model) === "prefix" ? prefixBlockHashes(prompt) : [],
      ...(job.session !== undefined ? { session: job.session } : {}),
    };
  }

  private policyOf(model: string): RoutingPolicyName {
    try {
      return this.opts.routing?.(model) ?? "least-loaded";
    } catch {
      return "least-loaded";
    }
  }

  /**
   * Chooses among `workers` (all usable and free) by the model's policy, and notes where the
   * prompt's blocks and session went.
   */
  private choose(key: string, workers: readonly Worker[], route: RouteOf): Worker | undefined {
    if (workers.length === 0) return undefined;
    const policy = this.policyOf(route.model);
    const now = Date.now();
    const stale = (this.opts.loadIntervalMs ?? DEFAULT_LOAD_INTERVAL_MS) * LOAD_REPORT_STALE_INTERVALS;
    const sessionWorker = route.session !== undefined ? this.prefixes.sessionWorker(route.session) : undefined;
    const salt = route.hashes[0] ?? "";
    const candidates: Candidate[] = workers.map((w) => {
      const fresh = w.report && now - w.report.atMs <= stale ? w.report.load : undefined;
      return {
        inflight: w.items,
        capacity: w.capacity,
        ...(fresh ? { reported: fresh } : {}),
        cachedBlocks: route.hashes.length > 0 ? this.prefixes.matched(w.endpoint, route.hashes) : 0,
        sessionMatch: sessionWorker === w.endpoint,
        tiebreak: stableHash(salt + w.endpoint),
      };
    });
    const turn = this.turns.get(key) ?? 0;
    this.turns.set(key, turn + 1);
    const i = chooseWorker(policy, candidates, { promptTokens: route.promptTokens, blockTokens: BLOCK_TOKENS, turn }, this.opts.routingTunables);
    const w = i === undefined ? undefined : workers[i];
    if (w && (route.hashes.length > 0 || route.session !== undefined)) this.prefixes.record(w.endpoint, route.hashes, route.session);
    return w;
  }

  /** One round of load reports (run on a timer; exposed for tests). */
  async pollLoad(): Promise<void> {
    const now = Date.now();
    await Promise.all(
      [...this.workers.values()].map(async (w) => {
        if (!w.conn.load || w.draining || w.loadPending || now < w.noReportUntil) return;
        w.loadPending = true;
        const askedAtMs = Date.now();
        try {
          const report = await w.conn.load({ prefixBlocks: true });
          if (!report) {
            // An older worker, or an engine without load: routed by what the pool knows.
            w.report = undefined;
            w.noReportUntil = Date.now() + LOAD_REPORT_RETRY_MS;
            return;
          }
          w.report = { load: report, atMs: Date.now() };
          if (report.blockTokens === BLOCK_TOKENS && !w.draining) this.prefixes.replace(w.endpoint, report.prefixBlocks, askedAtMs);
        } catch {
          // No answer this time: the last report stands until it is stale.
        } finally {
          w.loadPending = false;
        }
      }),
    );
  }

  /** The worker for a batch: by the model's policy among the free ones, else the least busy. */
  private pickFor(batch: Batch, exclude: Set<Worker>): Worker | undefined {
    const first = batch.jobs[0];
    if (first && this.policyOf(batch.model) !== "least-loaded") {
      const now = Date.now();
      const free = [...(this.byKey.get(batch.key) ?? [])].filter((w) => !exclude.has(w) && this.usable(w, now) && w.batches < this.opts.batchesPerWorker);
      const chosen = this.choose(batch.key, free, this.routeOf(first));
      if (chosen) return chosen;
    }
    return this.pick(batch.key, exclude);
  }

  private takeRetry(key: string): boolean {
    const now = Date.now();
    if (now - this.budget.since > 10_000) this.budget = { since: now, calls: 0, retries: 0 };
    const seconds = Math.max(1, (now - this.budget.since) / 1000);
    const allowed =
      this.budget.calls * (this.opts.retryBudgetRatio ?? DEFAULT_RETRY_BUDGET_RATIO) +
      seconds * (this.opts.minRetriesPerSecond ?? DEFAULT_MIN_RETRIES_PER_SECOND);
    if (this.budget.retries >= allowed) {
      this.emit({ type: "retry-budget-exhausted", key });
      return false;
    }
    this.budget.retries++;
    return true;
  }

  async dispatch(batch: Batch): Promise<BatchReply> {
    let bt: BatchTrace | undefined;
    try {
      bt = this.opts.tracing?.startBatch(batch);
    } catch {
      bt = undefined;
    }
    const t0 = performance.now();
    let ok = false;
    try {
      const reply = await this.attempts(batch, bt);
      ok = true;
      bt?.end();
      return reply;
    } catch (err) {
      bt?.end((err as DispatchError).code ?? "INTERNAL", err);
      throw err;
    } finally {
      try {
        this.opts.onBatch?.({ model: batch.model, version: batch.version, size: batch.jobs.length, workerSeconds: (performance.now() - t0) / 1000, ok });
      } catch {
        // metrics never break a call
      }
    }
  }

  private async attempts(batch: Batch, bt: BatchTrace | undefined): Promise<BatchReply> {
    if (this.stopped) throw new DispatchError("the pipeline is stopping", "UNAVAILABLE", true, { noWorker: true });
    const tried = new Set<Worker>();
    let lastErr: DispatchError | undefined;
    const request = toWorkerBatch(batch);
    // Waiting for a slot is bounded by the requests' own deadlines (the queue is bounded by the
    // in-flight credits); the model's timeout bounds each call, from when it starts.
    const waitUntil = latestDeadline(batch) ?? Number.POSITIVE_INFINITY;
    let deadlineMs = batchDeadline(batch, this.opts.timeoutMs(batch.model));
    const first = batch.jobs.find((j) => j.traceparent !== undefined);
    const passThrough = first?.traceparent ? { traceparent: first.traceparent, ...(first.tracestate ? { tracestate: first.tracestate } : {}) } : {};
    this.budget.calls++;
    const rank = Math.min(...batch.jobs.map((j) => PRIORITY_RANK[j.priority]));
    for (let attempt = 0; ; attempt++) {
      // Every worker busy with its batches: wait for one, high priority first.
      while (!this.stopped && this.pick(batch.key, tried) !== undefined && !this.hasBatchSlot(batch.key, tried) && Date.now() < waitUntil) {
        await this.waitForSlot(batch.key, rank, waitUntil);
      }
      if (this.stopped) throw new DispatchError("the pipeline is stopping", "UNAVAILABLE", true, { noWorker: true });
      deadlineMs = batchDeadline(batch, this.opts.timeoutMs(batch.model));
      const w = this.pickFor(batch, tried);
      if (!w) {
        if (lastErr) throw lastErr;
        throw new DispatchError(`no healthy worker serves ${batch.key}`, "UNAVAILABLE", true, { noWorker: true });
      }
      tried.add(w);
      w.breaker.calling();
      w.batches++;
      w.items += batch.jobs.length;
      const t0 = performance.now();
      const call = bt?.startWorkerCall(w.endpoint, "Infer");
      const trace = call?.carrier.traceparent ? call.carrier : passThrough;
      try {
        const reply = await w.conn.infer(request, { deadlineMs, ...trace });
        call?.end();
        this.succeeded(w);
        return { results: reply.results, workerMs: performance.now() - t0, worker: w.endpoint };
      } catch (err) {
        const e = asDispatchError(err);
        call?.end(e.code, e);
        if (!e.retriable) {
          // The worker answered (a bad batch, a deadline): not the worker's fault.
          if (w.breaker.probing) this.succeeded(w);
          throw e;
        }
        this.failed(w);
        lastErr = e;
        if (Date.now() >= deadlineMs || !this.takeRetry(batch.key)) throw e;
        this.emit({ type: "retry", endpoint: w.endpoint, key: batch.key, reason: e.message });
      } finally {
        w.batches--;
        w.items -= batch.jobs.length;
        if (w.draining && w.batches === 0) this.close(w);
        if (!this.stopped) for (const k of w.keys) this.notifyFreed(k);
      }
      await sleep(backoffMs(attempt, { baseMs: this.opts.retryBackoffMs ?? DEFAULT_RETRY_BACKOFF_MS, maxMs: MAX_RETRY_BACKOFF_MS }));
    }
  }

  /**
   * Runs one generation on the least-loaded worker with a free slot (items in flight below its
   * advertised capacity), waiting for a slot when all are busy. Chunks go to `onChunk` in order.
   * A failure before the first chunk is retried on another worker; after it, the generation
   * cannot be resumed and fails retriably (the request is delivered again and starts over).
   */
  async generate(job: RoutedJob, onChunk: (c: Chunk) => Promise<void> | void): Promise<GenerationReply> {
    const key = keyOf(job.model, job.version);
    const deadlineMs = job.deadlineMs ?? Date.now() + this.opts.timeoutMs(job.model);
    const cancel = this.signalFor(job);
    const tried = new Set<Worker>();
    let lastErr: DispatchError | undefined;
    const route = this.routeOf(job);
    try {
      for (let attempt = 0; ; attempt++) {
        const w = await this.acquireSlot(key, tried, deadlineMs, cancel.signal, PRIORITY_RANK[job.priority], route);
        if (!w) {
          if (lastErr) throw lastErr;
          throw new DispatchError(`no healthy worker serves ${key}`, "UNAVAILABLE", true, { noWorker: true });
        }
        tried.add(w);
        w.breaker.calling();
        const call = this.opts.tracing?.requestOf(job.delivery)?.startWorkerCall(w.endpoint, "Generate");
        const trace = call?.carrier.traceparent ? call.carrier : job.traceparent ? { traceparent: job.traceparent, ...(job.tracestate ? { tracestate: job.tracestate } : {}) } : {};
        const t0 = performance.now();
        let chunks = 0;
        let firstChunkMs: number | undefined;
        try {
          if (!w.conn.generate) throw new DispatchError(`worker ${w.endpoint} cannot stream`, "UNAVAILABLE", true);
          const stream = w.conn.generate(
            { model: job.model, version: job.version, request: toWorkerRequest(job) },
            { deadlineMs, signal: cancel.signal, ...trace },
          );
          for await (const c of stream) {
            if (c.final) {
              const f = c.final;
              call?.end(f.status === "ok" ? "ok" : (f.error?.code ?? "INTERNAL"));
              this.succeeded(w);
              const reply: GenerationReply = {
                text: f.output?.text ?? "",
                usage: f.usage ?? { prompt_tokens: 0, completion_tokens: chunks },
                workerMs: performance.now() - t0,
                worker: w.endpoint,
                ...(firstChunkMs !== undefined ? { firstChunkMs } : {}),
                ...(f.output?.data !== undefined ? { data: f.output.data } : {}),
                ...(f.status !== "ok" ? { error: f.error ?? { code: "INTERNAL", message: "generation failed" } } : {}),
              };
              return reply;
            }
            if (chunks === 0) firstChunkMs = performance.now() - t0;
            chunks++;
            await onChunk({ seq: c.seq, text: c.text });
          }
          throw new DispatchError(`worker ${w.endpoint} ended the generation without a result`, "UNAVAILABLE", true);
        } catch (err) {
          if (cancel.signal.aborted) {
            call?.end("CANCELLED");
            throw new DispatchError("cancelled by the client", "CANCELLED", false, { cause: err });
          }
          const e = asDispatchError(err);
          call?.end(e.code, e);
          if (!e.retriable) throw e;
          this.failed(w);
          lastErr = chunks > 0 ? new DispatchError(`generation broke off after ${chunks} chunks: ${e.message}`, "UNAVAILABLE", true, { cause: e }) : e;
          if (chunks > 0 || Date.now() >= deadlineMs || !this.takeRetry(key)) throw lastErr;
          this.emit({ type: "retry", endpoint: w.endpoint, key, reason: e.message });
        } finally {
          this.releaseSlot(w);
        }
        await sleep(backoffMs(attempt, { baseMs: this.opts.retryBackoffMs ?? DEFAULT_RETRY_BACKOFF_MS, maxMs: MAX_RETRY_BACKOFF_MS }));
      }
    } finally {
      cancel.done();
    }
  }

  /** Waits for a usable worker of the key with a free slot; undefined when the key has none. */
  private async acquireSlot(key: string, exclude: Set<Worker>, deadlineMs: number, signal: AbortSignal, rank: number, route: RouteOf): Promise<Worker | undefined> {
    for (;;) {
      if (signal.aborted) throw new DispatchError("cancelled by the client", "CANCELLED", false);
      if (this.stopped) return undefined;
      const set = this.byKey.get(key);
      const now = Date.now();
      const free: Worker[] = [];
      let anyUsable = false;
      for (const w of set ?? []) {
        if (exclude.has(w) || !this.usable(w, now)) continue;
        anyUsable = true;
        if (w.items < w.capacity) free.push(w);
      }
      const best = this.choose(key, free, route);
      if (best) {
        best.items++;
        best.batches++;
        return best;
      }
      if (!anyUsable) return undefined;
      if (now >= deadlineMs) throw new DispatchError(`no free worker slot for ${key} before the deadline`, "DEADLINE_EXCEEDED", false);
      // All busy: wait for a slot to free (or the deadline, or a cancel).
      await this.waitForSlot(key, rank, deadlineMs, signal);
    }
  }

  private releaseSlot(w: Worker): void {
    w.items--;
    w.batches--;
    if (w.draining && w.batches === 0) this.close(w);
    if (!this.stopped) for (const k of w.keys) this.notifyFreed(k);
  }

  private succeeded(w: Worker): void {
    if (w.breaker.succeeded()) this.emit({ type: "restored", endpoint: w.endpoint });
  }

  private failed(w: Worker): void {
    const forMs = w.breaker.failed(Date.now());
    if (forMs === undefined) return;
    this.emit({ type: "ejected", endpoint: w.endpoint, forMs });
    // Let the batcher know when the probe may go.
    const t = setTimeout(() => {
      if (!this.stopped) for (const k of w.keys) this.notifyFreed(k);
    }, forMs);
    t.unref();
  }

  /** One round of health checks (run on a timer; exposed for tests). */
  async checkHealth(): Promise<void> {
    await Promise.all(
      [...this.workers.values()].map(async (w) => {
        if (!w.conn.check || w.draining) return;
        let ok: boolean;
        let reason: string | undefined;
        try {
          const s = await w.conn.check();
          ok = s === "SERVING";
          if (!ok) reason = s;
        } catch (err) {
          ok = false;
          reason = (err as Error)?.message ?? String(err);
        }
        if (ok !== w.healthy) {
          w.healthy = ok;
          this.emit(ok ? { type: "healthy", endpoint: w.endpoint } : { type: "unhealthy", endpoint: w.endpoint, ...(reason ? { reason } : {}) });
          if (ok && !this.stopped) for (const k of w.keys) this.notifyFreed(k);
        }
      }),
    );
  }

  /** Closes every connection. Safe to call twice. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    if (this.healthTimer) clearInterval(this.healthTimer);
    if (this.loadTimer) clearInterval(this.loadTimer);
    this.prefixes.clear();
    // Calls waiting for a slot see `stopped` and end (their requests go back to the queue).
    for (const key of [...this.slotWaiters.keys()]) this.wake(key);
    this.freed.complete();
    await Promise.all([...this.workers.values()].map((w) => Promise.resolve().then(() => w.conn.close()).catch(() => undefined)));
    this.workers.clear();
    this.byKey.clear();
  }
}

/** The latest request deadline of the batch, when every request has one. */
function latestDeadline(batch: Batch): number | undefined {
  const deadlines = batch.jobs.map((j) => j.deadlineMs);
  return deadlines.every((x): x is number => x !== undefined) ? Math.max(...deadlines) : undefined;
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
