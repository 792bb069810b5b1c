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
import { asyncScheduler, Observable, type Subscription } from "rxjs";
import type { Delivery } from "../../operators/types.js";
import type { Priority } from "../../proto/wire.js";
import { backoffMs } from "../../operators/support/backoff.js";
import { schedule, type LaneState } from "./schedule.js";
import { CreditedDelivery } from "./credited-delivery.js";
import { charge, newLaneRun, type LaneRun, type OpenPull } from "./lane-run.js";
import { DEFAULT_BACKLOG_EXPIRES_MS, DEFAULT_PULL_EXPIRES_MS, EQUAL_WEIGHTS, PULL_RETRY, type CreditGateOptions, type GateControl, type GateLane } from "./gate-options.js";

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
      const r = newLaneRun(lane);
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
