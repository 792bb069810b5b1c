/**
 * What the credit gate is given: its lanes, the control it hands out while it runs, its options,
 * and its default tunables.
 */
import type { Observable, SchedulerLike } from "rxjs";
import type { Priority } from "../../proto/wire.js";
import type { Backoff } from "../../operators/support/backoff.js";
import type { CreditedDelivery } from "./credited-delivery.js";
import type { PullSource } from "./pull-source.js";

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

export const DEFAULT_PULL_EXPIRES_MS = 5_000;
/** nats.js refuses pulls that expire in under a second. */
export const DEFAULT_BACKLOG_EXPIRES_MS = 1_000;
/** Backoff of a lane whose pull failed (with jitter). */
export const PULL_RETRY: Backoff = { baseMs: 100, maxMs: 5_000 };
export const EQUAL_WEIGHTS: Readonly<Record<Priority, number>> = { high: 1, normal: 1, low: 1 };
