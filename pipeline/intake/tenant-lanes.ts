/**
 * Tenant lanes: fair share between tenants inside a priority.
 *
 * One durable consumer per priority delivers in stream order, so a tenant's burst of 10,000
 * requests stands in front of every request published after it. nats-server before 2.10 takes
 * one filter per consumer and has no priority groups, so fairness is built from consumers:
 *
 * - a **discovery** consumer per priority (`<prefix>-<priority>-lanes`, headers only) sees each
 *   new request, makes sure its tenant has a **lane** (a durable consumer filtered on
 *   `infer.req.<priority>.<tenant>.*`), notes that the lane has work, and acks;
 * - the pipeline pulls from the lanes: credits are split by priority weight among priorities
 *   with work, then evenly among the tenants with work in each (an idle tenant takes nothing), so
 *   a tenant's trickle is pulled within about one batch of its arrival however deep another
 *   tenant's backlog is.
 *
 * A lane created for a new tenant starts at the discovery consumer's ack floor + 1: every
 * request below it was discovered when its lane already existed, so nothing is skipped even when
 * two pipeline processes create the same lane. Requests naked back to a lane (retries, waits)
 * come back without a new discovery, so a lane with naked requests is probed until they return,
 * and every lane's state is checked against the server now and then (another process's naks,
 * a restart).
 */
import {
  AckPolicy,
  DeliverPolicy,
  JetStreamApiError,
  type Consumer,
  type ConsumerConfig,
  type JetStreamClient,
  type JetStreamManager,
} from "@nats-io/jetstream";
import { nanos } from "@nats-io/transport-node";
import { Observable } from "rxjs";
import { CreditedDelivery, type PullBatch } from "../../operators/pull-with-credits.js";
import type { Delivery } from "../../operators/types.js";
import type { Priority } from "../../proto/wire.js";
import { STREAM_REQUESTS, TOKEN_RE } from "../../proto/wire.js";
import type { ConsumerSettings } from "../config.js";
import { ConsumerPullSource } from "./jetstream.js";
import { backoffMs, type Backoff } from "../../operators/support/backoff.js";
import { isJsApiError, JsApiCode } from "../support/jetstream-errors.js";

export interface TenantLanesOptions {
  js: JetStreamClient;
  jsm: JetStreamManager;
  /** The server honours `+TERM <reason>` (see honoursTermReason). */
  termReason?: boolean;
  consumer: ConsumerSettings;
  priorities: readonly Priority[];
  weights: Record<Priority, number>;
  maxUnsettled: number;
  expiresMs: number;
  workingIntervalMs: number;
  /** How often every lane is checked against the server. */
  sweepIntervalMs?: number;
  drain?: Observable<unknown>;
  onPullError?: (priority: Priority, err: unknown) => void;
  onUnsettledChange?: (priority: Priority, unsettled: number) => void;
}

export const DEFAULT_LANE_SWEEP_MS = 5_000;
/** Backoff of a lane or discovery pull that failed. */
const PULL_RETRY: Backoff = { baseMs: 100, maxMs: 5_000 };
const PROBE_EVERY_MS = 1_000;
const DISCOVERY_BATCH = 512;
/**
 * A lane that delivered work this recently keeps a standing pull while it is idle, so the
 * tenant's next request is delivered as soon as it is stored instead of one discovery round trip
 * later (about half a millisecond at low load, on loopback).
 */
export const STANDING_PULL_IDLE_MS = 30_000;
/**
 * Requests one standing pull asks for: it serves that many of a trickle's requests before it is
 * opened again (opening a pull costs more than the rest of a request's way through the pipeline
 * at low load: 3.1 ms against 2.2 ms per request, sequential, with standing pulls of 1 and 8).
 */
const STANDING_PULL_SIZE = 8;
/** Standing pulls take at most this share of the credits: work on other lanes comes first. */
const STANDING_PULL_SHARE = 0.25;

export function discoveryName(c: ConsumerSettings, p: Priority): string {
  return `${c.durablePrefix}-${p}-lanes`;
}

export function laneName(c: ConsumerSettings, p: Priority, tenant: string): string {
  // Consumer names cannot hold every character a subject token can; odd tenants are hashed
  // (their requests are dead-lettered by the decoder anyway, but they must be drained).
  const safe = TOKEN_RE.test(tenant) ? tenant : `x${hash(tenant).toString(16)}`;
  return `${c.durablePrefix}-${p}-t-${safe}`;
}

function hash(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

export function discoveryConfig(c: ConsumerSettings, p: Priority): ConsumerConfig {
  return {
    durable_name: discoveryName(c, p),
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    filter_subject: `infer.req.${p}.*.*`,
    headers_only: true,
    ack_wait: nanos(c.ackWaitMs),
    max_deliver: -1,
    max_ack_pending: Math.max(c.maxAckPending, DISCOVERY_BATCH * 4),
  } as ConsumerConfig;
}

export async function ensureDiscoveryConsumers(jsm: JetStreamManager, c: ConsumerSettings, priorities: readonly Priority[]): Promise<void> {
  for (const p of priorities) {
    const cfg = discoveryConfig(c, p);
    try {
      await jsm.consumers.info(STREAM_REQUESTS, cfg.durable_name!);
    } catch (err) {
      if (!(err instanceof JetStreamApiError)) throw err;
      await jsm.consumers.add(STREAM_REQUESTS, cfg).catch((e: unknown) => {
        if (!isJsApiError(e, JsApiCode.ConsumerAlreadyExists)) throw e;
      });
    }
  }
}

interface Lane {
  readonly p: Priority;
  readonly tenant: string;
  readonly name: string;
  readonly source: ConsumerPullSource;
  /** Requests known to wait in the lane. */
  hint: number;
  /** Requests naked back to the lane and not seen again yet. */
  naked: number;
  nextProbeAt: number;
  requested: number;
  unsettled: number;
  failures: number;
  blockedUntil: number;
  /** When the lane last delivered a request (epoch ms); 0 when never. */
  lastWorkAt: number;
  /** Its pull is a standing pull (see {@link STANDING_PULL_IDLE_MS}). */
  standing: boolean;
  readonly pulls: Set<PullBatch<Delivery>>;
}

export function tenantLaneSource(o: TenantLanesOptions): Observable<Delivery> {
  const c = o.consumer;
  const max = Math.max(o.priorities.length, Math.floor(o.maxUnsettled));
  return new Observable<Delivery>((subscriber) => {
    let closed = false;
    let draining = false;
    const lanes = new Map<string, Lane>();
    const creating = new Map<string, Promise<Lane>>();
    const rr = new Map<Priority, number>();
    const unsettledByPriority = new Map<Priority, number>(o.priorities.map((p) => [p, 0]));
    const held = new Set<CreditedDelivery>();
    const heldSeqs = new Set<number>();
    const discoveries = new Set<PullBatch<unknown> & { close(): Promise<unknown> }>();
    const timers = new Set<NodeJS.Timeout>();

    const later = (ms: number, f: () => void): void => {
      const t = setTimeout(() => {
        timers.delete(t);
        f();
      }, ms);
      t.unref();
      timers.add(t);
    };
    const used = (): number => {
      let n = 0;
      for (const l of lanes.values()) n += l.requested + l.unsettled;
      return n;
    };
    const noteUnsettled = (p: Priority, delta: number): void => {
      const n = (unsettledByPriority.get(p) ?? 0) + delta;
      unsettledByPriority.set(p, n);
      try {
        o.onUnsettledChange?.(p, n);
      } catch {
        // ignore
      }
    };
    const finishDrain = (): void => {
      if (!draining || closed) return;
      for (const l of lanes.values()) if (l.requested > 0 || l.unsettled > 0) return;
      subscriber.complete();
    };
    const wants = (l: Lane, now: number): boolean => l.blockedUntil <= now && (l.hint > 0 || (l.naked > 0 && l.nextProbeAt <= now));

    // Pulls are opened at the end of the turn, once for all the settlements and discoveries of
    // that turn: the requests just delivered reach their worker first, and the lanes are walked
    // once per turn, not once per message.
    let pumpQueued: NodeJS.Immediate | undefined;
    const schedulePump = (): void => {
      if (pumpQueued !== undefined || closed) return;
      pumpQueued = setImmediate(() => {
        pumpQueued = undefined;
        pump();
      });
    };

    const pump = (): void => {
      if (closed || draining) return;
      let free = max - used();
      if (free <= 0) return;
      const now = Date.now();
      const active = o.priorities
        .map((p) => ({ p, lanes: [...lanes.values()].filter((l) => l.p === p && wants(l, now)) }))
        .filter((x) => x.lanes.length > 0);
      if (active.length === 0) {
        standingPulls(free, now);
        return;
      }
      const totalW = active.reduce((a, x) => a + (o.weights[x.p] ?? 1), 0);
      for (const { p, lanes: ls } of active) {
        if (free <= 0) break;
        const heldByP = [...lanes.values()].filter((l) => l.p === p).reduce((a, l) => a + l.requested + l.unsettled, 0);
        // Share of priority p; if it already holds its share, it may still use what others leave.
        let budget = Math.max(1, Math.floor((max * (o.weights[p] ?? 1)) / totalW) - heldByP);
        // Round robin over the tenants with work, from where the last round stopped.
        const start = (rr.get(p) ?? 0) % ls.length;
        const perLane = Math.max(1, Math.floor(budget / ls.length));
        for (let i = 0; i < ls.length && free > 0 && budget > 0; i++) {
          const l = ls[(start + i) % ls.length]!;
          if (l.requested > 0) continue; // one pull at a time per lane
          const want = l.hint > 0 ? Math.min(l.hint, perLane) : 1;
          const take = Math.min(want, free, budget);
          if (take <= 0) continue;
          free -= take;
          budget -= take;
          rr.set(p, (start + i + 1) % ls.length);
          if (l.hint === 0) l.nextProbeAt = now + PROBE_EVERY_MS;
          void pullLane(l, take);
        }
      }
      // Credits left while some lane still has work: hand them out again (lanes below their
      // share were limited by their hint; a busy tenant may take what idle ones leave).
      if (free > 0 && free < max) {
        const more = [...lanes.values()].filter((l) => l.requested === 0 && l.hint > 0 && l.blockedUntil <= now);
        for (const l of more) {
          if (free <= 0) break;
          const take = Math.min(l.hint, free);
          free -= take;
          void pullLane(l, take);
        }
      }
      standingPulls(free, now);
    };

    /** Idle lanes that worked lately wait for their next requests with a small pull of their own. */
    const standingPulls = (free: number, now: number): void => {
      let standingHeld = 0;
      for (const l of lanes.values()) if (l.standing) standingHeld += l.requested;
      let allowed = Math.min(free, Math.floor(max * STANDING_PULL_SHARE) - standingHeld);
      for (const l of lanes.values()) {
        if (allowed <= 0) return;
        if (l.requested > 0 || l.blockedUntil > now || l.lastWorkAt === 0 || now - l.lastWorkAt > STANDING_PULL_IDLE_MS) continue;
        const take = Math.min(allowed, STANDING_PULL_SIZE);
        allowed -= take;
        l.standing = true;
        void pullLane(l, take);
      }
    };

    const release = (l: Lane, d: CreditedDelivery, how: "ack" | "nak" | "term"): void => {
      held.delete(d);
      heldSeqs.delete(d.seq);
      l.unsettled--;
      noteUnsettled(l.p, -1);
      if (how === "nak") {
        // It comes back to the lane without a discovery: probe for it.
        l.naked++;
        l.nextProbeAt = Math.min(l.nextProbeAt || Infinity, Date.now() + PROBE_EVERY_MS);
        later(PROBE_EVERY_MS, pump);
      }
      schedulePump();
      finishDrain();
    };

    const pullLane = async (l: Lane, n: number): Promise<void> => {
      l.requested += n;
      let got = 0;
      let batch: PullBatch<Delivery> | undefined;
      try {
        batch = await l.source.pull(n, Math.min(o.expiresMs, 1_000));
        if (closed) {
          await batch.close();
          return;
        }
        l.pulls.add(batch);
        if (draining) void batch.close().catch(() => undefined);
        for await (const m of batch) {
          got++;
          l.requested--;
          l.lastWorkAt = Date.now();
          if (m.deliveryCount > 1) l.naked = Math.max(0, l.naked - 1);
          else l.hint = Math.max(0, l.hint - 1);
          if (closed || draining || subscriber.closed) {
            m.nak();
            continue;
          }
          if (heldSeqs.has(m.seq)) continue;
          const d = new CreditedDelivery(m, (x, how) => release(l, x, how));
          held.add(d);
          heldSeqs.add(m.seq);
          l.unsettled++;
          noteUnsettled(l.p, +1);
          subscriber.next(d);
        }
        l.failures = 0;
        // A short pull: the lane has no more for now (discoveries will say when it has).
        if (got < n) l.hint = 0;
      } catch (err) {
        l.failures++;
        l.blockedUntil = Date.now() + backoffMs(l.failures - 1, PULL_RETRY);
        later(l.blockedUntil - Date.now(), pump);
        try {
          o.onPullError?.(l.p, err);
        } catch {
          // ignore
        }
      } finally {
        l.requested -= n - got;
        l.standing = false;
        if (batch) l.pulls.delete(batch);
      }
      schedulePump();
      finishDrain();
    };

    const addLane = (p: Priority, tenant: string, name: string, source: ConsumerPullSource, hint: number, naked: number): Lane => {
      const l: Lane = {
        p,
        tenant,
        name,
        source,
        hint,
        naked,
        nextProbeAt: 0,
        requested: 0,
        unsettled: 0,
        failures: 0,
        blockedUntil: 0,
        lastWorkAt: 0,
        standing: false,
        pulls: new Set(),
      };
      lanes.set(`${p}.${tenant}`, l);
      return l;
    };

    const laneConfig = (p: Priority, tenant: string, start: number): ConsumerConfig =>
      ({
        durable_name: laneName(c, p, tenant),
        ack_policy: AckPolicy.Explicit,
        deliver_policy: DeliverPolicy.StartSequence,
        opt_start_seq: start,
        filter_subject: `infer.req.${p}.${tenant}.*`,
        ack_wait: nanos(c.ackWaitMs),
        max_deliver: -1,
        max_ack_pending: c.maxAckPending,
      }) as ConsumerConfig;

    const openLane = async (p: Priority, tenant: string): Promise<Lane> => {
      const name = laneName(c, p, tenant);
      let info;
      try {
        info = await o.jsm.consumers.info(STREAM_REQUESTS, name);
      } catch (err) {
        if (!(err instanceof JetStreamApiError)) throw err;
        const disc = await o.jsm.consumers.info(STREAM_REQUESTS, discoveryName(c, p));
        const start = disc.ack_floor.stream_seq + 1;
        try {
          info = await o.jsm.consumers.add(STREAM_REQUESTS, laneConfig(p, tenant, start));
        } catch (e) {
          if (!(e instanceof JetStreamApiError)) throw e;
          info = await o.jsm.consumers.info(STREAM_REQUESTS, name); // made by another process
        }
      }
      const consumer = await o.js.consumers.get(STREAM_REQUESTS, name);
      return addLane(p, tenant, name, new ConsumerPullSource(consumer, { termReason: o.termReason === true }), 0, info.num_ack_pending);
    };

    const laneFor = (p: Priority, tenant: string): Promise<Lane> => {
      const key = `${p}.${tenant}`;
      const have = lanes.get(key);
      if (have) return Promise.resolve(have);
      let pending = creating.get(key);
      if (!pending) {
        pending = openLane(p, tenant).finally(() => creating.delete(key));
        creating.set(key, pending);
      }
      return pending;
    };

    const discover = async (p: Priority): Promise<void> => {
      let failures = 0;
      let consumer: Consumer | undefined;
      while (!closed && !draining) {
        try {
          // Inside the retry: a broker restart or a missing consumer must not end discovery.
          consumer ??= await o.js.consumers.get(STREAM_REQUESTS, discoveryName(c, p));
          const it = await consumer.fetch({ max_messages: DISCOVERY_BATCH, expires: Math.max(1_000, o.expiresMs) });
          discoveries.add(it);
          try {
            for await (const m of it) {
              const tenant = m.subject.split(".")[3] ?? "";
              try {
                const lane = await laneFor(p, tenant);
                lane.hint++;
                m.ack();
              } catch (err) {
                // Not acked: discovered again later, when the lane can be made.
                m.nak(1_000);
                o.onPullError?.(p, err);
              }
              schedulePump();
            }
          } finally {
            discoveries.delete(it);
          }
          failures = 0;
        } catch (err) {
          if (closed) return;
          failures++;
          try {
            o.onPullError?.(p, err);
          } catch {
            // ignore
          }
          await new Promise((r) => later(backoffMs(failures - 1, PULL_RETRY), () => r(undefined)));
        }
      }
    };

    /** Checks each lane against the server: another process's naks, or what a restart left. */
    const sweep = async (): Promise<void> => {
      for (const l of [...lanes.values()]) {
        if (closed) return;
        try {
          const info = await o.jsm.consumers.info(STREAM_REQUESTS, l.name);
          l.hint = Math.max(l.hint, info.num_pending);
          const elsewhere = info.num_ack_pending - l.unsettled - l.requested;
          l.naked = Math.max(0, elsewhere);
        } catch {
          // next time
        }
      }
      pump();
    };

    const startUp = async (): Promise<void> => {
      // Lanes from before (this or another process): pick up what waits in them.
      const prefixes = o.priorities.map((p) => [p, `${c.durablePrefix}-${p}-t-`] as const);
      const list = o.jsm.consumers.list(STREAM_REQUESTS);
      for await (const ci of list) {
        const hit = prefixes.find(([, pre]) => ci.name.startsWith(pre));
        if (!hit) continue;
        const tenant = ci.config.filter_subject?.split(".")[3];
        if (!tenant || lanes.has(`${hit[0]}.${tenant}`)) continue; // (a retried start-up keeps what it has)
        const consumer = await o.js.consumers.get(STREAM_REQUESTS, ci.name);
        addLane(hit[0], tenant, ci.name, new ConsumerPullSource(consumer, { termReason: o.termReason === true }), ci.num_pending, ci.num_ack_pending);
      }
      pump();
      for (const p of o.priorities) {
        void discover(p).catch((err: unknown) => o.onPullError?.(p, err));
      }
    };

    const sweepTimer = setInterval(() => void sweep(), o.sweepIntervalMs ?? DEFAULT_LANE_SWEEP_MS);
    sweepTimer.unref();
    let workingTimer: NodeJS.Timeout | undefined;
    if (o.workingIntervalMs > 0) {
      workingTimer = setInterval(() => {
        const cutoff = Date.now() - o.workingIntervalMs;
        for (const d of held) if (d.pulledAtMs <= cutoff) d.working();
      }, o.workingIntervalMs);
      workingTimer.unref();
    }
    const drainSub = o.drain?.subscribe(() => {
      if (draining) return;
      draining = true;
      for (const it of discoveries) void it.close().catch(() => undefined);
      for (const l of lanes.values()) for (const b of l.pulls) void b.close().catch(() => undefined);
      finishDrain();
    });

    // Start-up is retried (a broker that is restarting), never turned into a stopped pipeline.
    const start = (failures: number): void => {
      startUp().catch((err: unknown) => {
        if (closed) return;
        try {
          o.onPullError?.(o.priorities[0] ?? "normal", err);
        } catch {
          // ignore
        }
        later(backoffMs(failures, PULL_RETRY), () => start(failures + 1));
      });
    };
    start(0);

    return () => {
      closed = true;
      if (pumpQueued !== undefined) clearImmediate(pumpQueued);
      drainSub?.unsubscribe();
      clearInterval(sweepTimer);
      if (workingTimer) clearInterval(workingTimer);
      for (const t of timers) clearTimeout(t);
      for (const it of discoveries) void it.close().catch(() => undefined);
      for (const l of lanes.values()) for (const b of l.pulls) void b.close().catch(() => undefined);
    };
  });
}
