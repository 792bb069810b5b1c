/**
 * The credit gate's bookkeeping of each lane while it runs: its open pulls, the credits they and
 * its unsettled deliveries hold, its backlog, failures and held stream sequences.
 */
import type { Subscription } from "rxjs";
import type { GateLane } from "./gate-options.js";

export interface OpenPull {
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
export const charge = (p: OpenPull): number => Math.max(0, p.n - p.got - p.given);

export interface LaneRun {
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

/** A lane's bookkeeping as it joins the gate. */
export const newLaneRun = (lane: GateLane): LaneRun => ({ lane, requested: 0, unsettled: 0, backlog: false, failures: 0, blocked: undefined, removed: false, pulls: new Set(), seqs: new Set(), pending: undefined });
