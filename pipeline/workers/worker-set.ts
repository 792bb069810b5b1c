/**
 * The workers of each model@version key and their slots: adding and draining workers, which are
 * usable (healthy, breaker closed or probing), batch and item slots taken and freed, waiting for
 * a free slot, the circuit breaker's outcomes, and health checks.
 */
import { Subject, type Observable } from "rxjs";
import { Breaker } from "./breaker.js";
import type { PrefixIndex } from "./prefix-index.js";
import {
  DEFAULT_EJECT_AFTER_FAILURES,
  DEFAULT_EJECT_FOR_MS,
  DEFAULT_MAX_EJECT_FOR_MS,
  DEFAULT_WORKER_CAPACITY,
  keyOf,
  type PoolEvent,
  type PoolWorker,
  type WorkerPoolOptions,
  type WorkerSnapshot,
} from "./pool-options.js";
import { SlotQueue } from "./slot-queue.js";

/** Added to the load of a worker whose batch slots are all taken, so it is picked only when no other is free. */
const BUSY_PENALTY = 1_000;

export class WorkerSet {
  private readonly workers = new Map<string, PoolWorker>();
  private readonly byKey = new Map<string, Set<PoolWorker>>();
  private readonly freed = new Subject<string>();
  private readonly slots = new SlotQueue();
  private isStopped = false;

  constructor(
    private readonly opts: WorkerPoolOptions,
    private readonly prefixes: PrefixIndex,
    private readonly emit: (e: PoolEvent) => void,
  ) {}

  get stopped(): boolean {
    return this.isStopped;
  }

  /** Emits a model@version key whenever one of its workers finishes a batch or becomes usable. */
  get freed$(): Observable<string> {
    return this.freed.asObservable();
  }

  /** Every worker, draining ones excepted. */
  all(): IterableIterator<PoolWorker> {
    return this.workers.values();
  }

  /** Workers of the key. */
  of(key: string): ReadonlySet<PoolWorker> {
    return this.byKey.get(key) ?? new Set();
  }

  private notifyFreed(key: string): void {
    this.freed.next(key);
    this.slots.wake(key);
  }

  /** Tells the batcher and the waiting calls of each key the worker serves that it may take more. */
  notifyFreedAll(w: PoolWorker): void {
    if (!this.isStopped) for (const k of w.keys) this.notifyFreed(k);
  }

  /** Waits until a slot of the key may have freed, the deadline or an abort. */
  waitForSlot(key: string, rank: number, deadlineMs: number, signal?: AbortSignal): Promise<void> {
    return this.slots.wait(key, rank, deadlineMs, signal);
  }

  /** Adds a worker for a model version (again: updates its capacity). */
  add(model: string, version: string, endpoint: string, capacity = DEFAULT_WORKER_CAPACITY): void {
    if (this.isStopped) return;
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

  private close(w: PoolWorker): void {
    void Promise.resolve()
      .then(() => w.conn.close())
      .catch(() => undefined);
  }

  /** Keys served now. */
  keys(): string[] {
    return [...this.byKey.keys()];
  }

  usable(w: PoolWorker, now: number): boolean {
    if (w.draining || !w.healthy) return false;
    return w.breaker.allows(now, w.batches);
  }

  /** See WorkerPool.hasIdleCapacity. */
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

  /** True when a usable worker of the key, not in `exclude`, has a free batch slot. */
  hasBatchSlot(key: string, exclude: Set<PoolWorker>): boolean {
    const now = Date.now();
    for (const w of this.byKey.get(key) ?? []) {
      if (!exclude.has(w) && this.usable(w, now) && w.batches < this.opts.batchesPerWorker) return true;
    }
    return false;
  }

  /** The usable worker of the key (not in `exclude`) with the least items against capacity. */
  pick(key: string, exclude: Set<PoolWorker>): PoolWorker | undefined {
    const set = this.byKey.get(key);
    if (!set) return undefined;
    const now = Date.now();
    let best: PoolWorker | undefined;
    let bestLoad = Infinity;
    for (const w of set) {
      if (exclude.has(w) || !this.usable(w, now)) continue;
      // Busy workers (all batch slots taken) only when no other is free.
      const load = w.items / w.capacity + (w.batches >= this.opts.batchesPerWorker ? BUSY_PENALTY : 0);
      if (load < bestLoad) {
        best = w;
        bestLoad = load;
      }
    }
    return best;
  }

  /** Takes a batch slot and `items` item slots of the worker. */
  take(w: PoolWorker, items: number): void {
    w.batches++;
    w.items += items;
  }

  /** Gives back what {@link take} took; a draining worker closes with its last call. */
  release(w: PoolWorker, items: number): void {
    w.batches--;
    w.items -= items;
    if (w.draining && w.batches === 0) this.close(w);
    this.notifyFreedAll(w);
  }

  succeeded(w: PoolWorker): void {
    if (w.breaker.succeeded()) this.emit({ type: "restored", endpoint: w.endpoint });
  }

  failed(w: PoolWorker): void {
    const forMs = w.breaker.failed(Date.now());
    if (forMs === undefined) return;
    this.emit({ type: "ejected", endpoint: w.endpoint, forMs });
    // Let the batcher know when the probe may go.
    const t = setTimeout(() => this.notifyFreedAll(w), forMs);
    t.unref();
  }

  /** One round of health checks. */
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
          if (ok) this.notifyFreedAll(w);
        }
      }),
    );
  }

  /** Closes every connection; calls waiting for a slot see `stopped` and end. */
  async stop(): Promise<void> {
    this.isStopped = true;
    this.slots.wakeAll();
    this.freed.complete();
    await Promise.all([...this.workers.values()].map((w) => Promise.resolve().then(() => w.conn.close()).catch(() => undefined)));
    this.workers.clear();
    this.byKey.clear();
  }
}
