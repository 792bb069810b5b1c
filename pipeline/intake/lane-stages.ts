/**
 * The stages this process takes a tenant's lane through (see lane-protocol.ts): opening (pending,
 * then open) and closing (closing, then closed with its end). Each stage is announced first and
 * waits out the gate time, in which another process that starts the same stage wins if its id is
 * smaller; a stage that takes too long is given up.
 */
import { STREAM_REQUESTS, type Priority } from "../../proto/wire.js";
import { durableName } from "./jetstream.js";
import { laneConsumerConfig } from "./lane-consumer.js";
import { LANE_STAGE_TTL_MS, type LaneIntakeOptions } from "./lane-options.js";
import { describeLane, laneConsumerName, type LaneAnnouncement, type LaneView } from "./lane-protocol.js";

/** The key of a tenant's lane, in the gate and in what is known of the lanes. */
export const keyOf = (p: Priority, tenant: string): string => `${p}/${tenant}`;

/** What the stages use of the intake that runs them. */
export interface LaneStages {
  readonly o: LaneIntakeOptions;
  /** This process's id in announcements. */
  readonly me: string;
  /** Time for an announcement to reach every process. */
  readonly gateMs: number;
  /** Lanes this process is creating or closing. */
  readonly busy: Set<string>;
  /** What is known of the lane of a key. */
  view(k: string): LaneView | undefined;
  /** Applies an announcement here and publishes it to the other processes. */
  announce(p: Priority, a: LaneAnnouncement): Promise<void>;
  sleep(ms: number): Promise<void>;
  isClosed(): boolean;
  pullError(p: Priority, err: unknown): void;
}

/** Opens `tenant`'s lane: pending, then open at the next sequence the shared consumer delivers. */
export async function openLane(s: LaneStages, p: Priority, tenant: string): Promise<void> {
  const { o, me, busy } = s;
  const c = o.consumer;
  const k = keyOf(p, tenant);
  busy.add(k);
  const t0 = Date.now();
  try {
    await s.announce(p, { tenant, stage: "pending", owner: me });
    await s.sleep(s.gateMs);
    const v = s.view(k);
    if (s.isClosed() || !v || v.stage !== "pending" || v.owner !== me) return; // another process opens it
    const shared = await o.jsm.consumers.info(STREAM_REQUESTS, durableName(c, p));
    const start = shared.delivered.stream_seq + 1;
    if (Date.now() - t0 > LANE_STAGE_TTL_MS / 2) throw new Error("lane set-up took too long");
    await o.jsm.consumers.add(STREAM_REQUESTS, laneConsumerConfig(c, me, p, tenant, start));
    await s.announce(p, { tenant, stage: "open", owner: me, start });
  } catch (err) {
    s.pullError(p, err);
    if (s.view(k)?.stage === "pending" && s.view(k)?.owner === me) await s.announce(p, { tenant, stage: "gone", owner: me }).catch(() => undefined);
  } finally {
    busy.delete(k);
  }
}

/** Closes `tenant`'s drained lane: closing, then closed with its end (past all either consumer delivered). */
export async function closeLane(s: LaneStages, p: Priority, tenant: string, start: number): Promise<void> {
  const { o, me, busy } = s;
  const c = o.consumer;
  const k = keyOf(p, tenant);
  const name = laneConsumerName(c.durablePrefix, p, tenant);
  busy.add(k);
  const t0 = Date.now();
  try {
    await s.announce(p, { tenant, stage: "closing", owner: me, start });
    await o.jsm.consumers.update(STREAM_REQUESTS, name, { description: describeLane({ stage: "closing", owner: me, start }) });
    await s.sleep(s.gateMs);
    const v = s.view(k);
    if (s.isClosed() || !v || v.stage !== "closing" || v.owner !== me) return; // another process closes it
    // Its end: past everything either consumer delivered (lane requests delivered from now
    // on are deferred until the end is known).
    const shared = await o.jsm.consumers.info(STREAM_REQUESTS, durableName(c, p));
    const lane = await o.jsm.consumers.info(STREAM_REQUESTS, name);
    const end = Math.max(shared.delivered.stream_seq, lane.delivered.stream_seq);
    if (Date.now() - t0 > LANE_STAGE_TTL_MS / 2) {
      await s.announce(p, { tenant, stage: "open", owner: me, start });
      return;
    }
    await o.jsm.consumers.update(STREAM_REQUESTS, name, { description: describeLane({ stage: "closed", owner: me, start, end }) });
    await s.announce(p, { tenant, stage: "closed", owner: me, start, end });
  } catch (err) {
    s.pullError(p, err);
  } finally {
    busy.delete(k);
  }
}
