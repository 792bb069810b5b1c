/**
 * The intake: a bounded set of consumers per priority, whatever the tenant count.
 *
 * ```
 *                       ┌─ shared <prefix>-<p> (stream order) ── skip covered ─┐
 * INFER_REQ infer.req.p ┤                                                       ├─ credit gate ─▶ pipeline
 *                       └─ lane <prefix>-<p>-lane-<T> (only while T floods) ───┘   (schedule: 8:4:1,
 *                                                                                    equal share per lane)
 * ```
 *
 * Each priority's shared consumer serves every request in stream order, once, with no extra
 * round trip. When one tenant takes more than half of what the shared consumer served lately
 * while it has a backlog, that tenant gets a lane (see lane-protocol.ts): the lane serves the
 * tenant's requests at the lane's fair share, and the shared consumer acknowledges them without
 * serving them, so it reaches the other tenants' requests at once. A lane is closed and deleted
 * once it is drained. At most `maxLanes` lanes per priority exist; with nothing queued, nothing
 * is polled (a check runs only while lanes exist).
 */
import { JetStreamApiError } from "@nats-io/jetstream";
import { nanos, type Subscription as NatsSubscription } from "@nats-io/transport-node";
import { Observable } from "rxjs";
import type { Delivery } from "../../operators/types.js";
import { STREAM_REQUESTS, type Priority } from "../../proto/wire.js";
import { ConsumerPullSource, durableName, JsDelivery } from "./jetstream.js";
import { creditGate } from "./credit-gate.js";
import type { CreditedDelivery } from "./credited-delivery.js";
import { PULL_RETRY, type GateControl, type GateLane } from "./gate-options.js";
import {
  decideLane,
  decideShared,
  decodeAnnouncement,
  encodeAnnouncement,
  LANE_SUBJECT_ALL,
  laneConsumerName,
  laneConsumerPrefix,
  laneSubject,
  parseLaneDescription,
  type LaneAnnouncement,
  type LaneView,
} from "./lane-protocol.js";
import { backoffMs } from "../../operators/support/backoff.js";
import { wantsLane } from "./schedule.js";
import {
  DEFAULT_LANE_GATE_MS,
  DEFAULT_MAX_LANES,
  LANE_CHECK_MS,
  LANE_EXPIRE_MS,
  LANE_PEER_WINDOW_MS,
  LANE_STAGE_TTL_MS,
  SHARED_COST,
  type LaneIntakeOptions,
} from "./lane-options.js";
import { closeLane as closeLaneStages, keyOf, openLane as openLaneStages, type LaneStages } from "./lane-stages.js";
import { RecentTenants } from "./recent-tenants.js";
import { ParkedRequests } from "./parked-requests.js";

/** Where requests wait out the quiet time after a reconnect. */
const QUIET_KEY = "";
const tenantOf = (subject: string): string => subject.split(".")[3] ?? "";

export function laneIntake(o: LaneIntakeOptions): Observable<Delivery> {
  const c = o.consumer;
  const me = Math.random().toString(36).slice(2, 10) + Date.now().toString(36);
  const gateMs = o.gateMs ?? DEFAULT_LANE_GATE_MS;
  const maxLanes = o.maxLanes ?? DEFAULT_MAX_LANES;
  // A flood is recognised over the last eighth of the credits' worth of requests, so few of its
  // requests hold credits of the shared consumer when its lane opens.
  const window = Math.max(16, Math.floor(o.maxUnsettled / 8));
  const minBacklog = Math.max(16, Math.floor(o.maxUnsettled));

  return new Observable<Delivery>((subscriber) => {
    let closed = false;
    let ctl: GateControl | undefined;
    const views = new Map<string, LaneView & { tenant: string; p: Priority }>();
    const inGate = new Set<string>();
    const busy = new Set<string>(); // lanes this process is creating or closing
    const timers = new Set<NodeJS.Timeout>();
    let quietUntil = 0;
    let announcements: NatsSubscription | undefined;
    let checkTimer: NodeJS.Timeout | undefined;
    // The tenants of the last `window` requests each shared consumer served.
    const recent = new Map<Priority, RecentTenants>(o.priorities.map((p) => [p, new RecentTenants(window)]));

    const sleep = (ms: number): Promise<void> =>
      new Promise((r) => {
        const t = setTimeout(() => {
          timers.delete(t);
          r();
        }, ms);
        timers.add(t);
      });
    const lanesOf = (p: Priority): number => [...views.values()].filter((v) => v.p === p && v.stage !== "gone").length;
    const report = (p: Priority, a: LaneAnnouncement): void => {
      try {
        o.onLane?.(p, a);
      } catch {
        // a listener never breaks the flow
      }
    };
    const pullError = (p: Priority, err: unknown): void => {
      try {
        o.onPullError?.(p, err);
      } catch {
        // ignore
      }
    };

    /**
     * Serves (or stops serving) a lane in the gate to match what is known of it. A closing lane
     * keeps its pull open (it defers what it delivers until its end is known): a pull closed then
     * would lose a request the server was handing to it, which the lane's end covers and the
     * shared consumer therefore skips, until the lane's ack wait brought it back.
     */
    const syncGate = async (p: Priority, tenant: string): Promise<void> => {
      const k = keyOf(p, tenant);
      const v = views.get(k);
      const serve = v !== undefined && (v.stage === "open" || v.stage === "closing" || v.stage === "closed");
      if (!serve) {
        if (inGate.delete(k)) ctl?.remove(k);
        return;
      }
      if (inGate.has(k) || !ctl) return;
      inGate.add(k);
      try {
        const consumer = await o.js.consumers.get(STREAM_REQUESTS, laneConsumerName(c.durablePrefix, p, tenant));
        if (closed || !inGate.has(k)) return;
        const fair = o.fairShare;
        const lane = { key: k, priority: p, source: new ConsumerPullSource(consumer, { termReason: o.termReason === true }) };
        ctl.add(
          fair
            ? Object.defineProperties(lane, {
                cost: { get: () => fair.expectedCost(tenant), enumerable: true },
                counter: { get: () => fair.tokensOf(tenant), enumerable: true },
              })
            : lane,
        );
      } catch (err) {
        inGate.delete(k);
        pullError(p, err);
      }
    };

    const apply = (p: Priority, a: LaneAnnouncement): void => {
      const k = keyOf(p, a.tenant);
      const have = views.get(k);
      // Two processes starting the same stage at once: the smaller id goes on, the other stops.
      if (have && have.stage === a.stage && (a.stage === "pending" || a.stage === "closing") && have.owner < a.owner) return;
      if (a.stage === "gone") views.delete(k);
      else views.set(k, { p, tenant: a.tenant, stage: a.stage, owner: a.owner, sinceMs: Date.now(), ...(a.start !== undefined ? { start: a.start } : {}), ...(a.end !== undefined ? { end: a.end } : {}) });
      report(p, a);
      void syncGate(p, a.tenant);
      unpark(k);
      ensureCheck();
    };
    const announce = async (p: Priority, a: LaneAnnouncement): Promise<void> => {
      apply(p, a);
      o.nc.publish(laneSubject(p), encodeAnnouncement(a));
      await o.nc.flush();
    };

    /** A stage another process left half-done expires: pending is forgotten, closing reverts to open. */
    const viewOf = (p: Priority, tenant: string): LaneView | undefined => {
      const k = keyOf(p, tenant);
      const v = views.get(k);
      if (!v || busy.has(k)) return v;
      if ((v.stage === "pending" || v.stage === "closing") && Date.now() - v.sinceMs > LANE_STAGE_TTL_MS) {
        if (v.stage === "pending") views.delete(k);
        else views.set(k, { ...v, stage: "open", sinceMs: Date.now() });
        void syncGate(p, tenant);
        return views.get(k);
      }
      return v;
    };

    const stages: LaneStages = { o, me, gateMs, busy, view: (k) => views.get(k), announce, sleep, isClosed: () => closed, pullError };
    const openLane = (p: Priority, tenant: string): Promise<void> => openLaneStages(stages, p, tenant);
    const closeLane = (p: Priority, tenant: string, start: number): Promise<void> => closeLaneStages(stages, p, tenant, start);

    const sharedBacklog = async (p: Priority): Promise<number> => (await o.jsm.consumers.info(STREAM_REQUESTS, durableName(c, p))).num_pending;

    /** Closes drained lanes and deletes finished ones. Runs only while lanes exist. */
    const check = async (): Promise<void> => {
      for (const k of parked.keys()) unpark(k);
      for (const v of [...views.values()]) {
        if (closed) return;
        const k = keyOf(v.p, v.tenant);
        if (busy.has(k)) continue;
        viewOf(v.p, v.tenant);
        const now = views.get(k);
        if (!now || (now.stage !== "open" && now.stage !== "closed")) continue;
        try {
          const info = await o.jsm.consumers.info(STREAM_REQUESTS, laneConsumerName(c.durablePrefix, v.p, v.tenant));
          // A drained lane closes once the shared consumer has no backlog either (a quiet
          // tenant's lane stays while a flood is queued, so its next request is served at once).
          if (now.stage === "open" && info.num_pending === 0 && info.num_ack_pending === 0 && (await sharedBacklog(v.p)) < minBacklog) await closeLane(v.p, v.tenant, now.start ?? 0);
          else if (now.stage === "closed" && info.num_ack_pending === 0 && (info.num_pending === 0 || info.delivered.stream_seq >= (now.end ?? 0))) {
            busy.add(k);
            try {
              // Nobody pulls it once it is gone: the server deletes it (the pipeline needs no
              // right to delete consumers).
              await o.jsm.consumers.update(STREAM_REQUESTS, info.name, { inactive_threshold: nanos(LANE_EXPIRE_MS) });
              await announce(v.p, { tenant: v.tenant, stage: "gone", owner: me });
            } finally {
              busy.delete(k);
            }
          }
        } catch (err) {
          if (err instanceof JetStreamApiError && views.get(k)?.stage === "closed") await announce(v.p, { tenant: v.tenant, stage: "gone", owner: me }).catch(() => undefined);
          else pullError(v.p, err);
        }
      }
    };
    const ensureCheck = (): void => {
      if (checkTimer || closed || (views.size === 0 && parked.size === 0)) return;
      checkTimer = setTimeout(() => {
        void check()
          .catch(() => undefined)
          .finally(() => {
            checkTimer = undefined;
            ensureCheck();
          });
      }, LANE_CHECK_MS);
      checkTimer.unref();
    };

    const noteServed = (p: Priority, d: CreditedDelivery, tenant: string): void => {
      const r = recent.get(p)!;
      const now = Date.now();
      const n = r.note(tenant, now);
      const backlog = d.source instanceof JsDelivery ? d.source.msg.info.pending : 0;
      const k = keyOf(p, tenant);
      if (n * 2 <= window || views.has(k) || busy.has(k)) return;
      const peers = r.servedWithin(now, LANE_PEER_WINDOW_MS);
      const othersActive = peers.some((t) => t !== tenant);
      if (wantsLane({ tenantCount: n, window, windowFull: r.windowFull, backlog, minBacklog, lanes: lanesOf(p), maxLanes, othersActive })) {
        void openLane(p, tenant);
        // The tenants served lately get lanes too (as many as the cap leaves): their next
        // requests are served from their lanes at once instead of behind the flood.
        let room = maxLanes - lanesOf(p) - 1;
        for (const t of peers) {
          if (room <= 0) break;
          const kt = keyOf(p, t);
          if (t === tenant || views.has(kt) || busy.has(kt)) continue;
          room--;
          void openLane(p, t);
        }
      }
    };

    // Requests waiting for a lane's stage to settle (pending, closing): they keep their credit,
    // so the consumer stops pulling instead of deferring request after request.
    const parked = new ParkedRequests(o.fairShare);
    let emitFn: ((d: CreditedDelivery) => void) | undefined;

    const decide = (lane: GateLane, d: CreditedDelivery): void => {
      const p = lane.priority;
      const shared = lane.key === p;
      const tenant = shared ? tenantOf(d.subject) : lane.key.slice(p.length + 1);
      if (shared && Date.now() < quietUntil) {
        // Held (with its credit) until the quiet time after a reconnect is over.
        park(QUIET_KEY, lane, d, tenant);
        return;
      }
      const view = viewOf(p, tenant);
      const decision = shared ? decideShared(view, d.seq) : decideLane(view, d.seq);
      if (decision === "serve") {
        if (shared) noteServed(p, d, tenant);
        emitFn?.(d);
      } else if (decision === "defer") park(keyOf(p, tenant), lane, d, tenant);
      else d.ack(); // skip (its lane serves it), drop or past (the shared consumer serves it)
    };
    function park(k: string, lane: GateLane, d: CreditedDelivery, tenant: string): void {
      parked.park(k, { lane, d, tenant });
      ensureCheck();
    }
    /** Decides again for the requests parked on a tenant's lane stage. */
    const unpark = (k: string): void => parked.unpark(k, decide);
    const laneBacklog = (lane: GateLane, backlog: boolean): void => {
      if (lane.key === lane.priority) return; // the shared consumer stands for no one tenant
      const tenant = lane.key.slice(lane.priority.length + 1);
      if (backlog) o.fairShare?.hold(tenant);
      else o.fairShare?.release(tenant);
    };
    const admit = (lane: GateLane, d: CreditedDelivery, emit: (d: CreditedDelivery) => void): void => {
      emitFn = emit;
      decide(lane, d);
    };

    const gate = creditGate({
      maxUnsettled: o.maxUnsettled,
      weights: o.weights,
      expiresMs: o.expiresMs,
      workingIntervalMs: o.workingIntervalMs,
      admit,
      control: (x) => {
        ctl = x;
      },
      ...(o.drain ? { drain: o.drain } : {}),
      onPullError: (lane, err) => pullError(lane.priority, err),
      ...(o.onUnsettledChange ? { onUnsettledChange: o.onUnsettledChange } : {}),
      ...(o.onHeldChange ? { onHeldChange: o.onHeldChange } : {}),
      // A tenant's lane with a backlog keeps the tenant active for the fair share.
      ...(o.fairShare ? { onBacklogChange: (lane: GateLane, backlog: boolean) => laneBacklog(lane, backlog) } : {}),
    });
    const inner = gate.subscribe(subscriber);
    const drainSub = o.drain?.subscribe(() => parked.nakAll());

    /** Lanes from before (this or another process), then the shared consumers. */
    const startUp = async (): Promise<void> => {
      announcements ??= o.nc.subscribe(LANE_SUBJECT_ALL, {
        callback: (err, m) => {
          if (err || closed) return;
          const p = m.subject.split(".")[2] as Priority;
          const a = decodeAnnouncement(m.data);
          // (Its own announcements were applied when made.)
          if (a && a.owner !== me && o.priorities.includes(p)) apply(p, a);
        },
      });
      await o.nc.flush();
      await loadLanes();
      // The shared consumers of every priority join the gate together, so the first schedule
      // shares the credits between them by weight.
      const sharedLanes: GateLane[] = [];
      for (const p of o.priorities) {
        if (closed) return;
        const consumer = await o.js.consumers.get(STREAM_REQUESTS, durableName(c, p));
        // The shared consumer serves every tenant without a lane: it weighs as two lanes.
        const fair = o.fairShare;
        const shared = { key: p, priority: p, cost: SHARED_COST, source: new ConsumerPullSource(consumer, { termReason: o.termReason === true }) };
        const laned = (): Set<string> => new Set([...inGate].filter((k) => k.startsWith(`${p}/`)).map((k) => k.slice(p.length + 1)));
        sharedLanes.push(fair ? Object.defineProperty(shared, "cost", { get: () => SHARED_COST * fair.expectedCostExcept(laned()), enumerable: true }) : shared);
      }
      ctl?.add(sharedLanes);
    };
    const loadLanes = async (): Promise<void> => {
      for await (const ci of o.jsm.consumers.list(STREAM_REQUESTS)) {
        const p = o.priorities.find((x) => ci.name.startsWith(laneConsumerPrefix(c.durablePrefix, x)));
        const tenant = ci.config.filter_subject?.split(".")[3];
        if (!p || !tenant) continue;
        const a = parseLaneDescription(tenant, ci.config.description);
        if (a && !views.has(keyOf(p, tenant))) apply(p, a);
      }
    };
    const start = (failures: number): void => {
      startUp().catch((err: unknown) => {
        if (closed) return;
        pullError(o.priorities[0] ?? "normal", err);
        const t = setTimeout(() => start(failures + 1), backoffMs(failures, PULL_RETRY));
        t.unref();
        timers.add(t);
      });
    };
    start(0);

    // Announcements may be missed while disconnected: hold the shared consumers' requests until
    // any stage begun meanwhile has finished or expired, and read the lanes again.
    const status = o.nc.status();
    void (async () => {
      for await (const s of status) {
        if (closed) return;
        if (s.type === "reconnect") {
          quietUntil = Date.now() + LANE_STAGE_TTL_MS;
          void loadLanes().catch((err: unknown) => pullError(o.priorities[0] ?? "normal", err));
        }
      }
    })().catch(() => undefined);

    return () => {
      closed = true;
      inner.unsubscribe();
      drainSub?.unsubscribe();
      announcements?.unsubscribe();
      if (checkTimer) clearTimeout(checkTimer);
      for (const t of timers) clearTimeout(t);
    };
  });
}
