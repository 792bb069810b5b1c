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
 * A pull opened for a backlog hands its unused credits back as soon as a message says its
 * consumer has nothing more pending (`Delivery.pending` 0); it stays open until it expires, and a
 * message it still gets takes a credit another pull of its lane holds, or a free one, or waits
 * for one (never naked: it is not delivered again).
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
  /** Its tenant's virtual token counter: the lane shares by counters (see SchedulePolicy). */
  counter?: number;
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
  /** Each delivery as it starts to hold a credit (+1) and as it is settled (-1), by subject. */
  onHeldChange?: (priority: Priority, subject: string, delta: 1 | -1) => void;
  /** Whether a lane has a backlog, at each change (and `false` when it is removed). */
  onBacklogChange?: (lane: GateLane, backlog: boolean) => void;
  scheduler?: SchedulerLike;
  /** Random source of the backoff's jitter, in [0, 1) (tests pass their own). */
  random?: () => number;
}

const DEFAULT_PULL_EXPIRES_MS = 5_000;
/** nats.js refuses pulls that expire in under a second. */
export const DEFAULT_BACKLOG_EXPIRES_MS = 1_000;
/** Backoff of a lane whose pull failed (with jitter). */
export const PULL_RETRY: Backoff = { baseMs: 100, maxMs: 5_000 };
const EQUAL_WEIGHTS: Readonly<Record<Priority, number>> = { high: 1, normal: 1, low: 1 };

interface OpenPull {
  readonly n: number;
  /** Opened for a backlog: its unused credits come back as soon as its lane reports it ran dry. */
  readonly backlog: boolean;
  got: number;
  /** Credits handed back before it ended (its lane ran dry while it stayed open). */
  given: number;
  ended: boolean;
  sub: Subscription | undefined;
}

/** Credits a pull still holds: what it may yet deliver, less what it handed back. */
const charge = (p: OpenPull): number => Math.max(0, p.n - p.got - p.given);

interface LaneRun {
  readonly lane: GateLane;
  requested: number;
  unsettled: number;
  backlog: boolean;
  failures: number;
  blocked: Subscription | undefined;
  removed: boolean;
  readonly pulls: Set<OpenPull>;
  /** The consumer's pending count with the last message it delivered (undefined: not told). */
  pending: number | undefined;
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
    // Messages a pull delivered beyond the credits it still held (it handed them back when its
    // lane ran dry, and the server filled it later): each waits, unsettled and not yet seen by
    // anyone, for a free credit; none is naked, so none is delivered again.
    const overflow: Array<{ r: LaneRun; m: Delivery }> = [];
    const used = (): number => {
      let n = 0;
      for (const r of runs.values()) n += r.requested + r.unsettled;
      return n;
    };
    const nakOverflow = (of?: LaneRun): void => {
      for (let i = overflow.length - 1; i >= 0; i--) {
        if (of !== undefined && overflow[i]!.r !== of) continue;
        overflow.splice(i, 1)[0]!.m.nak();
      }
    };
    const unsettledBy = new Map<Priority, number>();

    const noteUnsettled = (p: Priority, delta: 1 | -1, subject: string): void => {
      const n = (unsettledBy.get(p) ?? 0) + delta;
      unsettledBy.set(p, n);
      // A listener never breaks the flow.
      try {
        opts.onHeldChange?.(p, subject, delta);
      } catch {
        // ignore
      }
      try {
        opts.onUnsettledChange?.(p, n);
      } catch {
        // ignore
      }
    };
    const finishDrain = (): void => {
      if (!draining || closed) return;
      for (const r of runs.values()) if (r.requested > 0 || r.unsettled > 0) return;
      subscriber.complete();
    };
    const setBacklog = (r: LaneRun, backlog: boolean): void => {
      if (r.backlog === backlog) return;
      r.backlog = backlog;
      try {
        opts.onBacklogChange?.(r.lane, backlog);
      } catch {
        // a listener never breaks the flow
      }
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
          // Messages waiting for a credit take the free ones first.
          while (overflow.length > 0 && used() < max) {
            const { r, m } = overflow.shift()!;
            deliver(r, m);
          }
          // Nothing free: no schedule to build (the common case at saturation).
          if (used() >= max) return;
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
              ...(r.lane.counter !== undefined ? { counter: r.lane.counter } : {}),
              ...(r.lane.reserve !== undefined ? { reserve: r.lane.reserve } : {}),
            });
          }
          // Removed lanes still hold credits until what they delivered is settled.
          let removedHeld = 0;
          for (const r of runs.values()) if (r.removed) removedHeld += r.requested + r.unsettled;
          const orders = schedule(states, { ...policy, maxUnsettled: max - removedHeld });
          for (const o of orders) {
            const r = runs.get(o.key);
            if (r) pullOnce(r, o.n, o.backlog);
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
      noteUnsettled(r.lane.priority, -1, d.subject);
      forget(r);
      pump();
      finishDrain();
    };

    /** Ends a pull's bookkeeping once: its unused credits come back. */
    const endPull = (r: LaneRun, p: OpenPull): boolean => {
      if (p.ended) return false;
      r.requested -= charge(p);
      p.ended = true;
      r.pulls.delete(p);
      return true;
    };
    /** Closes a pull early (drain, a removed lane, teardown). */
    const closePull = (r: LaneRun, p: OpenPull): void => {
      if (endPull(r, p)) p.sub?.unsubscribe();
    };

    /** Hands a message that holds a credit to `admit` (or on), or naks it when it is not ours. */
    const deliver = (r: LaneRun, m: Delivery): void => {
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
      noteUnsettled(r.lane.priority, +1, m.subject);
      if (opts.admit) opts.admit(r.lane, d, emit);
      else subscriber.next(d);
    };

    /**
     * A message beyond its pull's credits: it takes one another pull of its lane still holds (the
     * server fills the older pull first), else a free one, else it waits for one.
     */
    const uncharged = (r: LaneRun, m: Delivery): boolean => {
      if (closed || draining || subscriber.closed || r.removed) return true; // naked at once
      for (const q of r.pulls) {
        if (charge(q) === 0) continue;
        q.given++;
        r.requested--;
        return true;
      }
      if (used() < max) return true;
      overflow.push({ r, m });
      return false;
    };

    const pullOnce = (r: LaneRun, n: number, backlog: boolean): void => {
      const wait = backlog ? backlogExpiresMs : expiresMs;
      r.requested += n;
      const p: OpenPull = { n, backlog, got: 0, given: 0, ended: false, sub: undefined };
      r.pulls.add(p);
      const end = (failed: unknown): void => {
        if (!endPull(r, p)) return;
        if (failed === undefined) {
          r.failures = 0;
          // The consumer's pending count says whether more is waiting; without one, a full pull
          // means more is waiting and a short one that the lane ran dry.
          if (!r.removed) setBacklog(r, p.got > 0 && r.pending !== undefined ? r.pending > 0 : p.got >= n);
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
          const charged = charge(p) > 0;
          p.got++;
          if (charged) r.requested--;
          // The consumer's own count of what is left: the last message it had ends the lane's
          // backlog (even while this pull stays open), and one with more behind it starts it. A
          // pull opened for a backlog hands its unused credits back once nothing is left (it
          // stays open until it expires: a message the server gives it meanwhile is kept).
          if (typeof m.pending === "number" && !r.removed) {
            r.pending = m.pending;
            setBacklog(r, m.pending > 0);
          }
          let gaveBack = false;
          if (m.pending === 0) {
            if (p.backlog && charge(p) > 0) {
              r.requested -= charge(p);
              p.given += charge(p);
              gaveBack = true;
            }
          }
          if (charged || uncharged(r, m)) deliver(r, m);
          if (gaveBack) pump();
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
      const r: LaneRun = { lane, requested: 0, unsettled: 0, backlog: false, failures: 0, blocked: undefined, removed: false, pulls: new Set(), seqs: new Set(), pending: undefined };
      runs.set(lane.key, r);
      setBacklog(r, true);
    };
    const control: GateControl = {
      add: (lane) => {
        for (const l of Array.isArray(lane) ? (lane as readonly GateLane[]) : [lane as GateLane]) add(l);
        pump();
      },
      remove: (key) => {
        const r = runs.get(key);
        if (!r || r.removed) return;
        setBacklog(r, false);
        r.removed = true;
        r.blocked?.unsubscribe();
        r.blocked = undefined;
        nakOverflow(r);
        for (const p of [...r.pulls]) closePull(r, p);
        forget(r);
        pump();
      },
      hint: (key, backlog) => {
        const r = runs.get(key);
        if (r && !r.removed) setBacklog(r, backlog);
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
        for (const { m } of overflow) if (m.pulledAtMs <= cutoff) m.working();
        this.schedule(undefined, workingIntervalMs);
      }, workingIntervalMs);
    }

    const drainSub = opts.drain?.subscribe(() => {
      if (draining) return;
      draining = true;
      nakOverflow();
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
      nakOverflow();
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
