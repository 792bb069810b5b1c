/**
 * What the tenant lanes of the intake are given (the options of `laneIntake`, the token fair share
 * as they use it) and their tunables.
 */
import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import type { Observable } from "rxjs";
import type { Priority } from "../../proto/wire.js";
import type { ConsumerSettings } from "../config.js";
import type { LaneAnnouncement } from "./lane-protocol.js";

export interface LaneIntakeOptions {
  nc: NatsConnection;
  js: JetStreamClient;
  jsm: JetStreamManager;
  termReason?: boolean;
  consumer: ConsumerSettings;
  priorities: readonly Priority[];
  weights: Record<Priority, number>;
  maxUnsettled: number;
  expiresMs: number;
  workingIntervalMs: number;
  /** Lanes per priority at most (default {@link DEFAULT_MAX_LANES}). */
  maxLanes?: number;
  /** Time for an announcement to reach every process (default {@link DEFAULT_LANE_GATE_MS}). */
  gateMs?: number;
  drain?: Observable<unknown>;
  onPullError?: (priority: Priority, err: unknown) => void;
  onUnsettledChange?: (priority: Priority, unsettled: number) => void;
  /** See the credit gate's `onHeldChange`. */
  onHeldChange?: (priority: Priority, subject: string, delta: 1 | -1) => void;
  /** Hears each lane stage this process announces or hears (tests, logs). */
  onLane?: (p: Priority, a: LaneAnnouncement) => void;
  /**
   * Costs in tokens (the token-weighted fair share): a tenant's lane costs what its requests are
   * expected to cost; the shared consumer what the requests of the tenants without a lane do
   * (times {@link SHARED_COST}). Without it every request costs the same.
   */
  fairShare?: LaneFairShare;
}

/**
 * The token fair share as the intake uses it (TokenFairShare): costs, each tenant's virtual token
 * counter (its lane gets credits by it), and what keeps a tenant active (a lane with a backlog,
 * a request held while a lane's stage settles).
 */
export interface LaneFairShare {
  expectedCost(tenant: string): number;
  expectedCostExcept(tenants: ReadonlySet<string>): number;
  tokensOf(tenant: string): number;
  hold(tenant: string): void;
  release(tenant: string): void;
}

export const DEFAULT_MAX_LANES = 16;
/** How long an announcement may take to reach every pipeline process. */
export const DEFAULT_LANE_GATE_MS = 50;
/** A lane stage that waits on another process longer than this is given up (that process died). */
export const LANE_STAGE_TTL_MS = 5_000;
/** A finished lane is deleted by the server once nobody has pulled it for this long. */
export const LANE_EXPIRE_MS = 2_000;
/** How often lanes are checked for being drained, while any exist. */
export const LANE_CHECK_MS = 500;
/** Cost of a shared consumer's request against a lane's (1): it gets twice a lane's share. */
export const SHARED_COST = 0.5;
/** A flood gets a lane only when another tenant of its priority was served this recently. */
export const LANE_PEER_WINDOW_MS = 30_000;
/** Tenants remembered per priority for that (the most recent ones). */
export const PEERS_REMEMBERED = 64;
