/**
 * Scenario `chat-prefix`: multi-turn chats sharing a few long system prompts, over four
 * simulated LLM workers (llm-sim: KV capacity, prefix cache, prefill by uncached tokens,
 * continuous batching). One run compares the routing policies on the same load:
 * `sluice` (prefix-aware, the default for generative models), `sluice-least-loaded` and
 * `round-robin`, each on fresh workers (cold caches), a fresh nats-server and a fresh pipeline.
 *
 * Each session picks one of the system prompts and sends its turns one after another (a turn
 * once the previous answer is in, after a short think time); a turn's prompt is the system
 * prompt, the earlier turns (questions and answers) and the new question, as chat APIs send.
 * Time to first token is measured by the client, from when the turn is sent to its first
 * streamed chunk; output tokens/s over the whole run; the prefix hit rate from the workers
 * (prompt tokens found cached / prompt tokens).
 */
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { InferenceClient } from "../../pipeline/client/client.js";
import { loadConfig } from "../../pipeline/config.js";
import { PipelineService } from "../../pipeline/service.js";
import { silentLogger } from "../../pipeline/support/logger.js";
import type { RoutingPolicyName } from "../../pipeline/workers/routing-policy.js";
import { CHARS_PER_TOKEN } from "../../proto/prefix-blocks.js";
import { LlmSimEngine, type LlmSimOptions } from "../../worker/engines/llm-sim.js";
import { WorkerServer } from "../../worker/server.js";
import { percentile } from "./load.js";
import { startNats, stopNats } from "./procs.js";

export const CHAT_PREFIX_SCENARIO = "chat-prefix";
const TENANT = "bench";
const MODEL = "chat";
const WORKERS = 4;
const SYSTEM_PROMPTS = 8;
const TURNS = 5;
const MAX_TOKENS = 24;
const THINK_MS = 100;
/** The device: a step of 8 ms (+0.2 ms per sequence), prefill at 20,000 tokens/s, KV for 8,000 tokens (fewer than the eight system prompts take). */
const DEVICE: LlmSimOptions = { kv_tokens: 8_000, max_running: 16, step_ms: 8, step_per_seq_ms: 0.2, prefill_ms_per_token: 0.05 };

export const CHAT_PREFIX_SYSTEMS: ReadonlyArray<{ name: string; routing: RoutingPolicyName }> = [
  { name: "sluice", routing: "prefix" },
  { name: "sluice-least-loaded", routing: "least-loaded" },
  { name: "round-robin", routing: "round-robin" },
];

export interface ChatPrefixRow {
  scenario: typeof CHAT_PREFIX_SCENARIO;
  system: string;
  routing: RoutingPolicyName;
  sessions: number;
  requests: number;
  ttft_p50_ms: number | null;
  ttft_p99_ms: number | null;
  output_tokens_per_s: number;
  prefix_hit_rate: number;
  /** Time requests waited in the engines for KV room or a running slot, p99. */
  engine_wait_p99_ms: number | null;
  requests_per_worker: number[];
  lost: number;
  duplicated: number;
  errors: number;
}

/** Deterministic pseudo-random numbers (mulberry32), so every system gets the same load. */
function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function words(rand: () => number, tokens: number): string {
  const vocab = ["queue", "batch", "token", "model", "worker", "stream", "cache", "prefix", "device", "tenant", "latency", "route"];
  let s = "";
  while (s.length < tokens * CHARS_PER_TOKEN) s += `${vocab[Math.floor(rand() * vocab.length)]} `;
  return s.slice(0, tokens * CHARS_PER_TOKEN);
}

interface Load {
  systemPrompts: string[];
  sessions: Array<{ startMs: number; system: number; questions: string[] }>;
}

function makeLoad(sessions: number, spreadMs: number): Load {
  const rand = random(17);
  const systemPrompts = Array.from({ length: SYSTEM_PROMPTS }, (_, i) => `System prompt ${i}. ${words(rand, 1_000 + Math.floor(rand() * 1_000))}`);
  return {
    systemPrompts,
    sessions: Array.from({ length: sessions }, (_, i) => ({
      startMs: (i / sessions) * spreadMs,
      system: Math.floor(rand() * SYSTEM_PROMPTS),
      questions: Array.from({ length: TURNS }, () => words(rand, 30 + Math.floor(rand() * 90))),
    })),
  };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function runOne(system: { name: string; routing: RoutingPolicyName }, load: Load, log: (m: string) => void): Promise<ChatPrefixRow> {
  const nats = await startNats();
  const engines = Array.from({ length: WORKERS }, () => new LlmSimEngine(DEVICE));
  const servers = await Promise.all(engines.map((engine) => WorkerServer.start({ engine })));
  let pipeline: PipelineService | undefined;
  let nc: NatsConnection | undefined;
  try {
    pipeline = await PipelineService.start(
      loadConfig({
        env: {},
        overrides: {
          servers: [nats.url],
          telemetry: { metricsPort: -1 },
          models: { [MODEL]: { versions: { v1: { weight: 100 } }, generate: true, routing: system.routing, timeout_ms: 120_000 } },
          workers: servers.map((s) => ({ model: MODEL, version: "v1", endpoint: s.endpoint, capacity: engines[0]!.capacity })),
        },
      }),
      { logger: silentLogger },
    );
    nc = await connect({ servers: nats.url });
    const client = new InferenceClient(nc, TENANT);
    const seen = new Map<string, number>();
    const sub = nc.subscribe(`infer.res.${TENANT}.>`, { callback: (_e, m) => void seen.set(m.subject, (seen.get(m.subject) ?? 0) + 1) });
    const ttfts: number[] = [];
    let errors = 0;
    let lost = 0;
    let outputTokens = 0;
    const t0 = performance.now();
    await Promise.all(
      load.sessions.map(async (session, s) => {
        await sleep(session.startMs);
        let history = load.systemPrompts[session.system]!;
        for (let turn = 0; turn < TURNS; turn++) {
          history += `\nUser: ${session.questions[turn]}\nAssistant:`;
          const sent = performance.now();
          let first: number | undefined;
          let answer = "";
          try {
            for await (const ev of client.stream(MODEL, { prompt: history, parameters: { max_tokens: MAX_TOKENS } }, { id: `s${s}-t${turn}`, session: `s${s}`, timeoutMs: 120_000 })) {
              if ("text" in ev) first ??= performance.now();
              else {
                if (ev.result.status !== "ok") errors++;
                answer = ev.result.output?.text ?? "";
                outputTokens += ev.result.usage?.completion_tokens ?? 0;
              }
            }
          } catch {
            lost++;
            return;
          }
          if (first !== undefined) ttfts.push(first - sent);
          history += answer;
          await sleep(THINK_MS);
        }
      }),
    );
    const seconds = (performance.now() - t0) / 1000;
    await sleep(500); // late duplicates
    sub.unsubscribe();
    const duplicated = [...seen.values()].reduce((a, n) => a + (n - 1), 0);
    const prompt = engines.reduce((a, e) => a + e.counters.promptTokens, 0);
    const cached = engines.reduce((a, e) => a + e.counters.cachedTokens, 0);
    const xs = Float64Array.from(ttfts).sort();
    const waits = Float64Array.from(engines.flatMap((e) => e.log.map((r) => (r.admittedAtMs ?? r.finishedAtMs) - r.arrivedAtMs))).sort();
    const row: ChatPrefixRow = {
      scenario: CHAT_PREFIX_SCENARIO,
      system: system.name,
      routing: system.routing,
      sessions: load.sessions.length,
      requests: load.sessions.length * TURNS,
      ttft_p50_ms: round(percentile(xs, 50)),
      ttft_p99_ms: round(percentile(xs, 99)),
      output_tokens_per_s: round(outputTokens / seconds) ?? 0,
      prefix_hit_rate: round(prompt > 0 ? cached / prompt : 0, 3) ?? 0,
      engine_wait_p99_ms: round(percentile(waits, 99)),
      requests_per_worker: engines.map((e) => e.log.length),
      lost,
      duplicated,
      errors,
    };
    log(`${CHAT_PREFIX_SCENARIO} / ${system.name}: ttft p50 ${row.ttft_p50_ms} ms, p99 ${row.ttft_p99_ms} ms, ${row.output_tokens_per_s} output tokens/s, prefix hits ${row.prefix_hit_rate}, engine wait p99 ${row.engine_wait_p99_ms} ms, per worker ${row.requests_per_worker.join("/")}`);
    return row;
  } finally {
    await nc?.close().catch(() => undefined);
    await pipeline?.stop(2_000).catch(() => undefined);
    await Promise.all(servers.map((s) => s.stop()));
    await Promise.all(engines.map((e) => e.close()));
    await stopNats(nats);
  }
}

function round(x: number | undefined, digits = 1): number | null {
  if (x === undefined || !Number.isFinite(x)) return null;
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

/** Runs every routing policy on the same load; rows in the order of {@link CHAT_PREFIX_SYSTEMS}. */
export async function runChatPrefix(opts: { quick: boolean; systems?: readonly string[]; log: (m: string) => void }): Promise<ChatPrefixRow[]> {
  const sessions = opts.quick ? 80 : 200;
  // Four sessions a second: busy workers, not past their capacity (past it, every policy only queues).
  const load = makeLoad(sessions, opts.quick ? 20_000 : 50_000);
  const rows: ChatPrefixRow[] = [];
  for (const system of CHAT_PREFIX_SYSTEMS) {
    if (opts.systems && opts.systems.length > 0 && !opts.systems.includes(system.name)) continue;
    rows.push(await runOne(system, load, opts.log));
  }
  return rows;
}

/** Ratio lines against round-robin, measured in the same run. */
export function chatPrefixSummary(rows: readonly ChatPrefixRow[]): string[] {
  const base = rows.find((r) => r.system === "round-robin");
  if (!base) return [];
  const ratio = (a: number | null, b: number | null): string => (a !== null && b !== null && b > 0 ? `${(a / b).toFixed(2)}x` : "n/a");
  return rows.map(
    (r) =>
      `chat-prefix ${r.system.padEnd(20)} TTFT p50 ${ratio(r.ttft_p50_ms, base.ttft_p50_ms)}, p99 ${ratio(r.ttft_p99_ms, base.ttft_p99_ms)}, ` +
      `output tokens/s ${ratio(r.output_tokens_per_s, base.output_tokens_per_s)} of round-robin; prefix hit rate ${r.prefix_hit_rate} (round-robin ${base.prefix_hit_rate}); lost ${r.lost}, duplicated ${r.duplicated}`,
  );
}
