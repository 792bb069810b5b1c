import { Observable } from "rxjs";
import { CreditedDelivery, DEFAULT_PULL_EXPIRES_MS, type PullBatch, type PullSource } from "./pull-with-credits.js";
import type { Delivery } from "./types.js";
import { backoffMs, type Backoff } from "./support/backoff.js";

/** One priority class: its queue and its weight. */
export interface PriorityClass {
  readonly name: string;
  readonly source: PullSource;
  /** Share of the credits under backlog, relative to the other classes' weights. */
  readonly weight: number;
}

export interface PullByPriorityOptions {
  /** The bound shared by all classes: never more than this many delivered and unsettled. */
  maxUnsettled: number;
  /** How long a pull waits on an idle queue. */
  expiresMs?: number;
  /** How long a pull for a class with a backlog waits before it gives back unused credits. */
  backlogExpiresMs?: number;
  /** Held messages older than this are reported `working()`; 0 turns it off. */
  workingIntervalMs?: number;
  drain?: Observable<unknown>;
  onPullError?: (cls: string, err: unknown) => void;
  onUnsettledChange?: (cls: string, unsettled: number) => void;
}

const PULL_RETRY: Backoff = { baseMs: 100, maxMs: 5_000 };
// nats.js refuses pulls that expire in under a second.
const DEFAULT_BACKLOG_EXPIRES_MS = 1_000;

interface ClassState {
  readonly cls: PriorityClass;
  requested: number;
  unsettled: number;
  /** The last pull came back full: there is more waiting. */
  backlog: boolean;
  failures: number;
  retryTimer: NodeJS.Timeout | undefined;
  readonly pulls: Set<PullBatch<Delivery>>;
}

/**
 * Bounded demand over several priority classes that share one credit pool. Under backlog the
 * credits are split by weight among the classes that have messages (8:4:1 pulls eight high for
 * each low); a class without a backlog keeps a small pull open (its reserve), so its next
 * message is taken at once, and lends the rest of its share to the busy classes. No class is
 * starved: each class with a backlog always gets at least one credit.
 *
 * ```
 * high:   h1 ------ h2 ----------          (trickle: served at once from its reserve)
 * low:    l1 l2 l3 l4 l5 l6 l7 l8 …        (backlog: takes what high does not use)
 * output: h1 l1 l2 l3 h2 l4 l5 …
 * ```
 */
export function pullByPriority(classes: readonly PriorityClass[], opts: PullByPriorityOptions): Observable<Delivery> {
  const max = Math.max(classes.length, Math.floor(opts.maxUnsettled));
  const expiresMs = opts.expiresMs ?? DEFAULT_PULL_EXPIRES_MS;
  const backlogExpiresMs = Math.min(expiresMs, opts.backlogExpiresMs ?? DEFAULT_BACKLOG_EXPIRES_MS);
  const totalWeight = classes.reduce((a, c) => a + Math.max(0, c.weight), 0) || classes.length;
  const weightOf = (c: PriorityClass): number => (totalWeight > 0 ? Math.max(0, c.weight) : 1);
  /** Credits a class keeps pulling with while it has no backlog. */
  const reserveOf = (c: PriorityClass): number => Math.max(1, Math.floor((max * weightOf(c)) / totalWeight / 8));

  return new Observable<Delivery>((subscriber) => {
    let closed = false;
    let draining = false;
    const states = classes.map((cls): ClassState => ({ cls, requested: 0, unsettled: 0, backlog: true, failures: 0, retryTimer: undefined, pulls: new Set() }));
    const held = new Set<CreditedDelivery>();
    const heldSeqs = new Map<string, Set<number>>(classes.map((c) => [c.name, new Set<number>()]));

    const used = (): number => states.reduce((a, s) => a + s.requested + s.unsettled, 0);
    const changed = (s: ClassState): void => {
      try {
        opts.onUnsettledChange?.(s.cls.name, s.unsettled);
      } catch {
        // a listener never breaks the flow
      }
    };
    const finishDrain = (): void => {
      if (draining && !closed && states.every((s) => s.requested === 0 && s.unsettled === 0)) subscriber.complete();
    };

    const pump = (): void => {
      if (closed || draining) return;
      let free = max - used();
      if (free <= 0) return;
      // 1. Reserves: a class with no backlog keeps a small pull open, so its next message
      //    is taken the moment it arrives.
      for (const s of states) {
        if (free <= 0) break;
        if (s.backlog || s.retryTimer !== undefined) continue;
        const want = reserveOf(s.cls) - s.requested;
        if (want > 0 && s.requested === 0) {
          const take = Math.min(want, free);
          free -= take;
          void pullOnce(s, take, expiresMs);
        }
      }
      if (free <= 0) return;
      // 2. Shares: what is left goes to the classes with a backlog, by weight, the class
      //    furthest below its share first.
      const busy = states.filter((s) => s.backlog && s.retryTimer === undefined);
      if (busy.length === 0) return;
      const idleHolding = states.filter((s) => !s.backlog).reduce((a, s) => a + s.requested + s.unsettled, 0);
      const pool = max - idleHolding;
      const busyWeight = busy.reduce((a, s) => a + weightOf(s.cls), 0) || busy.length;
      const deficits = busy
        .map((s) => ({ s, deficit: (pool * (weightOf(s.cls) || 1)) / busyWeight - (s.requested + s.unsettled) }))
        .sort((a, b) => b.deficit - a.deficit);
      for (const { s, deficit } of deficits) {
        if (free <= 0) break;
        // Small pulls only when nothing of the class is outstanding (fewer, larger pulls).
        const share = Math.floor(deficit);
        const minPull = Math.max(1, Math.floor((pool * (weightOf(s.cls) || 1)) / busyWeight / 4));
        if (share <= 0) continue;
        if (s.requested > 0 && share < minPull) continue;
        const take = Math.min(share, free);
        free -= take;
        void pullOnce(s, take, backlogExpiresMs);
      }
      // 3. Rounding leftovers, or shares the busy classes cannot use: lend to the heaviest
      //    busy class so no credit sits idle while there is a backlog.
      if (free > 0) {
        const s = busy.reduce((a, b) => (weightOf(b.cls) > weightOf(a.cls) ? b : a));
        if (s.requested === 0 || free >= Math.max(1, Math.floor(max / 8))) void pullOnce(s, free, backlogExpiresMs);
      }
    };

    const release = (s: ClassState, d: CreditedDelivery): void => {
      held.delete(d);
      heldSeqs.get(s.cls.name)?.delete(d.seq);
      s.unsettled--;
      changed(s);
      pump();
      finishDrain();
    };

    const pullOnce = async (s: ClassState, n: number, wait: number): Promise<void> => {
      s.requested += n;
      let got = 0;
      let batch: PullBatch<Delivery> | undefined;
      let failed = false;
      try {
        batch = await s.cls.source.pull(n, wait);
        if (closed) {
          await batch.close();
          return;
        }
        s.pulls.add(batch);
        if (draining) void batch.close().catch(() => undefined);
        const seqs = heldSeqs.get(s.cls.name)!;
        for await (const m of batch) {
          got++;
          s.requested--;
          if (closed || draining || subscriber.closed) {
            m.nak();
            continue;
          }
          if (seqs.has(m.seq)) continue;
          const d = new CreditedDelivery(m, (x) => release(s, x));
          held.add(d);
          seqs.add(m.seq);
          s.unsettled++;
          changed(s);
          subscriber.next(d);
        }
        s.failures = 0;
      } catch (err) {
        failed = true;
        s.failures++;
        if (!closed) {
          try {
            opts.onPullError?.(s.cls.name, err);
          } catch {
            // ignore
          }
          const wait = backoffMs(s.failures - 1, PULL_RETRY);
          if (s.retryTimer === undefined) {
            s.retryTimer = setTimeout(() => {
              s.retryTimer = undefined;
              pump();
            }, wait);
            s.retryTimer.unref?.();
          }
        }
      } finally {
        s.requested -= n - got;
        if (batch) s.pulls.delete(batch);
        // A full pull means more is waiting; a short one means the queue ran dry.
        if (!failed) s.backlog = got >= n;
      }
      pump();
      finishDrain();
    };

    let workingTimer: NodeJS.Timeout | undefined;
    const workingIntervalMs = opts.workingIntervalMs ?? 0;
    if (workingIntervalMs > 0) {
      workingTimer = setInterval(() => {
        const cutoff = Date.now() - workingIntervalMs;
        for (const d of held) if (d.pulledAtMs <= cutoff) d.working();
      }, workingIntervalMs);
      workingTimer.unref?.();
    }

    const drainSub = opts.drain?.subscribe(() => {
      if (draining) return;
      draining = true;
      for (const s of states) {
        if (s.retryTimer !== undefined) clearTimeout(s.retryTimer);
        s.retryTimer = undefined;
        for (const p of s.pulls) void p.close().catch(() => undefined);
      }
      finishDrain();
    });

    pump();

    return () => {
      closed = true;
      drainSub?.unsubscribe();
      if (workingTimer !== undefined) clearInterval(workingTimer);
      for (const s of states) {
        if (s.retryTimer !== undefined) clearTimeout(s.retryTimer);
        for (const p of s.pulls) void p.close().catch(() => undefined);
        s.pulls.clear();
      }
    };
  });
}
