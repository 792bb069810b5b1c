/**
 * Benchmark scenarios of the result cache and of the token-weighted fair share. They measure
 * sluice against itself (the baselines have neither feature): cache hits against misses of the
 * same run, and the token share against sluice sharing by request count in the same run. Each
 * system run gets its own nats-server, worker process and sluice process, as the others do.
 */
import { performance } from "node:perf_hooks";
import { setTimeout as delay } from "node:timers/promises";
import { connect, headers as natsHeaders, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { defaultConfig } from "../../pipeline/config.js";
import { ensureStreams } from "../../pipeline/intake/jetstream.js";
import { percentile } from "./load.js";
import { startNats, startWorkerProcess, stopNats } from "./procs.js";
import { round, type Row } from "./report.js";
import { sluiceSystem, type SystemContext } from "./systems.js";

export interface ExtraScenarioOptions {
  readonly quick: boolean;
  readonly log: (msg: string) => void;
}

export interface ExtraResult {
  readonly rows: Row[];
  readonly summary: Record<string, unknown>;
  readonly lines: string[];
}

/** A scenario that drives sluice with its own load and reports its own figures. */
export interface ExtraScenario {
  readonly name: string;
  readonly description: string;
  run(o: ExtraScenarioOptions): Promise<ExtraResult>;
}

const GPU_SIM = { baseMs: 8, perItemMs: 0.5 };
const BATCH = { maxSize: 32, maxDelayMs: 5 };
const MODEL = "bench";
const VERSION = "v1";
/** Sends awaiting their acknowledgement at once. */
const SEND_WINDOW = 1_000;
/** Give up waiting when no result came for this long. */
const IDLE_TIMEOUT_MS = 15_000;

interface Answer {
  readonly at: number;
  readonly tenant: string;
  readonly ok: boolean;
  readonly tokens: number;
  readonly cache: string | undefined;
}

/**
 * Runs `f` against a fresh nats-server, worker and sluice process; `before` runs once the
 * streams exist and before sluice starts (to queue a backlog it finds waiting).
 */
async function withSluice<T>(
  runId: string,
  extras: Pick<SystemContext, "modelExtras" | "pipelineSettings">,
  f: (nc: NatsConnection, answers: Map<string, Answer>, rss: () => number | undefined) => Promise<T>,
  before?: (nc: NatsConnection) => Promise<void>,
): Promise<T> {
  const nats = await startNats();
  let worker: Awaited<ReturnType<typeof startWorkerProcess>> | undefined;
  let running: Awaited<ReturnType<typeof sluiceSystem.start>> | undefined;
  let nc: NatsConnection | undefined;
  try {
    worker = await startWorkerProcess(GPU_SIM);
    nc = await connect({ servers: nats.url, name: "bench-llm-fairness", noAsyncTraces: true });
    const answers = new Map<string, Answer>();
    nc.subscribe("infer.res.*.>", {
      callback: (err, m) => {
        if (err) return;
        const id = m.subject.slice(m.subject.lastIndexOf(".") + 1);
        if (answers.has(id)) return;
        const r = m.json<{ status?: string; usage?: { prompt_tokens?: number; completion_tokens?: number }; timing?: { cache?: string } }>();
        answers.set(id, {
          at: performance.now(),
          tenant: m.subject.split(".")[2] ?? "",
          ok: r.status === "ok",
          tokens: (r.usage?.prompt_tokens ?? 0) + (r.usage?.completion_tokens ?? 0),
          cache: r.timing?.cache,
        });
      },
    });
    await nc.flush();
    if (before) {
      // The streams as sluice makes them (it finds them and keeps them).
      await ensureStreams(await jetstreamManager(nc), defaultConfig().streams);
      await before(nc);
    }
    running = await sluiceSystem.start({
      runId,
      natsUrl: nats.url,
      workerEndpoint: worker.endpoint,
      model: MODEL,
      models: [MODEL],
      priorities: false,
      version: VERSION,
      batch: BATCH,
      ...extras,
    });
    const proc = running;
    return await f(nc, answers, () => proc.peakRssMb());
  } finally {
    await nc?.close().catch(() => undefined);
    await running?.stop().catch(() => undefined);
    await worker?.proc.stop();
    await stopNats(nats);
  }
}

interface Request {
  readonly id: string;
  readonly tenant: string;
  readonly body: Uint8Array;
  /** When it is offered (performance.now() ms); latency runs from here. */
  offeredAt: number;
}

/** Publishes requests (each at its `offeredAt` or later), at most SEND_WINDOW unacknowledged. */
async function send(nc: NatsConnection, requests: Request[], paced: boolean): Promise<number> {
  const js = jetstream(nc);
  const inflight = new Set<Promise<void>>();
  let failed = 0;
  for (const r of requests) {
    if (paced) {
      const wait = r.offeredAt - performance.now();
      if (wait > 1) await delay(Math.floor(wait));
    }
    while (inflight.size >= SEND_WINDOW) await Promise.race(inflight);
    const h = natsHeaders();
    h.set("Content-Type", "application/json");
    const p: Promise<void> = js
      .publish(`infer.req.normal.${r.tenant}.${MODEL}`, r.body, { msgID: r.id, headers: h, timeout: 30_000 })
      .then(
        () => undefined,
        () => void failed++,
      )
      .finally(() => inflight.delete(p));
    inflight.add(p);
  }
  await Promise.all(inflight);
  return failed;
}

/** Waits until every request is answered or nothing arrived for IDLE_TIMEOUT_MS. */
async function awaitAnswers(answers: Map<string, Answer>, requests: readonly Request[]): Promise<void> {
  let seen = answers.size;
  let lastProgress = performance.now();
  while (requests.some((r) => !answers.has(r.id))) {
    if (answers.size !== seen) {
      seen = answers.size;
      lastProgress = performance.now();
    } else if (performance.now() - lastProgress > IDLE_TIMEOUT_MS) return;
    await delay(20);
  }
}

function row(scenario: string, system: string, phase: string, requests: readonly Request[], answers: Map<string, Answer>, rss: number | undefined, extra: Record<string, unknown> = {}): Row {
  const lat = Float64Array.from(requests.filter((r) => answers.has(r.id)).map((r) => answers.get(r.id)!.at - r.offeredAt)).sort();
  const answered = requests.filter((r) => answers.has(r.id));
  const first = Math.min(...requests.map((r) => r.offeredAt));
  const last = Math.max(...answered.map((r) => answers.get(r.id)!.at));
  const pct = (p: number): number | null => round(percentile(lat, p), 2);
  return {
    scenario,
    system,
    phase,
    offered_rps: null,
    requests: requests.length,
    throughput_rps: round(answered.length / Math.max(1e-3, (last - first) / 1_000), 1) ?? 0,
    steady_rps: null,
    p50_ms: pct(50),
    p90_ms: pct(90),
    p99_ms: pct(99),
    max_ms: pct(100),
    lost: requests.length - answered.length,
    duplicated: 0,
    errors: answered.filter((r) => !answers.get(r.id)!.ok).length,
    send_errors: 0,
    mean_batch: null,
    sent_rps: 0,
    peak_rss_mb: round(rss, 1),
    nats_peak_rss_mb: null,
    worker_single_ms: null,
    worker_max_batch_ms: null,
    ...extra,
  };
}

const enc = new TextEncoder();
const words = (n: number, salt: string): string => Array.from({ length: n }, (_, i) => (i === 0 ? salt : `w${i % 10}x`)).join(" ");

/**
 * Repeated requests against a model with a result cache: the hit rate, and a hit's latency
 * against a miss's under the same load. Every tenth request is new (a miss spread over the whole
 * run, not only at its start); the others come from 50 repeated ones. A warm-up of new requests
 * goes first, unmeasured (start-up, the tenant's lane, the worker connection).
 */
export const cacheScenario: ExtraScenario = {
  name: "cache",
  description: "GPU-like device, model with a result cache; 200 req/s, every tenth request new, the rest drawn from 50 repeated ones: hit rate, and hit p50 against miss p50",
  async run(o) {
    const rate = 200;
    const seconds = o.quick ? 5 : 10;
    const repeated = 50;
    const count = rate * seconds;
    const body = (key: string): Uint8Array => enc.encode(JSON.stringify({ prompt: `cache request ${key}: write a haiku about queues`, parameters: { max_tokens: 16 } }));
    return withSluice(`cache-${process.pid}`, { modelExtras: { cache: { ttl_ms: 600_000 } } }, async (nc, answers, rss) => {
      const warm: Request[] = Array.from({ length: 100 }, (_, n) => ({ id: `cache-warm-${n}`, tenant: "bench", body: body(`warm ${n}`), offeredAt: performance.now() }));
      await send(nc, warm, false);
      await awaitAnswers(answers, warm);
      const t0 = performance.now() + 50;
      const requests: Request[] = Array.from({ length: count }, (_, n) => ({
        id: `cache-${n}`,
        tenant: "bench",
        body: body(n % 10 === 0 ? `new ${n}` : `repeated ${n % repeated}`),
        offeredAt: t0 + (n * 1_000) / rate,
      }));
      await send(nc, requests, true);
      await awaitAnswers(answers, requests);
      const hits = requests.filter((r) => answers.get(r.id)?.cache === "hit");
      const misses = requests.filter((r) => answers.get(r.id)?.cache === "miss");
      const all = row("cache", "sluice", `${rate}/s for ${seconds}s`, requests, answers, rss());
      const hitRow = row("cache", "sluice", "hits", hits, answers, rss());
      const missRow = row("cache", "sluice", "misses", misses, answers, rss());
      const hitRate = hits.length / Math.max(1, hits.length + misses.length);
      const expected = 1 - (count / 10 + repeated) / count;
      const ratio = hitRow.p50_ms !== null && missRow.p50_ms ? hitRow.p50_ms / missRow.p50_ms : null;
      const summary = {
        requests: count,
        hit_rate: round(hitRate, 3),
        expected_hit_rate: round(expected, 3),
        hit_p50_ms: hitRow.p50_ms,
        hit_p99_ms: hitRow.p99_ms,
        miss_p50_ms: missRow.p50_ms,
        miss_p99_ms: missRow.p99_ms,
        hit_over_miss_p50: round(ratio, 3),
        lost: all.lost,
      };
      o.log(`  cache: hit rate ${(hitRate * 100).toFixed(1)}%, hit p50 ${hitRow.p50_ms} ms, miss p50 ${missRow.p50_ms} ms`);
      return {
        rows: [all, hitRow, missRow],
        summary,
        lines: [
          `cache (${count} requests at ${rate}/s, every tenth new, the rest from ${repeated} repeated ones): hit rate ${(hitRate * 100).toFixed(1)}% (expected ${(expected * 100).toFixed(1)}%), ` +
            `hit p50 ${hitRow.p50_ms} ms / miss p50 ${missRow.p50_ms} ms = ${ratio === null ? "-" : ratio.toFixed(3)}x, lost ${all.lost}`,
        ],
      };
    });
  },
};

/** Two backlogged tenants, one with 4,000-token prompts, one with 100-token prompts: each one's share of the device's tokens. */
export const tokenFairScenario: ExtraScenario = {
  name: "token-fair",
  description: "GPU-like device; tenant long sends 4,000-word prompts, tenant short 100-word prompts, both backlogged: each one's share of device tokens while both have work (sluice by tokens against sluice by requests)",
  async run(o) {
    const longCount = o.quick ? 150 : 300;
    const shortCount = o.quick ? 1_500 : 3_000;
    const rows: Row[] = [];
    const shares: Record<string, { long: number; short: number; window_results: number }> = {};
    const lines: string[] = [];
    for (const [system, fairShare] of [
      ["sluice", "tokens"],
      ["sluice-requests", "requests"],
    ] as const) {
      o.log(`token-fair / ${system}`);
      const requests: Request[] = [];
      for (let i = 0, j = 0; i < shortCount; i++) {
        requests.push({ id: `short-${i}`, tenant: "short", body: enc.encode(JSON.stringify({ prompt: words(100, `s${i}`) })), offeredAt: 0 });
        if (j < longCount && j * shortCount <= i * longCount) {
          requests.push({ id: `long-${j}`, tenant: "long", body: enc.encode(JSON.stringify({ prompt: words(4_000, `l${j}`) })), offeredAt: 0 });
          j++;
        }
      }
      // Both backlogs are queued before sluice starts: both tenants have work from the first pull.
      const backlog = async (nc: NatsConnection): Promise<void> => {
        const t0 = performance.now();
        for (const r of requests) r.offeredAt = t0;
        await send(nc, requests, false);
      };
      await withSluice(`fair-${system}-${process.pid}`, { pipelineSettings: { fairShare } }, async (_nc, answers, rss) => {
        await awaitAnswers(answers, requests);
        // The window while both had work: up to the last answer of the tenant that finished first.
        const ordered = requests.filter((r) => answers.has(r.id)).map((r) => answers.get(r.id)!).sort((a, b) => a.at - b.at);
        const lastOf = (t: string): number => ordered.map((a) => a.tenant).lastIndexOf(t);
        const end = Math.min(lastOf("long"), lastOf("short"));
        const tokens = { long: 0, short: 0 };
        for (const a of ordered.slice(0, end + 1)) tokens[a.tenant as "long" | "short"] += a.tokens;
        const total = Math.max(1, tokens.long + tokens.short);
        const share = { long: round(tokens.long / total, 3)!, short: round(tokens.short / total, 3)!, window_results: end + 1 };
        shares[system] = share;
        rows.push(row("token-fair", system, "backlog (latency includes start-up)", requests, answers, rss(), { device_token_share: share }));
        lines.push(
          `  ${system.padEnd(16)} long ${(share.long * 100).toFixed(1)}%, short ${(share.short * 100).toFixed(1)}% of ${tokens.long + tokens.short} device tokens ` +
            `(first ${end + 1} results); long/short = ${(tokens.long / Math.max(1, tokens.short)).toFixed(2)}x`,
        );
      }, backlog);
    }
    const worst = shares["sluice"] ? Math.max(Math.abs(shares["sluice"].long - 0.5), Math.abs(shares["sluice"].short - 0.5)) / 0.5 : null;
    return {
      rows,
      summary: { device_token_share: shares, sluice_max_deviation_from_equal: round(worst, 3) },
      lines: [
        `token-fair (${longCount} requests of 4,000-word prompts, ${shortCount} of 100-word prompts, both backlogged), device-token share while both had work:`,
        ...lines,
        `  sluice's largest deviation from an equal share: ${worst === null ? "-" : `${(worst * 100).toFixed(1)}%`} (target: within 20%)`,
      ],
    };
  },
};

export const EXTRA_SCENARIOS: readonly ExtraScenario[] = [cacheScenario, tokenFairScenario];
