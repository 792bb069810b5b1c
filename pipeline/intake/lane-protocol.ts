/**
 * The lane protocol: how pipeline processes agree which requests a tenant's lane serves and
 * which the shared consumer of the priority serves, so that each request is served once.
 *
 * A lane of tenant T in priority p is a durable consumer `<prefix>-<p>-lane-<T>` filtered on
 * `infer.req.<p>.<T>.*`. It covers T's requests from stream sequence `start` on, up to `end`
 * once it is closed. The shared consumer `<prefix>-<p>` acknowledges a covered request without
 * serving it (its lane serves it), and serves every other. The states, announced on the core
 * subject `infer.lanes.<p>` and kept in the lane consumer's description:
 *
 * ```
 * pending ── (GATE) ── open start=S ── closing ── (GATE) ── closed start=S end=E ── gone
 * ```
 *
 * While a tenant's lane is `pending` or `closing`, the shared consumer defers the tenant's
 * requests (holds them, with their credits): `start` and `end` are each read from the shared consumer's last
 * delivered sequence one GATE after the announcement, so every request delivered after that read
 * reaches a process that has heard of the lane.
 */
import { TOKEN_RE, type Priority } from "../../proto/wire.js";

export type LaneStage = "pending" | "open" | "closing" | "closed" | "gone";

export interface LaneAnnouncement {
  readonly tenant: string;
  readonly stage: LaneStage;
  /** Who runs the lane's life cycle (creates and closes it). */
  readonly owner: string;
  readonly start?: number;
  readonly end?: number;
}

/** What a process knows of one tenant's lane. */
export interface LaneView {
  readonly stage: LaneStage;
  readonly owner: string;
  readonly start?: number;
  readonly end?: number;
  /** When this process heard of the stage (its clock, ms): a stage that stalls expires. */
  readonly sinceMs: number;
}

/** Subject of lane announcements for one priority, and for all. */
export const laneSubject = (p: Priority): string => `infer.lanes.${p}`;
export const LANE_SUBJECT_ALL = "infer.lanes.*";

export function laneConsumerName(durablePrefix: string, p: Priority, tenant: string): string {
  // Consumer names cannot hold every character a subject token can; odd tenants are hashed.
  const safe = TOKEN_RE.test(tenant) ? tenant : `x${fnv1a(tenant).toString(16)}`;
  return `${durablePrefix}-${p}-lane-${safe}`;
}
export const laneConsumerPrefix = (durablePrefix: string, p: Priority): string => `${durablePrefix}-${p}-lane-`;

function fnv1a(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

const DESC_RE = /^sluice-lane (open|closing|closed) owner=(\S+) start=(\d+)(?: end=(\d+))?$/;

/** The lane consumer's description for a stage (what a process that starts later reads). */
export function describeLane(a: Pick<LaneAnnouncement, "stage" | "owner" | "start" | "end">): string {
  return `sluice-lane ${a.stage} owner=${a.owner} start=${a.start ?? 0}${a.end !== undefined ? ` end=${a.end}` : ""}`;
}

export function parseLaneDescription(tenant: string, d: string | undefined): LaneAnnouncement | undefined {
  const m = DESC_RE.exec(d ?? "");
  if (!m) return undefined;
  return { tenant, stage: m[1] as LaneStage, owner: m[2]!, start: Number(m[3]), ...(m[4] !== undefined ? { end: Number(m[4]) } : {}) };
}

export function encodeAnnouncement(a: LaneAnnouncement): string {
  return JSON.stringify(a);
}

export function decodeAnnouncement(data: Uint8Array): LaneAnnouncement | undefined {
  try {
    const a = JSON.parse(new TextDecoder().decode(data)) as Partial<LaneAnnouncement>;
    if (typeof a.tenant !== "string" || typeof a.owner !== "string") return undefined;
    if (!["pending", "open", "closing", "closed", "gone"].includes(a.stage as string)) return undefined;
    return a as LaneAnnouncement;
  } catch {
    return undefined;
  }
}

/** What the shared consumer does with a tenant's request at stream sequence `seq`. */
export type SharedDecision = "serve" | "skip" | "defer";

export function decideShared(view: LaneView | undefined, seq: number): SharedDecision {
  if (!view || view.stage === "gone") return "serve";
  if (view.stage === "pending" || view.stage === "closing") return "defer";
  const start = view.start ?? Number.POSITIVE_INFINITY;
  if (seq < start) return "serve";
  if (view.stage === "closed" && seq > (view.end ?? 0)) return "serve";
  return "skip";
}

/**
 * What a lane does with a request it delivers: serve it, drop it (not its own: the shared
 * consumer serves it), defer it (closing: its end is not known yet), or drop it as past its end.
 */
export type LaneDecision = "serve" | "drop" | "defer" | "past";

export function decideLane(view: LaneView | undefined, seq: number): LaneDecision {
  if (!view || view.start === undefined || view.stage === "pending" || view.stage === "gone") return "drop";
  if (seq < view.start) return "drop";
  if (view.stage === "closing") return "defer";
  if (view.stage === "closed" && seq > (view.end ?? 0)) return "past";
  return "serve";
}
