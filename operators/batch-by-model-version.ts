import { asyncScheduler, Observable, Subscription, type OperatorFunction, type SchedulerLike } from "rxjs";
import type { Batch, RoutedJob } from "./types.js";

/** How one model@version batches: read when a batch opens, so a registry change applies to the next batch. */
export interface BatchSettings {
  /** Close the batch when it holds this many jobs (at least 1). */
  readonly maxSize: number;
  /** Close the batch this long after its first job (ms); 0 closes it at the end of the turn. */
  readonly maxDelayMs: number;
}

export interface BatchByModelVersionOptions {
  /** Settings for a key `<model>@<version>`. */
  settings(key: string): BatchSettings;
  /** True when a worker of the key could start a batch now: then the batch does not wait. */
  hasIdleCapacity?(key: string): boolean;
  /**
   * Emits a key when a worker of that key gets free capacity: its open batch is flushed at once
   * (with `holdWhileBusy`: the most urgent open batch whose worker can take it, as one worker may
   * serve several keys).
   */
  capacityFreed$?: Observable<string>;
  /**
   * Runs the batch timers (default `asyncScheduler`). When given, it also runs the end-of-turn
   * flush (as a 0 ms action), so virtual-time tests see every batch.
   */
  scheduler?: SchedulerLike;
  /** Clock for `Batch.closedAtMs` (default the scheduler's clock). */
  now?: () => number;
  /**
   * Form batches only when a worker can take them: while every worker of the key is busy, jobs
   * stay here (past `maxSize`), and each time capacity frees the next batch is chosen from them
   * fairly: higher priority first, then one job per tenant in turn, so one tenant's burst does not
   * fill every batch ahead of another tenant's trickle. Needs `hasIdleCapacity` and
   * `capacityFreed$`.
   */
  holdWhileBusy?: boolean;
}

/**
 * Runs `work` at the end of this turn of the event loop, after the I/O callbacks already queued
 * (every message of one socket read joins the batch), and much sooner than a 0 ms timer, which
 * Node runs no earlier than 1 ms later: that millisecond is paid by every request at low load.
 */
function atEndOfTurn(work: () => void): Subscription {
  const handle = setImmediate(work);
  return new Subscription(() => clearImmediate(handle));
}

/** Longest delay a timer can be set to (setTimeout's limit); longer ones would fire at once. */
const MAX_TIMER_MS = 2_147_483_647;

/** The batch being filled for one key. */
interface OpenBatch {
  readonly model: string;
  readonly version: string;
  readonly key: string;
  readonly maxSize: number;
  jobs: RoutedJob[];
  timer: Subscription | undefined;
  idleFlush: Subscription | undefined;
}

/**
 * Groups jobs into batches per `<model>@<version>`. A batch closes when it reaches `maxSize`,
 * `maxDelayMs` after its first job, or without waiting when the key's worker has idle
 * capacity: at the end of the current turn if `hasIdleCapacity(key)` is true when a job
 * arrives (so jobs that arrive together ride one batch), or at once when `capacityFreed$`
 * emits the key. Jobs in a batch are ordered by deadline, earliest first, those without a
 * deadline last. Never emits an empty batch; on completion flushes what is open.
 *
 * ```
 * source (a, b, c for one key; maxSize 2, maxDelayMs 3):  -a-b----c------|
 * batchByModelVersion(opts):                              ---X-------Y---|   X = [a, b], Y = [c]
 * ```
 *
 * @example
 * routed$.pipe(
 *   batchByModelVersion({
 *     settings: (key) => registry.batchSettings(key),
 *     hasIdleCapacity: (key) => pool.hasIdleCapacity(key),
 *     capacityFreed$: pool.capacityFreed$,
 *   }),
 * );
 */
export function batchByModelVersion(opts: BatchByModelVersionOptions): OperatorFunction<RoutedJob, Batch> {
  const scheduler = opts.scheduler ?? asyncScheduler;
  const endOfTurn = opts.scheduler ? (work: () => void): Subscription => scheduler.schedule(work, 0) : atEndOfTurn;
  const now = opts.now ?? (() => scheduler.now());

  return (source) =>
    new Observable<Batch>((subscriber) => {
      const open = new Map<string, OpenBatch>();

      const cancelTimers = (b: OpenBatch): void => {
        b.timer?.unsubscribe();
        b.idleFlush?.unsubscribe();
        b.timer = undefined;
        b.idleFlush = undefined;
      };

      const hold = opts.holdWhileBusy === true;
      const idle = (key: string): boolean => opts.hasIdleCapacity?.(key) === true;

      const flush = (b: OpenBatch): void => {
        // A late timer of a batch that already closed finds another (or no) batch under the key.
        if (open.get(b.key) !== b) return;
        cancelTimers(b);
        if (hold && b.jobs.length > b.maxSize) {
          // More waiting than one batch holds: take a fair share, keep the rest for the next slot.
          const { taken, rest } = takeFair(b.jobs, b.maxSize);
          b.jobs = rest;
          subscriber.next({ model: b.model, version: b.version, key: b.key, jobs: sortByDeadline(taken), closedAtMs: now() });
          if (idle(b.key)) b.idleFlush = endOfTurn(() => guard(() => flush(b)));
          return;
        }
        open.delete(b.key);
        if (b.jobs.length === 0) return;
        subscriber.next({
          model: b.model,
          version: b.version,
          key: b.key,
          jobs: sortByDeadline(b.jobs),
          closedAtMs: now(),
        });
      };

      /** Size and delay close a batch only when a worker can take it (in hold mode). */
      const flushIfTaken = (b: OpenBatch): void => {
        if (hold && !idle(b.key)) return;
        flush(b);
      };

      /**
       * Flushes, most urgent first, the open batches whose worker can take one now, until none
       * can: urgency is the best priority among a batch's jobs, then how long its oldest job of
       * that priority has waited.
       */
      const flushMostUrgent = (): void => {
        for (;;) {
          let best: OpenBatch | undefined;
          let bestUrgency: Urgency | undefined;
          for (const b of open.values()) {
            if (b.jobs.length === 0 || !idle(b.key)) continue;
            const u = urgencyOf(b.jobs);
            if (!bestUrgency || u.rank < bestUrgency.rank || (u.rank === bestUrgency.rank && u.since < bestUrgency.since)) {
              best = b;
              bestUrgency = u;
            }
          }
          if (!best) return;
          const before = best.jobs.length;
          flush(best);
          // A batch that took nothing (it cannot happen, but a loop must not spin) ends it.
          if (open.get(best.key) === best && best.jobs.length === before) return;
        }
      };

      const clearAll = (): void => {
        for (const b of open.values()) cancelTimers(b);
        open.clear();
      };

      /** Clears the timers before the error goes out, so no batch can follow it. */
      const fail = (err: unknown): void => {
        clearAll();
        subscriber.error(err);
      };

      /** A throwing settings(), hasIdleCapacity() or now() fails the stream, as a throwing projection does in map. */
      const guard = (work: () => void): void => {
        try {
          work();
        } catch (err) {
          fail(err);
        }
      };

      const openBatch = (job: RoutedJob, key: string): OpenBatch => {
        const s = opts.settings(key);
        const b: OpenBatch = {
          model: job.model,
          version: job.version,
          key,
          maxSize: Number.isFinite(s.maxSize) ? Math.max(1, Math.floor(s.maxSize)) : Number.POSITIVE_INFINITY,
          jobs: [],
          timer: undefined,
          idleFlush: undefined,
        };
        open.set(key, b);
        // The window opens at the first job; an infinite delay leaves only size and capacity to close it.
        if (s.maxDelayMs !== Number.POSITIVE_INFINITY) {
          const delay = Math.min(MAX_TIMER_MS, Math.max(0, s.maxDelayMs || 0));
          b.timer = scheduler.schedule(() => guard(() => flushIfTaken(b)), delay);
        }
        return b;
      };

      let freedSub: Subscription | undefined;
      if (opts.capacityFreed$ !== undefined) {
        freedSub = opts.capacityFreed$.subscribe({
          next: (key) =>
            guard(() => {
              if (hold) {
                // One worker may serve several keys: its free slot goes to the most urgent of
                // the batches that could use it, not to whichever key was named first.
                flushMostUrgent();
                return;
              }
              const b = open.get(key);
              if (b !== undefined && b.jobs.length > 0) flush(b);
            }),
          error: fail,
        });
      }

      // capacityFreed$ failed synchronously: the error is already delivered.
      if (subscriber.closed) return () => freedSub?.unsubscribe();

      const sourceSub = source.subscribe({
        next: (job) =>
          guard(() => {
            const key = batchKey(job.model, job.version);
            const b = open.get(key) ?? openBatch(job, key);
            b.jobs.push(job);
            if (b.jobs.length >= b.maxSize) {
              flushIfTaken(b);
            } else if (b.idleFlush === undefined && opts.hasIdleCapacity?.(key) === true) {
              // Delay 0: jobs that arrive in this same turn still join before the batch leaves.
              b.idleFlush = endOfTurn(() => guard(() => flush(b)));
            }
          }),
        error: fail,
        complete: () =>
          guard(() => {
            for (const b of [...open.values()]) while (open.get(b.key) === b) flush(b);
            subscriber.complete();
          }),
      });

      return () => {
        sourceSub.unsubscribe();
        freedSub?.unsubscribe();
        clearAll();
      };
    });
}

/** The key of a model version: `<model>@<version>`. */
export function batchKey(model: string, version: string): string {
  return `${model}@${version}`;
}

/** Earliest deadline first, jobs without a deadline last; otherwise arrival order (sort is stable). */
function sortByDeadline(jobs: readonly RoutedJob[]): RoutedJob[] {
  return [...jobs].sort((a, b) => {
    const da = a.deadlineMs ?? Number.POSITIVE_INFINITY;
    const db = b.deadlineMs ?? Number.POSITIVE_INFINITY;
    return da === db ? 0 : da < db ? -1 : 1;
  });
}

const RANK: Record<string, number> = { high: 0, normal: 1, low: 2 };

interface Urgency {
  /** Best priority rank among the jobs (0 = high). */
  rank: number;
  /** When the oldest job of that rank was stored (epoch ms). */
  since: number;
}

function urgencyOf(jobs: readonly RoutedJob[]): Urgency {
  let rank = Number.POSITIVE_INFINITY;
  let since = Number.POSITIVE_INFINITY;
  for (const j of jobs) {
    const r = RANK[j.priority] ?? 1;
    const at = j.delivery.storedAtMs;
    if (r < rank) {
      rank = r;
      since = at;
    } else if (r === rank && at < since) since = at;
  }
  return { rank, since };
}

/**
 * Picks `n` jobs: higher priority first; within a priority, one job per tenant in turn (tenants
 * in the order their oldest job arrived), each tenant's jobs in arrival order.
 */
function takeFair(jobs: readonly RoutedJob[], n: number): { taken: RoutedJob[]; rest: RoutedJob[] } {
  const byRank = new Map<number, Map<string, RoutedJob[]>>();
  for (const j of jobs) {
    const r = RANK[j.priority] ?? 1;
    let tenants = byRank.get(r);
    if (!tenants) byRank.set(r, (tenants = new Map()));
    let list = tenants.get(j.tenant);
    if (!list) tenants.set(j.tenant, (list = []));
    list.push(j);
  }
  const chosen = new Set<RoutedJob>();
  for (const r of [...byRank.keys()].sort((a, b) => a - b)) {
    const queues = [...byRank.get(r)!.values()];
    for (let i = 0; chosen.size < n && queues.some((q) => i < q.length); i++) {
      for (const q of queues) {
        if (chosen.size >= n) break;
        const j = q[i];
        if (j) chosen.add(j);
      }
    }
    if (chosen.size >= n) break;
  }
  return { taken: jobs.filter((j) => chosen.has(j)), rest: jobs.filter((j) => !chosen.has(j)) };
}
