/**
 * The load generator: sends requests on a schedule, times each result from the moment its
 * request was sent, and counts what never came back (lost) and what came back twice
 * (duplicated). It knows the system under test only through a {@link LoadTarget}, so a
 * baseline on another broker plugs in with its own target.
 */
import { performance } from "node:perf_hooks";
import { setTimeout as delay } from "node:timers/promises";
import { connect, headers as natsHeaders, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import { jetstream, type JetStreamClient } from "@nats-io/jetstream";

export type Priority = "high" | "normal" | "low";

/**
 * Where request n goes: its model, and its priority when the scenario mixes priorities
 * (undefined: the system's default, no priority at all for a baseline).
 */
export interface Route {
  readonly model: string;
  readonly priority?: Priority;
  /** The tenant sending it; the target's own when omitted (NATS targets only). */
  readonly tenant?: string;
}

/** How a request enters the system under test and how its result comes back. */
export interface LoadTarget {
  /** Sends one request; resolves once the system has accepted it (stored, for a queue). */
  send(id: string, body: Uint8Array, route: Route): Promise<void>;
  /**
   * Calls `onResult` for every result from now on; resolves once listening. `batchSize` is the
   * size of the batch the request ran in, when the result says so.
   */
  listen(onResult: (id: string, ok: boolean, batchSize?: number) => void): Promise<void>;
  /** Stops listening. */
  unlisten(): void;
  close(): Promise<void>;
}

/** All at once, at most `window` sends awaiting their acknowledgement. */
export interface BurstSchedule {
  readonly kind: "burst";
  readonly count: number;
  readonly window: number;
}

/** `rate` requests per second for `seconds`, evenly spaced (open loop). */
export interface SustainedSchedule {
  readonly kind: "sustained";
  readonly rate: number;
  readonly seconds: number;
  readonly window: number;
}

export type Schedule = BurstSchedule | SustainedSchedule;

export function scheduleCount(s: Schedule): number {
  return s.kind === "burst" ? s.count : Math.max(1, Math.round(s.rate * s.seconds));
}

export interface LoadOptions {
  /** Request ids are `<idPrefix>-<n>`; unique per phase and run. */
  readonly idPrefix: string;
  /** The body of request n; the same function for every system. */
  readonly body: (n: number) => Uint8Array;
  /** Where request n goes; the same function for every system. */
  readonly route: (n: number) => Route;
  /** Give up when no result has arrived for this long. */
  readonly idleTimeoutMs: number;
  /** Give up this long after the first send, whatever happens. */
  readonly maxWaitMs: number;
  /** After the last missing result arrived, keep listening this long for duplicates. */
  readonly duplicateGraceMs: number;
  /** Called about once a second with progress (answered of count). */
  readonly onProgress?: (answered: number, count: number) => void;
}

export interface LoadResult {
  readonly requests: number;
  /** Requests whose send failed (not counted as lost). */
  readonly sendErrors: number;
  readonly answered: number;
  /** Answered with an error result. */
  readonly errors: number;
  readonly lost: number;
  readonly duplicated: number;
  /** Rate at which requests were actually sent, per second. */
  readonly sentRps: number;
  /** Answered requests per second, from the first send to the last first answer. */
  readonly throughputRps: number;
  /**
   * Answered requests per second between the 10th and the 90th percentile of answer times: the
   * rate once the system is saturated, without the ramp at the start and the drain at the end.
   */
  readonly steadyRps: number;
  /** Mean size of the batches the answered requests ran in, by request; NaN when results do not say. */
  readonly meanBatchSize: number;
  /** Latency of each answered request, ms, sorted. */
  readonly latencies: Float64Array;
  /** The same, by priority, when the schedule's requests had priorities. */
  readonly latenciesByPriority: Partial<Record<Priority, Float64Array>>;
  readonly durationMs: number;
  /** Stopped waiting because of idleTimeoutMs or maxWaitMs. */
  readonly timedOut: boolean;
}

/** Runs one schedule against a target and measures it. */
export async function runLoad(target: LoadTarget, schedule: Schedule, opts: LoadOptions): Promise<LoadResult> {
  const count = scheduleCount(schedule);
  const prefix = `${opts.idPrefix}-`;
  const sentAt = new Float64Array(count);
  const answeredAt = new Float64Array(count);
  const failedSend = new Uint8Array(count);
  let answered = 0;
  let errors = 0;
  let duplicated = 0;
  let lastProgressAt = performance.now();
  let lastAnswerAt = 0;
  let batchSizeSum = 0;
  let batchSizeCount = 0;

  await target.listen((id, ok, batchSize) => {
    if (!id.startsWith(prefix)) return;
    const n = Number(id.slice(prefix.length));
    if (!Number.isInteger(n) || n < 0 || n >= count) return;
    const now = performance.now();
    if (answeredAt[n]! > 0) {
      duplicated++;
      return;
    }
    answeredAt[n] = now;
    answered++;
    if (!ok) errors++;
    if (batchSize !== undefined) {
      batchSizeSum += batchSize;
      batchSizeCount++;
    }
    lastProgressAt = now;
    lastAnswerAt = now;
  });

  let sendErrors = 0;
  const inflight = new Set<Promise<void>>();
  // Latency runs from when a request is offered, not from when the generator got it out: a
  // system whose flow control holds the generator back (a full send window) is charged for the
  // wait, as a client would be (no coordinated omission). A burst is offered all at once, at its
  // start; a steady schedule offers each request when the generator reaches it.
  const sendOne = async (n: number, offeredAt: number): Promise<void> => {
    sentAt[n] = offeredAt;
    while (inflight.size >= schedule.window) await Promise.race(inflight);
    const p: Promise<void> = target
      .send(`${prefix}${n}`, opts.body(n), opts.route(n))
      .catch(() => {
        sendErrors++;
        failedSend[n] = 1;
      })
      .finally(() => inflight.delete(p));
    inflight.add(p);
  };

  const t0 = performance.now();
  let progressTimer: NodeJS.Timeout | undefined;
  if (opts.onProgress) {
    const report = opts.onProgress;
    progressTimer = setInterval(() => report(answered, count), 1_000);
    progressTimer.unref();
  }
  try {
    if (schedule.kind === "burst") {
      for (let n = 0; n < count; n++) await sendOne(n, t0);
    } else {
      const intervalMs = 1_000 / schedule.rate;
      let n = 0;
      while (n < count) {
        const due = Math.min(count, Math.floor((performance.now() - t0) / intervalMs) + 1);
        while (n < due) await sendOne(n++, performance.now());
        if (n < count) {
          const wait = t0 + n * intervalMs - performance.now();
          if (wait > 0) await delay(Math.max(1, Math.floor(wait)));
        }
      }
    }
    const sentDoneAt = performance.now();
    await Promise.all(inflight);
    const expected = count - sendErrors;
    lastProgressAt = Math.max(lastProgressAt, performance.now());

    let timedOut = false;
    for (;;) {
      const now = performance.now();
      if (answered >= expected) break;
      if (now - lastProgressAt > opts.idleTimeoutMs || now - t0 > opts.maxWaitMs) {
        timedOut = true;
        break;
      }
      await delay(20);
    }
    if (!timedOut) await delay(opts.duplicateGraceMs);

    const latencies: number[] = [];
    const byPriority: Partial<Record<Priority, number[]>> = {};
    let lost = 0;
    for (let n = 0; n < count; n++) {
      if (failedSend[n]) continue;
      if (answeredAt[n]! > 0) {
        const ms = answeredAt[n]! - sentAt[n]!;
        latencies.push(ms);
        const p = opts.route(n).priority;
        if (p !== undefined) (byPriority[p] ??= []).push(ms);
      } else lost++;
    }
    const latenciesByPriority: Partial<Record<Priority, Float64Array>> = {};
    for (const [p, xs] of Object.entries(byPriority) as Array<[Priority, number[]]>) latenciesByPriority[p] = Float64Array.from(xs).sort();
    const lat = Float64Array.from(latencies).sort();
    const answerTimes = Float64Array.from(answeredAt.filter((t) => t > 0)).sort();
    const i10 = Math.floor(answerTimes.length * 0.1);
    const i90 = Math.max(i10, Math.ceil(answerTimes.length * 0.9) - 1);
    const steadySpan = answerTimes.length > 10 ? answerTimes[i90]! - answerTimes[i10]! : 0;
    const steadyRps = steadySpan > 0 ? ((i90 - i10) / steadySpan) * 1_000 : Number.NaN;
    const spanMs = Math.max(1e-3, (lastAnswerAt || performance.now()) - t0);
    const sendSpanMs = Math.max(1e-3, sentDoneAt - t0);
    return {
      requests: count,
      sendErrors,
      answered,
      errors,
      lost,
      duplicated,
      sentRps: (count / sendSpanMs) * 1_000,
      throughputRps: (answered / spanMs) * 1_000,
      steadyRps,
      meanBatchSize: batchSizeCount > 0 ? batchSizeSum / batchSizeCount : Number.NaN,
      latencies: lat,
      latenciesByPriority,
      durationMs: performance.now() - t0,
      timedOut,
    };
  } finally {
    if (progressTimer) clearInterval(progressTimer);
    target.unlisten();
  }
}

/** Nearest-rank percentile of sorted values; NaN when there are none. */
export function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const rank = Math.min(sorted.length, Math.max(1, Math.ceil((p / 100) * sorted.length)));
  return sorted[rank - 1]!;
}

/**
 * Requests as docs/protocol.md has them: JetStream publish to `infer.req.<priority>.<tenant>.<model>`
 * with `Nats-Msg-Id`; results on a core subscription of `infer.res.<tenant>.>`, judged by
 * their `Infer-Status` header.
 */
const BATCH_SIZE_RE = /"batch_size":(\d+)/;

export class NatsLoadTarget implements LoadTarget {
  private sub: Subscription | undefined;
  private readonly js: JetStreamClient;

  private constructor(
    readonly nc: NatsConnection,
    readonly tenant: string,
  ) {
    this.js = jetstream(nc);
  }

  static async connect(url: string, opts: { tenant: string }): Promise<NatsLoadTarget> {
    const nc = await connect({ servers: url, name: "bench-load", maxReconnectAttempts: 10, noAsyncTraces: true });
    return new NatsLoadTarget(nc, opts.tenant);
  }

  async send(id: string, body: Uint8Array, route: Route): Promise<void> {
    const h = natsHeaders();
    h.set("Content-Type", "application/json");
    await this.js.publish(`infer.req.${route.priority ?? "normal"}.${route.tenant ?? this.tenant}.${route.model}`, body, { msgID: id, headers: h, timeout: 30_000 });
  }

  async listen(onResult: (id: string, ok: boolean, batchSize?: number) => void): Promise<void> {
    this.unlisten();
    // Tenant "*": results of every tenant (a scenario with many tenants).
    this.sub = this.nc.subscribe(`infer.res.${this.tenant}.>`, {
      callback: (err, msg) => {
        if (err) return;
        const id = msg.subject.slice(msg.subject.lastIndexOf(".") + 1);
        // A regular expression, not JSON.parse: the generator must stay cheap at high rates.
        const m = BATCH_SIZE_RE.exec(msg.string());
        onResult(id, msg.headers?.get("Infer-Status") === "ok", m ? Number(m[1]) : undefined);
      },
    });
    // The subscription is known to the server before the first request goes out.
    await this.nc.flush();
  }

  unlisten(): void {
    this.sub?.unsubscribe();
    this.sub = undefined;
  }

  async close(): Promise<void> {
    this.unlisten();
    await this.nc.close().catch(() => undefined);
  }
}
