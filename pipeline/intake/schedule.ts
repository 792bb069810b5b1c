/**
 * The intake's scheduling policy as a pure function: given the credits and what each pull source
 * (a lane) holds and whether it has a backlog, which lanes to pull from and how many messages
 * to ask for. No timers, no I/O: {@link schedule} is called by the credit gate each time credits
 * are freed or a pull ends.
 *
 * Fair share, in two levels:
 * 1. **Priorities** share the credits by weight (8:4:1 by default) among the priorities that have
 *    a backlog; a priority without one keeps a small reserve (its next request is taken at once)
 *    and lends the rest of its share.
 * 2. **Lanes of one priority** (one per tenant, or one shared lane) share the priority's credits
 *    equally *by cost*: a lane whose requests cost more (an estimated token count, say) gets
 *    proportionally fewer of them. The cost of a request is 1 unless the caller says otherwise.
 *    Lanes that carry their tenant's virtual token counter share their part instead by the
 *    counters: each credit to the lane whose tenant was given the fewest tokens (token-order.ts),
 *    so the tokens *given* even out, however long each lane's requests take to finish.
 *
 * No lane with a backlog is starved: each gets at least one credit once any are free, and
 * credits nobody's share can use are lent to the busy lane furthest below its share. (Lanes with
 * counters: the lowest counter goes first; credits it cannot take yet, its pull still open, wait
 * for it rather than go to a tenant ahead of it.)
 */
import type { Priority } from "../../proto/wire.js";
import { byLowestCounter } from "./token-order.js";

/** What the gate knows of one lane when it asks for a schedule. */
export interface LaneState {
  readonly key: string;
  readonly priority: Priority;
  /** Credits out in pulls that have not ended. */
  readonly requested: number;
  /** Messages delivered and not settled yet. */
  readonly unsettled: number;
  /** More is known to wait (its last pull came back full, or a hint says so). */
  readonly backlog: boolean;
  /** Cannot be pulled now (backing off after a failed pull). */
  readonly blocked?: boolean;
  /** Estimated cost of one of its requests (default 1; > 0). */
  readonly cost?: number;
  /** Keeps a reserve pull open while it has no backlog (default true). */
  readonly reserve?: boolean;
  /**
   * Tokens its tenant was given so far (a virtual token counter). Lanes of a priority that have
   * one share their part of its credits by the counters, lowest first (token-order.ts), instead
   * of equally by cost.
   */
  readonly counter?: number;
}

export interface SchedulePolicy {
  /** The bound on requested + unsettled over all lanes. */
  readonly maxUnsettled: number;
  /** Relative share of each priority under backlog. */
  readonly weights: Readonly<Record<Priority, number>>;
  /**
   * A lane without a backlog keeps this fraction of its priority's share as its reserve (at
   * least one credit); default 1/8.
   */
  readonly reserveFraction?: number;
  /**
   * With a pull of its own outstanding, a lane is pulled again only for at least this fraction
   * of its share (fewer, larger pulls); default 1/4.
   */
  readonly minPullFraction?: number;
}

/** One pull to open. `backlog`: it is expected to fill at once (a short expiry suits it). */
export interface PullOrder {
  readonly key: string;
  readonly n: number;
  readonly backlog: boolean;
}

const DEFAULT_RESERVE_FRACTION = 1 / 8;
const DEFAULT_MIN_PULL_FRACTION = 1 / 4;

const held = (l: LaneState): number => l.requested + l.unsettled;
const hasCounter = (l: LaneState): boolean => l.counter !== undefined && Number.isFinite(l.counter);
const costOf = (l: LaneState): number => (l.cost !== undefined && l.cost > 0 && Number.isFinite(l.cost) ? l.cost : 1);

/** The pulls to open now; empty when no credit is free or no lane can use one. */
export function schedule(lanes: readonly LaneState[], policy: SchedulePolicy): PullOrder[] {
  const max = Math.max(1, Math.floor(policy.maxUnsettled));
  let free = max - lanes.reduce((a, l) => a + held(l), 0);
  if (free <= 0 || lanes.length === 0) return [];
  const reserveFraction = policy.reserveFraction ?? DEFAULT_RESERVE_FRACTION;
  const minPullFraction = policy.minPullFraction ?? DEFAULT_MIN_PULL_FRACTION;
  const weight = (p: Priority): number => Math.max(0, policy.weights[p] ?? 1);
  const out: PullOrder[] = [];
  const pulled = new Set<string>();
  const open = (l: LaneState, n: number, backlog: boolean): void => {
    const take = Math.min(n, free);
    if (take <= 0) return;
    free -= take;
    pulled.add(l.key);
    out.push({ key: l.key, n: take, backlog });
  };

  // Shares of the priorities present, by weight (all weights 0: equal shares).
  const present = [...new Set(lanes.map((l) => l.priority))];
  const totalW = present.reduce((a, p) => a + weight(p), 0);
  const shareOfPriority = (p: Priority, among: readonly Priority[], pool: number): number => {
    const w = among.reduce((a, q) => a + weight(q), 0);
    return w > 0 ? (pool * weight(p)) / w : pool / among.length;
  };
  const lanesOf = (p: Priority): LaneState[] => lanes.filter((l) => l.priority === p);

  // 1. Reserves: a lane without a backlog keeps a small pull open, so its next request is taken
  //    the moment it is stored.
  for (const l of lanes) {
    if (free <= 0) break;
    if (l.backlog || l.blocked === true || l.reserve === false || l.requested > 0) continue;
    const prioShare = totalW > 0 ? (max * weight(l.priority)) / totalW : max / present.length;
    const want = Math.max(1, Math.floor((prioShare * reserveFraction) / lanesOf(l.priority).length));
    open(l, want, false);
  }
  if (free <= 0) return out;

  // 2. Shares: what idle lanes do not hold goes to the lanes with a backlog, by priority weight,
  //    then equally by cost inside a priority; the lane furthest below its share first.
  const busy = lanes.filter((l) => l.backlog && l.blocked !== true);
  if (busy.length === 0) return out;
  const pool = max - lanes.filter((l) => !l.backlog).reduce((a, l) => a + held(l), 0);
  const busyPriorities = [...new Set(busy.map((l) => l.priority))];
  const targets = new Map<string, number>();
  for (const p of busyPriorities) {
    const share = shareOfPriority(p, busyPriorities, pool);
    const mine = busy.filter((l) => l.priority === p);
    // Equal cost per lane: a lane's share in messages is inversely proportional to its cost.
    const inv = mine.reduce((a, l) => a + 1 / costOf(l), 0);
    for (const l of mine) targets.set(l.key, (share * (1 / costOf(l))) / inv);
  }
  // Lanes with a token counter share their part of the priority's share by the counters (see
  // token-order.ts): the one whose tenant was given the fewest tokens first. The others (the
  // shared consumer) keep their share by cost.
  type Claim = { l: LaneState; target: number; deficit: number };
  type Group = { lanes: LaneState[]; deficit: number };
  const claims: Claim[] = busy.filter((l) => !hasCounter(l)).map((l) => ({ l, target: targets.get(l.key)!, deficit: targets.get(l.key)! - held(l) }));
  const groups: Group[] = [];
  for (const p of busyPriorities) {
    const vtc = busy.filter((l) => l.priority === p && hasCounter(l));
    if (vtc.length > 0) groups.push({ lanes: vtc, deficit: vtc.reduce((a, l) => a + targets.get(l.key)! - held(l), 0) });
  }
  const order = [...claims.map((c) => ({ deficit: c.deficit, c, g: undefined })), ...groups.map((g) => ({ deficit: g.deficit, c: undefined, g }))].sort((a, b) => b.deficit - a.deficit);
  const minPull = (l: LaneState): number => Math.max(1, Math.floor(targets.get(l.key)! * minPullFraction));
  const givenNow = new Map<string, number>();
  /**
   * Hands `credits` to a group by its counters. A lane with a pull open takes its part only when
   * it makes a pull worth opening; otherwise its part stays free (not given to a lane whose
   * tenant is ahead of it): it is taken once its pull ends.
   */
  const byCounters = (g: Group, credits: number): void => {
    const given = byLowestCounter(
      g.lanes.map((l) => ({ key: l.key, counter: l.counter!, cost: costOf(l), requested: l.requested + (givenNow.get(l.key) ?? 0) })),
      credits,
    );
    g.lanes.forEach((l, i) => {
      const n = given[i]!;
      if (n <= 0 || (l.requested > 0 && n < minPull(l))) return;
      open(l, n, true);
      givenNow.set(l.key, (givenNow.get(l.key) ?? 0) + n);
    });
  };
  for (const { c, g } of order) {
    if (free <= 0) break;
    if (c) {
      const { l, deficit } = c;
      const n = Math.max(held(l) === 0 ? 1 : 0, Math.floor(deficit));
      if (n > 0 && !(l.requested > 0 && n < minPull(l))) open(l, n, true);
    } else {
      // A group with a lane holding nothing asks for a credit at least (as a lane does above).
      const n = Math.min(free, Math.max(g.lanes.some((l) => held(l) === 0) ? 1 : 0, Math.floor(g.deficit)));
      if (n > 0) byCounters(g, n);
    }
  }

  // 3. Leftovers (rounding, or shares a lane cannot use yet): lend them to the busy lane with the
  //    largest deficit that has no pull of its own open, so no credit idles under a backlog; a
  //    lane with a pull open takes them only when they make a pull worth opening. A group with
  //    token counters takes them by its counters.
  if (free > 0) {
    const worth = (d: Claim): boolean => free >= Math.max(1, Math.floor(max / 8), Math.floor(d.target * minPullFraction));
    if (groups.length === 0) {
      const lend = claims.find(({ l }) => l.requested === 0 && !pulled.has(l.key)) ?? claims.find((d) => !pulled.has(d.l.key) && worth(d));
      if (lend) open(lend.l, free, true);
    } else {
      for (const { c, g } of order) {
        if (free <= 0) break;
        if (g) byCounters(g, free);
        else if (!pulled.has(c.l.key) && (c.l.requested === 0 || worth(c))) open(c.l, free, true);
      }
    }
  }
  return mergeOrders(out);
}

/** One order per lane (a lane given a reserve and a share in one call pulls once). */
function mergeOrders(orders: PullOrder[]): PullOrder[] {
  const by = new Map<string, PullOrder>();
  for (const o of orders) {
    const have = by.get(o.key);
    by.set(o.key, have ? { key: o.key, n: have.n + o.n, backlog: have.backlog || o.backlog } : o);
  }
  return [...by.values()];
}

/**
 * Whether a tenant seen on a priority's shared consumer should get a lane of its own: the shared
 * consumer has a backlog of at least `minBacklog` behind this request, and the tenant took more
 * than half of the last `window` requests it served (its burst stands in front of the others).
 * Two tenants with equal bursts share the stream order fairly and get no lane, and so does a
 * tenant alone in its priority (no other tenant served lately): its lane would only add a
 * delivery per request.
 */
export function wantsLane(o: {
  tenantCount: number;
  window: number;
  windowFull: boolean;
  backlog: number;
  minBacklog: number;
  lanes: number;
  maxLanes: number;
  /** Another tenant of the priority was served lately: a lone tenant's lane would only cost. */
  othersActive: boolean;
}): boolean {
  return o.othersActive && o.windowFull && o.backlog >= o.minBacklog && o.tenantCount * 2 > o.window && o.lanes < o.maxLanes;
}
