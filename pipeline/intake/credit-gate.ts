/**
 * The credit gate: the one place that bounds how much the pipeline pulls. Every pull source of
 * the intake (the shared consumer of a priority, a tenant's lane, a test's scripted queue) is a
 * lane of a gate; the gate keeps `requested + unsettled <= maxUnsettled` over all of them, asks
 * the {@link schedule} policy where the free credits go, and hands each credit back when its
 * delivery is settled (acked, naked or termed, once).
 *
 * ```
 * lane a:  a1 a2 a3 a4 …        (backlog)
 * lane b:  ---- b1 ------ b2    (trickle: served from its reserve)
 * credits: 3
 * output:  a1 a2 b1 (a1 acked) a3 (a2 acked) b2 …
 * ```
 *
 * A pull is an Observable (subscribe opens it, unsubscribe closes it), and every timer runs on
 * the given scheduler, so the gate runs in virtual time under RxJS's TestScheduler. A failed pull
 * blocks its lane for a backoff; the gate itself never errors. When `drain` emits, open pulls are
 * closed and the gate completes once everything it delivered has been settled.
 */
import { asyncScheduler, Observable, type SchedulerLike, type Subscription } from "rxjs";
import type { Delivery } from "../../operators/types.js";
import type { Priority } from "../../proto/wire.js";
import { backoffMs, type Backoff } from "../../operators/support/backoff.js";
import { WrappedDelivery } from "../../operators/support/wrapped-delivery.js";
import { schedule, type LaneState } from "./schedule.js";

/** Where messages come from. A pull emits up to `max` messages and completes when it ends. */
export interface PullSource {
  pull(max: number, expiresMs: number): Observable<Delivery>;
}

export interface GateLane {
  readonly key: string;
  readonly priority: Priority;
  readonly source: PullSource;
  /** Estimated cost of one of its requests, for the fair share (default 1). */
  cost?: number;
  /** Keeps a reserve pull open while idle (default true). */
  readonly reserve?: boolean;
}

/** Adds and removes lanes while the gate runs, and tells it what it cannot see itself. */
export interface GateControl {
  /** Adds lanes; several given at once are scheduled together (none takes every credit first). */
  add(lane: GateLane | readonly GateLane[]): void;
  /** Stops pulling from a lane; it leaves once what it delivered is settled. */
  remove(key: string): void;
  /** The lane is known to have work waiting (or not). */
  hint(key: string, backlog: boolean): void;
  /** What a lane holds now (requested + unsettled); 0 for an unknown lane. */
  holding(key: string): number;
  /** Re-runs the schedule (after hints). */
  kick(): void;
}

export interface CreditGateOptions {
  /** Lanes from the start. */
  lanes?: readonly GateLane[];
  /** Called once per subscription with the control; its return is called at teardown. */
  control?: (ctl: GateControl) => (() => void) | void;
  /** The bound: never more than this many requested and unsettled. */
  maxUnsettled: number;
  weights?: Readonly<Record<Priority, number>>;
  /** Reserve of an idle lane, as a fraction of its share (see SchedulePolicy). */
  reserveFraction?: number;
  minPullFraction?: number;
  /** How long a pull waits on an idle lane. */
  expiresMs?: number;
  /** How long a pull for a lane with a backlog waits before it gives back unused credits. */
  backlogExpiresMs?: number;
  /** Held deliveries older than this are reported `working()`; 0 turns it off. */
  workingIntervalMs?: number;
  /**
   * Sees each delivery (holding its credit) before it is emitted, and decides: `emit(d)` now or
   * later, or settle it instead (acknowledged as served by another lane, say), which returns the
   * credit. Without it every delivery is emitted at once.
   */
  admit?: (lane: GateLane, d: CreditedDelivery, emit: (d: CreditedDelivery) => void) => void;
  drain?: Observable<unknown>;
  onPullError?: (lane: GateLane, err: unknown) => void;
  /** Unsettled deliveries per priority, at each change. */
  onUnsettledChange?: (priority: Priority, unsettled: number) => void;
  scheduler?: SchedulerLike;
  /** Random source of the backoff's jitter, in [0, 1) (tests pass their own). */
  random?: () => number;
}

const DEFAULT_PULL_EXPIRES_MS = 5_000;
/** nats.js refuses pulls that expire in under a second. */
const DEFAULT_BACKLOG_EXPIRES_MS = 1_000;
/** Backoff of a lane whose pull failed (with jitter). */
export const PULL_RETRY: Backoff = { baseMs: 100, maxMs: 5_000 };
const EQUAL_WEIGHTS: Readonly<Record<Priority, number>> = { high: 1, normal: 1, low: 1 };

interface OpenPull {
  readonly n: number;
  got: number;
  ended: boolean;
  sub: Subscription | undefined;
}

interface LaneRun {
  readonly lane: GateLane;
  requested: number;
  unsettled: number;
  backlog: boolean;
  failures: number;
  blocked: Subscription | undefined;
  removed: boolean;
  readonly pulls: Set<OpenPull>;
  /** Stream sequences held: a redelivery of a message still being worked on is dropped. */
  readonly seqs: Set<number>;
}

export function creditGate(opts: CreditGateOptions): Observable<Delivery> {
  const max = Math.max(1, Math.floor(opts.maxUnsettled));
  const scheduler = opts.scheduler ?? asyncScheduler;
  const expiresMs = opts.expiresMs ?? DEFAULT_PULL_EXPIRES_MS;
  const backlogExpiresMs = Math.min(expiresMs, opts.backlogExpiresMs ?? DEFAULT_BACKLOG_EXPIRES_MS);
  const policy = {
    maxUnsettled: max,
    weights: opts.weights ?? EQUAL_WEIGHTS,
    ...(opts.reserveFraction !== undefined ? { reserveFraction: opts.reserveFraction } : {}),
    ...(opts.minPullFraction !== undefined ? { minPullFraction: opts.minPullFraction } : {}),
  };

  return new Observable<Delivery>((subscriber) => {
    let closed = false;
    let draining = false;
    const runs = new Map<string, LaneRun>();
    const held = new Set<CreditedDelivery>();
    const unsettledBy = new Map<Priority, number>();

    const noteUnsettled = (p: Priority, delta: number): void => {
      const n = (unsettledBy.get(p) ?? 0) + delta;
      unsettledBy.set(p, n);
      try {
        opts.onUnsettledChange?.(p, n);
      } catch {
        // a listener never breaks the flow
      }
    };
    const finishDrain = (): void => {
      if (!draining || closed) return;
      for (const r of runs.values()) if (r.requested > 0 || r.unsettled > 0) return;
      subscriber.complete();
    };
    const forget = (r: LaneRun): void => {
      if (r.removed && r.requested === 0 && r.unsettled === 0 && runs.get(r.lane.key) === r) runs.delete(r.lane.key);
    };

    // The pump is re-entrant safe: a pull that delivers synchronously (a test's queue) settles
    // and pumps again inside `pump`; that turn is folded into the running one.
    let pumping = false;
    let again = false;
    const pump = (): void => {
      if (pumping) {
        again = true;
        return;
      }
      pumping = true;
      try {
        do {
          again = false;
          if (closed || draining) return;
          // Nothing free: no schedule to build (the common case at saturation).
          let used = 0;
          for (const r of runs.values()) used += r.requested + r.unsettled;
          if (used >= max) return;
          const states: LaneState[] = [];
          for (const r of runs.values()) {
            if (r.removed) continue;
            states.push({
              key: r.lane.key,
              priority: r.lane.priority,
              requested: r.requested,
              unsettled: r.unsettled,
              backlog: r.backlog,
              blocked: r.blocked !== undefined,
              ...(r.lane.cost !== undefined ? { cost: r.lane.cost } : {}),
              ...(r.lane.reserve !== undefined ? { reserve: r.lane.reserve } : {}),
            });
          }
          // Removed lanes still hold credits until what they delivered is settled.
          let removedHeld = 0;
          for (const r of runs.values()) if (r.removed) removedHeld += r.requested + r.unsettled;
          const orders = schedule(states, { ...policy, maxUnsettled: max - removedHeld });
          for (const o of orders) {
            const r = runs.get(o.key);
            if (r) pullOnce(r, o.n, o.backlog ? backlogExpiresMs : expiresMs);
          }
        } while (again);
      } finally {
        pumping = false;
      }
    };

    const emit = (d: CreditedDelivery): void => {
      if (!d.settled && !subscriber.closed) subscriber.next(d);
    };

    const release = (r: LaneRun, d: CreditedDelivery): void => {
      held.delete(d);
      r.seqs.delete(d.seq);
      r.unsettled--;
      noteUnsettled(r.lane.priority, -1);
      forget(r);
      pump();
      finishDrain();
    };

    /** Ends a pull's bookkeeping once: its unused credits come back. */
    const endPull = (r: LaneRun, p: OpenPull): boolean => {
      if (p.ended) return false;
      p.ended = true;
      r.requested -= p.n - p.got;
      r.pulls.delete(p);
      return true;
    };
    /** Closes a pull early (drain, a removed lane, teardown). */
    const closePull = (r: LaneRun, p: OpenPull): void => {
      if (endPull(r, p)) p.sub?.unsubscribe();
    };

    const pullOnce = (r: LaneRun, n: number, wait: number): void => {
      r.requested += n;
      const p: OpenPull = { n, got: 0, ended: false, sub: undefined };
      r.pulls.add(p);
      const end = (failed: unknown): void => {
        if (!endPull(r, p)) return;
        if (failed === undefined) {
          r.failures = 0;
          // A full pull means more is waiting; a short one means the lane ran dry.
          r.backlog = p.got >= n;
        } else if (!closed) {
          r.failures++;
          try {
            opts.onPullError?.(r.lane, failed);
          } catch {
            // ignore
          }
          const backoff = backoffMs(r.failures - 1, PULL_RETRY, opts.random);
          r.blocked ??= scheduler.schedule(() => {
            r.blocked = undefined;
            pump();
          }, backoff);
        }
        forget(r);
        pump();
        finishDrain();
      };
      p.sub = r.lane.source.pull(n, wait).subscribe({
        next: (m) => {
          if (p.ended) {
            m.nak();
            return;
          }
          p.got++;
          r.requested--;
          // The last message the consumer had: the lane has no backlog, even while this pull
          // stays open.
          if (m.pending === 0) r.backlog = false;
          if (closed || draining || subscriber.closed || r.removed) {
            // Not ours to process any more: let the queue give it to someone else at once.
            m.nak();
            return;
          }
          if (r.seqs.has(m.seq)) return;
          const d = new CreditedDelivery(m, (x) => release(r, x));
          held.add(d);
          r.seqs.add(m.seq);
          r.unsettled++;
          noteUnsettled(r.lane.priority, +1);
          if (opts.admit) opts.admit(r.lane, d, emit);
          else subscriber.next(d);
        },
        error: (err: unknown) => end(err ?? new Error("pull failed")),
        complete: () => end(undefined),
      });
      if (p.ended) p.sub.unsubscribe();
    };

    const add = (lane: GateLane): void => {
      const have = runs.get(lane.key);
      if (have && !have.removed) return;
      if (have) for (const p of [...have.pulls]) closePull(have, p);
      runs.set(lane.key, { lane, requested: 0, unsettled: 0, backlog: true, failures: 0, blocked: undefined, removed: false, pulls: new Set(), seqs: new Set() });
    };
    const control: GateControl = {
      add: (lane) => {
        for (const l of Array.isArray(lane) ? (lane as readonly GateLane[]) : [lane as GateLane]) add(l);
        pump();
      },
      remove: (key) => {
        const r = runs.get(key);
        if (!r || r.removed) return;
        r.removed = true;
        r.blocked?.unsubscribe();
        r.blocked = undefined;
        for (const p of [...r.pulls]) closePull(r, p);
        forget(r);
        pump();
      },
      hint: (key, backlog) => {
        const r = runs.get(key);
        if (r && !r.removed) r.backlog = backlog;
      },
      holding: (key) => {
        const r = runs.get(key);
        return r ? r.requested + r.unsettled : 0;
      },
      kick: pump,
    };
    for (const l of opts.lanes ?? []) add(l);

    let working: Subscription | undefined;
    const workingIntervalMs = opts.workingIntervalMs ?? 0;
    if (workingIntervalMs > 0) {
      working = scheduler.schedule(function (this: { schedule(state?: unknown, delay?: number): void }) {
        const cutoff = scheduler.now() - workingIntervalMs;
        for (const d of held) if (d.pulledAtMs <= cutoff) d.working();
        this.schedule(undefined, workingIntervalMs);
      }, workingIntervalMs);
    }

    const drainSub = opts.drain?.subscribe(() => {
      if (draining) return;
      draining = true;
      for (const r of runs.values()) {
        r.blocked?.unsubscribe();
        r.blocked = undefined;
        // Closing a pull returns its unused credits.
        for (const p of [...r.pulls]) closePull(r, p);
      }
      finishDrain();
    });
    const stopControl = opts.control?.(control);

    pump();

    return () => {
      closed = true;
      drainSub?.unsubscribe();
      working?.unsubscribe();
      if (typeof stopControl === "function") stopControl();
      for (const r of runs.values()) {
        r.blocked?.unsubscribe();
        for (const p of [...r.pulls]) closePull(r, p);
      }
    };
  });
}

/** A delivery that hands its credit back the first time it is settled. */
export class CreditedDelivery extends WrappedDelivery {
  private done = false;
  constructor(
    inner: Delivery,
    private readonly onSettle: (d: CreditedDelivery, how: "ack" | "nak" | "term") => void,
  ) {
    super(inner);
  }
  /** The delivery as the pull source made it. */
  get source(): Delivery {
    return this.inner;
  }
  get settled(): boolean {
    return this.done;
  }
  private settle(how: "ack" | "nak" | "term", f: () => void): void {
    if (this.done) return;
    this.done = true;
    try {
      f();
    } finally {
      this.onSettle(this, how);
    }
  }
  ack(): void {
    this.settle("ack", () => this.inner.ack());
  }
  nak(delayMs?: number): void {
    this.settle("nak", () => this.inner.nak(delayMs));
  }
  term(reason?: string): void {
    this.settle("term", () => this.inner.term(reason));
  }
  working(): void {
    if (!this.done) this.inner.working();
  }
}

/** One pull as an async iterable (a JetStream fetch, say): what {@link pullFromAsync} adapts. */
export interface AsyncPull extends AsyncIterable<Delivery> {
  close(): Promise<unknown>;
}

/**
 * A {@link PullSource} over pulls that are opened with a promise and read as async iterables.
 * Messages that arrive after the pull was closed are naked (the queue gives them to someone else
 * at once).
 */
export function pullFromAsync(open: (max: number, expiresMs: number) => Promise<AsyncPull>): PullSource {
  return {
    pull: (max, expiresMs) =>
      new Observable<Delivery>((subscriber) => {
        let closed = false;
        let batch: AsyncPull | undefined;
        const run = async (): Promise<void> => {
          batch = await open(max, expiresMs);
          if (closed) {
            await batch.close();
            return;
          }
          for await (const m of batch) {
            if (closed) m.nak();
            else subscriber.next(m);
          }
          subscriber.complete();
        };
        run().catch((err: unknown) => {
          if (!closed) subscriber.error(err);
        });
        return () => {
          closed = true;
          void batch?.close().catch(() => undefined);
        };
      }),
  };
}
