/**
 * `npm run bench`: every system under every scenario, with the same payloads, the same
 * simulated worker and the same load. Each system run gets its own nats-server (temporary
 * store), its own worker process and its own system process, so runs share no state.
 *
 *   npm run bench -- [--scenario NAME]... [--system NAME]... [--quick] [--requests N]
 *                    [--max-minutes M] [--out DIR] [--list]
 *
 * Prints a table and the ratios that matter, and writes `bench/results/latest.json` and
 * `bench/results/latency-vs-load.svg`. See test/bench/README.md.
 */
import { HTTP_SCENARIO, runHttpScenario, type HttpBenchResult } from "./http.js";
import { mkdir, writeFile } from "node:fs/promises";
import { cpus, loadavg, totalmem } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { NatsServerMissingError, natsServerVersion } from "../../pipeline/dev/nats-server.js";
import { NatsLoadTarget, percentile, runLoad, type LoadResult, type LoadTarget, type Priority, type Route } from "./load.js";
import { BUILD, buildForBench, killAllNow, peakRssMb, ROOT, startNats, startWorkerProcess, stopAll, stopNats } from "./procs.js";
import { renderLatencySvg, renderTable, round, type Row, type SweepSeries } from "./report.js";
import {
  DEFAULT_MODEL,
  deviceMaxRps,
  deviceSingleMs,
  PUBLISH_WINDOW,
  requestBody,
  SCENARIOS,
  type Phase,
  type Plan,
  type Scenario,
} from "./scenarios.js";
import { runPayloadsBench } from "./payloads.js";
import { SYSTEMS, type BenchSystem, type RunningSystem, type SystemContext } from "./systems.js";
import { EXTRA_SCENARIOS } from "./llm-fairness.js";
import { probeWorker, type WorkerTimes } from "./worker-probe.js";
import { CHAT_PREFIX_SCENARIO, CHAT_PREFIX_SYSTEMS, chatPrefixSummary, runChatPrefix, type ChatPrefixRow } from "./chat-prefix.js";
import { cpuMs, idleCpuPercent, requestConsumers } from "./intake-probe.js";

const TENANT = "bench";
const VERSION = "v1";
/** Requests sent (and answered) before measuring, so both systems are measured warm. */
const WARMUP_REQUESTS = 200;
const WARMUP_REQUESTS_QUICK = 100;
/** A phase gives up when no result has arrived for this long (the rest count as lost). */
const IDLE_TIMEOUT_MS = 15_000;
/** A phase never waits longer than this for its results. */
const PHASE_MAX_WAIT_MS = 300_000;
/** Listen this long after the last result for answers that come twice. */
const DUPLICATE_GRACE_MS = 1_000;
/** A sweep step counts as kept up with at this share of the offered rate or more ... */
const KEPT_UP_SHARE = 0.9;
/** ... and a p99 at or below this. */
const KEPT_UP_P99_MS = 1_000;
/**
 * A sweep goes on past steps a system did not keep up with (its latency may recover at higher
 * load, when batches fill), but stops once it is far past its capacity, where higher steps
 * would only add minutes of queueing: p99 over this ...
 */
const SWEEP_STOP_P99_MS = 5_000;
/** ... or once it serves less than this share of the offered rate. */
const SWEEP_STOP_SHARE = 0.5;
/** Progress lines of a long phase, at most this often. */
const PROGRESS_EVERY_MS = 5_000;
const DEFAULT_MAX_MINUTES = 45;
const QUICK_MAX_MINUTES = 20;

interface Failure {
  scenario: string;
  system: string;
  error: string;
}

const log = (msg: string): void => {
  process.stderr.write(`[bench] ${msg}\n`);
};

function usage(): string {
  return [
    "usage: npm run bench -- [--scenario NAME]... [--system NAME]... [--quick] [--requests N] [--max-minutes M] [--out DIR] [--list]",
    "",
    "scenarios:",
    ...SCENARIOS.map((s) => `  ${s.name.padEnd(12)} ${s.description}${s.skipInQuick ? " (not with --quick)" : ""}`),
    `  ${CHAT_PREFIX_SCENARIO.padEnd(12)} multi-turn chats sharing system prompts on 4 llm-sim workers: routing prefix vs least-loaded vs round-robin (systems ${CHAT_PREFIX_SYSTEMS.map((s) => s.name).join(", ")})`,
    `  ${"payloads".padEnd(12)} 1, 4 and 16 MB bodies through the object store vs the store's own put/get; pipeline peak RSS (only alone)`,
    `  ${HTTP_SCENARIO.name.padEnd(12)} ${HTTP_SCENARIO.description} (sluice only; --system does not apply)`,
    ...EXTRA_SCENARIOS.map((s) => `  ${s.name.padEnd(12)} ${s.description} (sluice only)`),
    "systems:",
    ...SYSTEMS.map((s) => `  ${s.name.padEnd(14)} ${s.description}`),
  ].join("\n");
}

function toRow(
  scenario: Scenario,
  system: string,
  phase: Phase,
  r: LoadResult,
  rss: number | undefined,
  natsRss: number | undefined,
  worker: WorkerTimes | undefined,
): Row {
  const pct = (p: number): number | null => round(percentile(r.latencies, p), 2);
  return {
    scenario: scenario.name,
    system,
    phase: phase.label,
    offered_rps: phase.offeredRps,
    requests: r.requests,
    throughput_rps: round(r.throughputRps, 1) ?? 0,
    steady_rps: phase.offeredRps === null ? round(r.steadyRps, 1) : null,
    p50_ms: pct(50),
    p90_ms: pct(90),
    p99_ms: pct(99),
    max_ms: pct(100),
    lost: r.lost,
    duplicated: r.duplicated,
    errors: r.errors,
    send_errors: r.sendErrors,
    mean_batch: round(r.meanBatchSize, 1),
    sent_rps: round(r.sentRps, 1) ?? 0,
    peak_rss_mb: round(rss, 1),
    nats_peak_rss_mb: round(natsRss, 1),
    worker_single_ms: round(worker?.singleMs, 2),
    worker_max_batch_ms: round(worker?.maxBatchMs, 2),
    ...(Object.keys(r.latenciesByPriority).length > 0
      ? {
          by_priority: Object.fromEntries(
            (Object.entries(r.latenciesByPriority) as Array<[Priority, Float64Array]>).map(([p, xs]) => [
              p,
              { answered: xs.length, p50_ms: round(percentile(xs, 50), 2), p99_ms: round(percentile(xs, 99), 2) },
            ]),
          ),
        }
      : {}),
  };
}

/** Whether a sweep should stop after this step. */
function farPastCapacity(phase: Phase, r: LoadResult): boolean {
  if (r.timedOut || r.lost > 0 || !(percentile(r.latencies, 99) <= SWEEP_STOP_P99_MS)) return true;
  return phase.offeredRps !== null && r.throughputRps < SWEEP_STOP_SHARE * phase.offeredRps;
}

let runCounter = 0;

/** One system under one scenario: fresh nats-server, worker and system; every phase in turn. */
async function runSystem(scenario: Scenario, plan: Plan, system: BenchSystem, quick: boolean): Promise<Row[]> {
  const rows: Row[] = [];
  const nats = await startNats();
  let worker: Awaited<ReturnType<typeof startWorkerProcess>> | undefined;
  let running: RunningSystem | undefined;
  let target: LoadTarget | undefined;
  try {
    worker = await startWorkerProcess(scenario.device);
    // The worker's own times, before the system starts: the baseline of low-load overhead and of
    // the device maximum, measured on this run's worker.
    const models = scenario.models ?? [DEFAULT_MODEL];
    const route = scenario.route ?? ((): Route => ({ model: models[0]! }));
    const workerTimes = scenario.device.baseMs > 0 ? await probeWorker(worker.endpoint, models[0]!, VERSION, scenario.batch.maxSize) : undefined;
    if (workerTimes) log(`  worker called directly: ${workerTimes.singleMs.toFixed(2)} ms for one request, ${workerTimes.maxBatchMs.toFixed(2)} ms for ${scenario.batch.maxSize}`);
    const ctx: SystemContext = {
      runId: `${process.pid}-${++runCounter}`,
      natsUrl: nats.url,
      workerEndpoint: worker.endpoint,
      model: models[0]!,
      models,
      priorities: route(0).priority !== undefined,
      version: VERSION,
      batch: scenario.batch,
    };
    running = await system.start(ctx);
    target = system.connectLoad
      ? await system.connectLoad(ctx, TENANT)
      : await NatsLoadTarget.connect(nats.url, { tenant: scenario.manyTenants ? "*" : TENANT });
    const common = {
      body: requestBody,
      route,
      idleTimeoutMs: IDLE_TIMEOUT_MS,
      maxWaitMs: PHASE_MAX_WAIT_MS,
      duplicateGraceMs: DUPLICATE_GRACE_MS,
    };
    const warm = await runLoad(
      target,
      { kind: "burst", count: quick ? WARMUP_REQUESTS_QUICK : WARMUP_REQUESTS, window: PUBLISH_WINDOW },
      { ...common, idPrefix: `warm-${scenario.name}`, duplicateGraceMs: 0 },
    );
    running.assertAlive();
    if (warm.answered === 0) {
      // Nothing works: measuring would only report everything lost. Say why instead.
      throw new Error(
        `${system.name} answered none of ${warm.requests} warm-up requests; its output ends with:\n${running.recentOutput()}`,
      );
    }
    if (warm.lost > 0 || warm.errors > 0) log(`  warm-up: ${warm.lost} lost, ${warm.errors} errors (continuing)`);

    for (const [i, phase] of plan.phases.entries()) {
      let lastLog = Date.now();
      const cpu0 = [cpuMs(running.pid), cpuMs(nats.pid), cpuMs(worker.proc.pid)];
      const r = await runLoad(target, phase.schedule, {
        ...common,
        idPrefix: `${scenario.name}-p${i}`,
        onProgress: (answered, count) => {
          if (Date.now() - lastLog < PROGRESS_EVERY_MS) return;
          lastLog = Date.now();
          log(`  ${phase.label}: ${answered}/${count} answered`);
        },
      });
      running.assertAlive();
      const row = toRow(scenario, system.name, phase, r, running.peakRssMb(), peakRssMb(nats.pid), workerTimes);
      const cpu1 = [cpuMs(running.pid), cpuMs(nats.pid), cpuMs(worker.proc.pid)];
      const perRequest = (i: number): number | null => (cpu0[i] !== undefined && cpu1[i] !== undefined && r.requests > 0 ? round((cpu1[i] - cpu0[i]) / r.requests, 3) : null);
      row.cpu_ms_per_request = perRequest(0);
      row.nats_cpu_ms_per_request = perRequest(1);
      row.worker_cpu_ms_per_request = perRequest(2);
      if (scenario.idleMeasureMs) {
        row.consumers_after = await requestConsumers(nats.url).catch(() => null);
        log(`  ${row.consumers_after ?? "?"} consumers on INFER_REQ right after; measuring ${scenario.idleMeasureMs / 1_000} s idle`);
        row.idle_cpu_percent = round(await idleCpuPercent([running.pid, nats.pid], scenario.idleMeasureMs), 2);
        row.consumers_later = await requestConsumers(nats.url).catch(() => null);
        log(`  idle: ${row.idle_cpu_percent ?? "?"}% of a core (system + nats-server); ${row.consumers_later ?? "?"} consumers left`);
      }
      rows.push(row);
      log(
        `  ${phase.label}: ${row.throughput_rps.toFixed(0)} rps, p50 ${row.p50_ms ?? "-"} ms, p99 ${row.p99_ms ?? "-"} ms, ` +
          `lost ${row.lost}, dup ${row.duplicated}, err ${row.errors + row.send_errors}, sent at ${row.sent_rps.toFixed(0)}/s, ` +
          `CPU/request ${row.cpu_ms_per_request ?? "-"} ms (nats-server ${row.nats_cpu_ms_per_request ?? "-"} ms, worker ${row.worker_cpu_ms_per_request ?? "-"} ms)` +
          `${r.timedOut ? " (timed out waiting)" : ""}`,
      );
      if (phase.offeredRps === null && r.sentRps < 1.2 * r.throughputRps)
        log(`  note: the generator published at ${r.sentRps.toFixed(0)}/s, close to the rate served: the burst may be generator-bound`);
      if (plan.stopWhenSaturated && farPastCapacity(phase, r)) {
        const left = plan.phases.length - i - 1;
        if (left > 0) log(`  far past capacity at ${phase.label}: skipping the ${left} higher step(s)`);
        break;
      }
    }
    return rows;
  } finally {
    await target?.close();
    await running?.stop().catch((err: unknown) => log(`  stopping ${system.name}: ${(err as Error).message}`));
    await worker?.proc.stop();
    await stopNats(nats);
  }
}

interface BaselineRatio {
  /** sluice throughput / baseline throughput; bursts only (a rate-driven phase serves what is offered). */
  throughput: number | null;
  /** sluice p99 / baseline p99 (below 1: sluice's tail is shorter). */
  p99: number | null;
}

interface Summary {
  throughput_ratio_sluice_over_raw: Record<string, number | null>;
  /** Per baseline, per scenario (first phase; for load-sweep each step as `load-sweep/<phase>`). */
  sluice_over_baseline: Record<string, Record<string, BaselineRatio>>;
  gpu_sim: {
    /** max batch / (base + per item x max batch) */
    device_max_rps: number;
    /** The whole burst, first send to last answer. */
    sluice_share_of_max: number | null;
    /** The saturated stretch of the burst (10th to 90th percentile of answers). */
    sluice_steady_share_of_max: number | null;
    raw_share_of_max: number | null;
  } | null;
  low_load: {
    worker_single_request_ms: number;
    /** p50 minus the nominal single-request time. */
    p50_minus_worker_ms: Record<string, number | null>;
    /** p50 minus that run's worker called directly for one request (p50). */
    p50_minus_measured_worker_ms: Record<string, number | null>;
  } | null;
  load_sweep_highest_kept_up_rps: Record<string, number | null> | null;
  /** The mixed scenario: latency by priority, per system. */
  mixed_by_priority: Record<string, NonNullable<Row["by_priority"]>> | null;
  burst_100k_peak_rss_mb: Record<string, number | null> | null;
  /** The intake at many tenants: rate against one tenant, consumers, idle CPU; per-request CPU per scenario. */
  intake: {
    many_tenants_over_zero_cost: number | null;
    zero_cost_over_broker_echo: number | null;
    consumers_after: number | null;
    consumers_later: number | null;
    idle_cpu_percent: number | null;
    cpu_ms_per_request: Record<string, number | null>;
  } | null;
}

function summarize(rows: readonly Row[]): { summary: Summary; lines: string[] } {
  const lines: string[] = [];
  const first = (scenario: string, system: string): Row | undefined => rows.find((r) => r.scenario === scenario && r.system === system);
  const summary: Summary = {
    throughput_ratio_sluice_over_raw: {},
    sluice_over_baseline: {},
    gpu_sim: null,
    low_load: null,
    load_sweep_highest_kept_up_rps: null,
    mixed_by_priority: null,
    burst_100k_peak_rss_mb: null,
    intake: null,
  };

  {
    const many = first("many-tenants", "sluice");
    const zero = first("zero-cost", "sluice");
    const echo = first("zero-cost", "broker-echo");
    const ratio = (a: Row | undefined, b: Row | undefined): number | null => (a && b && b.throughput_rps > 0 ? round(a.throughput_rps / b.throughput_rps, 3) : null);
    const perRequest = Object.fromEntries(rows.filter((r) => r.system === "sluice" && r.offered_rps === null).map((r) => [r.scenario, r.cpu_ms_per_request ?? null]));
    if (many || echo || Object.keys(perRequest).length > 0) {
      summary.intake = {
        many_tenants_over_zero_cost: ratio(many, zero),
        zero_cost_over_broker_echo: ratio(zero, echo),
        consumers_after: many?.consumers_after ?? null,
        consumers_later: many?.consumers_later ?? null,
        idle_cpu_percent: many?.idle_cpu_percent ?? null,
        cpu_ms_per_request: perRequest,
      };
      const i = summary.intake;
      lines.push("intake:");
      lines.push(`  many-tenants / zero-cost (sluice)     ${i.many_tenants_over_zero_cost ?? "-"}x`);
      lines.push(`  zero-cost sluice / broker-echo        ${i.zero_cost_over_broker_echo ?? "-"}x`);
      lines.push(`  consumers on INFER_REQ after / later  ${i.consumers_after ?? "-"} / ${i.consumers_later ?? "-"}`);
      lines.push(`  idle CPU, pipeline + nats-server      ${i.idle_cpu_percent ?? "-"}% of a core`);
      lines.push(`  pipeline CPU per request (ms)         ${JSON.stringify(i.cpu_ms_per_request)}`);
    }
  }

  lines.push("throughput, sluice / jetstream-raw:");
  for (const s of SCENARIOS) {
    const a = first(s.name, "sluice");
    const b = first(s.name, "jetstream-raw");
    // A rate-driven phase serves what is offered: its throughput says nothing about the system.
    if (!a || !b || a.offered_rps !== null) continue;
    const ratio = b.throughput_rps > 0 ? a.throughput_rps / b.throughput_rps : null;
    summary.throughput_ratio_sluice_over_raw[s.name] = round(ratio, 3);
    lines.push(`  ${s.name.padEnd(12)} ${a.throughput_rps.toFixed(0)} / ${b.throughput_rps.toFixed(0)} rps = ${ratio === null ? "-" : ratio.toFixed(2)}x`);
  }

  const baselines = [...new Set(rows.map((r) => r.system))].filter((s) => s !== "sluice");
  if (baselines.length > 0 && rows.some((r) => r.system === "sluice")) lines.push("sluice / baseline, same phase (throughput for bursts; p99, below 1 = sluice shorter):");
  for (const base of baselines) {
    const per: Record<string, BaselineRatio> = {};
    for (const b of rows.filter((r) => r.system === base)) {
      const a = rows.find((r) => r.system === "sluice" && r.scenario === b.scenario && r.phase === b.phase);
      if (!a) continue;
      const key = b.offered_rps === null || b.scenario !== "load-sweep" ? b.scenario : `${b.scenario}/${b.phase}`;
      const throughput = b.offered_rps === null && b.throughput_rps > 0 ? a.throughput_rps / b.throughput_rps : null;
      const p99 = a.p99_ms !== null && b.p99_ms !== null && b.p99_ms > 0 ? a.p99_ms / b.p99_ms : null;
      per[key] = { throughput: round(throughput, 3), p99: round(p99, 3) };
      lines.push(
        `  vs ${base.padEnd(13)} ${key.padEnd(24)} ` +
          `rps ${throughput === null ? "-" : `${a.throughput_rps.toFixed(0)} / ${b.throughput_rps.toFixed(0)} = ${throughput.toFixed(2)}x`}` +
          `, p99 ${a.p99_ms ?? "-"} / ${b.p99_ms ?? "-"} ms${p99 === null ? "" : ` = ${p99.toFixed(2)}x`}`,
      );
    }
    summary.sluice_over_baseline[base] = per;
  }

  const gpu = SCENARIOS.find((s) => s.name === "gpu-sim")!;
  const max = deviceMaxRps(gpu.device, gpu.batch.maxSize);
  const gs = first("gpu-sim", "sluice");
  const gr = first("gpu-sim", "jetstream-raw");
  if (gs || gr) {
    const steadyShare = gs?.steady_rps ? gs.steady_rps / max : null;
    summary.gpu_sim = {
      device_max_rps: round(max, 1)!,
      sluice_share_of_max: gs ? round(gs.throughput_rps / max, 3) : null,
      sluice_steady_share_of_max: round(steadyShare, 3),
      raw_share_of_max: gr ? round(gr.throughput_rps / max, 3) : null,
    };
    lines.push(`gpu-sim device maximum = ${gpu.batch.maxSize} / (${gpu.device.baseMs} + ${gpu.device.perItemMs} x ${gpu.batch.maxSize}) ms = ${max.toFixed(0)} rps:`);
    if (gs) lines.push(`  sluice        ${gs.throughput_rps.toFixed(0)} rps = ${((gs.throughput_rps / max) * 100).toFixed(0)}% of the device maximum (whole burst, ramp and drain included)`);
    if (gs?.steady_rps)
      lines.push(
        `  sluice        ${gs.steady_rps.toFixed(0)} rps while saturated (10th-90th percentile of answers) = ${(steadyShare! * 100).toFixed(0)}% ` +
          `(above 100%: the simulated device's timers fire up to 1 ms early)`,
      );
    if (gr)
      lines.push(
        `  jetstream-raw ${gr.throughput_rps.toFixed(0)} rps = ${((gr.throughput_rps / max) * 100).toFixed(0)}% ` +
          `(batch of one: at most ${(1_000 / deviceSingleMs(gpu.device)).toFixed(0)} rps)`,
      );
  }

  const mixed = rows.filter((r) => r.scenario === "mixed" && r.by_priority);
  if (mixed.length > 0) {
    summary.mixed_by_priority = {};
    lines.push("mixed (3 models, priorities 10% high / 60% normal / 30% low), p50 / p99 ms by priority:");
    const fmt = (x: { p50_ms: number | null; p99_ms: number | null } | undefined): string => (x ? `${x.p50_ms ?? "-"} / ${x.p99_ms ?? "-"}` : "-");
    for (const r of mixed) {
      summary.mixed_by_priority[r.system] = r.by_priority!;
      const b = r.by_priority!;
      lines.push(`  ${r.system.padEnd(13)} high ${fmt(b.high)}   normal ${fmt(b.normal)}   low ${fmt(b.low)}`);
    }
  }

  const low = SCENARIOS.find((s) => s.name === "low-load")!;
  const single = deviceSingleMs(low.device);
  const lows = rows.filter((r) => r.scenario === "low-load");
  if (lows.length > 0) {
    summary.low_load = { worker_single_request_ms: single, p50_minus_worker_ms: {}, p50_minus_measured_worker_ms: {} };
    lines.push(`low-load p50 minus the worker's own time for one request (nominal ${single} ms; measured: that run's worker called directly, p50):`);
    for (const r of lows) {
      const over = r.p50_ms === null ? null : r.p50_ms - single;
      const overMeasured = r.p50_ms === null || r.worker_single_ms === null ? null : r.p50_ms - r.worker_single_ms;
      summary.low_load.p50_minus_worker_ms[r.system] = round(over, 2);
      summary.low_load.p50_minus_measured_worker_ms[r.system] = round(overMeasured, 2);
      lines.push(
        `  ${r.system.padEnd(13)} p50 ${r.p50_ms ?? "-"} ms -> +${over === null ? "-" : over.toFixed(2)} ms over nominal` +
          (overMeasured === null ? "" : `, +${overMeasured.toFixed(2)} ms over the worker's measured ${r.worker_single_ms} ms`),
      );
    }
  }

  const sweep = rows.filter((r) => r.scenario === "load-sweep");
  if (sweep.length > 0) {
    summary.load_sweep_highest_kept_up_rps = {};
    lines.push(`load-sweep, highest step kept up with (>= ${KEPT_UP_SHARE * 100}% served, p99 <= ${KEPT_UP_P99_MS} ms):`);
    for (const system of [...new Set(sweep.map((r) => r.system))]) {
      const ok = sweep.filter(
        (r) =>
          r.system === system &&
          r.offered_rps !== null &&
          r.lost === 0 &&
          r.throughput_rps >= KEPT_UP_SHARE * r.offered_rps &&
          r.p99_ms !== null &&
          r.p99_ms <= KEPT_UP_P99_MS,
      );
      const best = ok.length > 0 ? Math.max(...ok.map((r) => r.offered_rps!)) : null;
      summary.load_sweep_highest_kept_up_rps[system] = best;
      lines.push(`  ${system.padEnd(13)} ${best === null ? "none" : `${best} rps`}`);
    }
  }

  const big = rows.filter((r) => r.scenario === "burst-100k");
  if (big.length > 0) {
    summary.burst_100k_peak_rss_mb = {};
    lines.push("burst-100k peak RSS (system process; nats-server holds the backlog):");
    for (const r of big) {
      summary.burst_100k_peak_rss_mb[r.system] = r.peak_rss_mb;
      const zero = first("zero-cost", r.system);
      lines.push(
        `  ${r.system.padEnd(13)} ${r.peak_rss_mb ?? "-"} MB` +
          (zero?.peak_rss_mb ? ` (zero-cost run: ${zero.peak_rss_mb} MB, ${zero.requests} requests)` : "") +
          `; nats-server ${r.nats_peak_rss_mb ?? "-"} MB`,
      );
    }
  }
  return { summary, lines };
}

function sweepSeries(rows: readonly Row[]): SweepSeries[] {
  const sweep = rows.filter((r) => r.offered_rps !== null && r.scenario === "load-sweep");
  return [...new Set(sweep.map((r) => r.system))].map((system) => ({
    system,
    points: sweep
      .filter((r) => r.system === system)
      .map((r) => ({ offered: r.offered_rps!, p50: r.p50_ms ?? Number.NaN, p99: r.p99_ms ?? Number.NaN, throughput: r.throughput_rps })),
  }));
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      scenario: { type: "string", multiple: true },
      system: { type: "string", multiple: true },
      quick: { type: "boolean", default: false },
      requests: { type: "string" },
      "max-minutes": { type: "string" },
      out: { type: "string" },
      list: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
  });
  if (values.help || values.list) {
    console.log(usage());
    return 0;
  }
  const quick = values.quick === true;
  const requests = values.requests !== undefined ? Number(values.requests) : undefined;
  if (requests !== undefined && (!Number.isInteger(requests) || requests < 1)) throw new Error(`--requests must be a positive integer, got '${values.requests}'`);
  // Scenario `payloads` (large bodies through the object store) runs on its own: test/bench/payloads.ts.
  if (values.scenario?.length === 1 && values.scenario[0] === "payloads") {
    return runPayloadsBench({ quick, outDir: values.out ?? join(ROOT, "bench", "results"), log });
  }
  const unknown = (values.scenario ?? []).filter((n) => n !== CHAT_PREFIX_SCENARIO && n !== HTTP_SCENARIO.name && !EXTRA_SCENARIOS.some((s) => s.name === n) && !SCENARIOS.some((s) => s.name === n));
  if (unknown.length > 0) throw new Error(`unknown scenario(s) ${unknown.join(", ")}\n${usage()}`);
  const unknownSys = (values.system ?? []).filter((n) => !SYSTEMS.some((s) => s.name === n) && !CHAT_PREFIX_SYSTEMS.some((s) => s.name === n));
  if (unknownSys.length > 0) throw new Error(`unknown system(s) ${unknownSys.join(", ")}\n${usage()}`);
  const maxMinutes = Number(values["max-minutes"] ?? (quick ? QUICK_MAX_MINUTES : DEFAULT_MAX_MINUTES));
  const outDir = values.out ?? join(ROOT, "bench", "results");

  // The benchmark stops by itself, whatever hangs.
  const watchdog = setTimeout(() => {
    log(`gave up after ${maxMinutes} minutes (--max-minutes); stopping everything`);
    void stopAll().finally(() => process.exit(2));
  }, maxMinutes * 60_000);
  watchdog.unref();

  const explicit = values.scenario !== undefined;
  const scenarios = SCENARIOS.filter((s) => (explicit ? values.scenario!.includes(s.name) : !(quick && s.skipInQuick)));
  const systems = SYSTEMS.filter((s) => values.system === undefined || values.system.includes(s.name));
  const natsVersion = natsServerVersion();
  const machine = {
    cores: cpus().length,
    memory_gb: Math.round((totalmem() / 2 ** 30) * 10) / 10,
    node: process.version,
    nats_server: natsVersion,
    /** Load average when the run began: other work on the machine skews every number. */
    load_avg_1m: Math.round(loadavg()[0]! * 100) / 100,
  };
  log(`machine: ${machine.cores} cores, ${machine.memory_gb} GB, node ${machine.node}, nats-server ${machine.nats_server}${quick ? " (quick)" : ""}`);
  if (machine.load_avg_1m > machine.cores / 2)
    log(`warning: load average ${machine.load_avg_1m} on ${machine.cores} cores before the run; other processes will skew the numbers`);

  log(`compiling the systems to ${BUILD} (each runs as compiled JavaScript, as deployed)`);
  buildForBench();

  const rows: Row[] = [];
  const failures: Failure[] = [];
  const skipped: Array<{ scenario: string; system: string; reason: string }> = [];
  // A baseline whose broker is not there is left out, with the reason, instead of failing.
  const unavailable = new Map<string, string>();
  for (const system of systems) {
    const why = await system.unavailable?.().catch((err: unknown) => `availability check failed: ${(err as Error).message}`);
    if (why) {
      unavailable.set(system.name, why);
      log(`${system.name}: skipped in every scenario: ${why}`);
    }
  }
  const startedAt = Date.now();
  for (const scenario of scenarios) {
    const plan = scenario.plan({ quick, ...(requests !== undefined ? { requests } : {}) });
    for (const system of systems) {
      const reason = unavailable.get(system.name) ?? scenario.skipSystem?.(system.name, plan, rows);
      if (reason) {
        log(`${scenario.name} / ${system.name}: skipped: ${reason}`);
        skipped.push({ scenario: scenario.name, system: system.name, reason });
        continue;
      }
      log(`${scenario.name} / ${system.name}`);
      const runStarted = Date.now();
      try {
        rows.push(...(await runSystem(scenario, plan, system, quick)));
        log(`  done in ${((Date.now() - runStarted) / 1_000).toFixed(1)} s (start and stop included)`);
      } catch (err) {
        const msg = (err as Error)?.stack ?? String(err);
        log(`${scenario.name} / ${system.name} failed: ${msg}`);
        failures.push({ scenario: scenario.name, system: system.name, error: (err as Error)?.message ?? String(err) });
      }
    }
  }
  // chat-prefix compares routing policies inside sluice on simulated LLM workers (chat-prefix.ts).
  let chatRows: ChatPrefixRow[] = [];
  if (explicit ? values.scenario!.includes(CHAT_PREFIX_SCENARIO) : true) {
    log(CHAT_PREFIX_SCENARIO);
    try {
      chatRows = await runChatPrefix({ quick, ...(values.system ? { systems: values.system } : {}), log });
    } catch (err) {
      log(`${CHAT_PREFIX_SCENARIO} failed: ${(err as Error)?.message ?? String(err)}`);
      failures.push({ scenario: CHAT_PREFIX_SCENARIO, system: "*", error: (err as Error)?.message ?? String(err) });
    }
  }
  let http: HttpBenchResult | undefined;
  if (!explicit || values.scenario!.includes(HTTP_SCENARIO.name)) {
    log(`${HTTP_SCENARIO.name} / sluice: gateway against the NATS client`);
    try {
      http = await runHttpScenario(quick, log);
    } catch (err) {
      log(`${HTTP_SCENARIO.name} failed: ${(err as Error)?.stack ?? String(err)}`);
      failures.push({ scenario: HTTP_SCENARIO.name, system: "sluice", error: (err as Error)?.message ?? String(err) });
    }
  }
  // Scenarios that measure sluice against itself (cache, token-fair): when sluice is selected.
  const extraSummary: Record<string, unknown> = {};
  const extraLines: string[] = [];
  if (systems.some((s) => s.name === "sluice")) {
    for (const scenario of EXTRA_SCENARIOS.filter((s) => !explicit || values.scenario!.includes(s.name))) {
      log(`${scenario.name} / sluice`);
      try {
        const r = await scenario.run({ quick, log });
        rows.push(...r.rows);
        extraSummary[scenario.name] = r.summary;
        extraLines.push(...r.lines);
      } catch (err) {
        log(`${scenario.name} failed: ${(err as Error)?.stack ?? String(err)}`);
        failures.push({ scenario: scenario.name, system: "sluice", error: (err as Error)?.message ?? String(err) });
      }
    }
  }
  const elapsedS = (Date.now() - startedAt) / 1_000;

  console.log("");
  console.log(renderTable(rows));
  console.log("");
  const { summary, lines } = summarize(rows);
  console.log([...lines, ...extraLines].join("\n"));
  const chatLines = chatPrefixSummary(chatRows);
  if (chatLines.length > 0) console.log(chatLines.join("\n"));
  if (http)
    console.log(
      `http: gateway p50 at low load ${http.low_load.http_p50_ms} ms vs NATS client ${http.low_load.nats_p50_ms} ms (+${http.low_load.http_minus_nats_p50_ms} ms); ` +
        `throughput gateway/client ${http.throughput.http_over_nats} (${http.throughput.http_rps}/s vs ${http.throughput.nats_rps}/s at ${http.throughput.concurrency} in flight); errors ${http.errors}`,
    );
  for (const s of skipped) console.log(`skipped ${s.scenario} / ${s.system}: ${s.reason}`);
  for (const f of failures) console.log(`FAILED ${f.scenario} / ${f.system}: ${f.error.split("\n")[0]}`);
  console.log(
    `\n${machine.cores} cores, ${machine.memory_gb} GB, node ${machine.node}, nats-server ${machine.nats_server}; ` +
      `load average ${machine.load_avg_1m} at start (${loadavg()[0]!.toFixed(2)} at end); ${elapsedS.toFixed(0)} s`,
  );

  await mkdir(outDir, { recursive: true });
  const sweepScenario = SCENARIOS.find((s) => s.name === "load-sweep")!;
  const result = {
    date: new Date().toISOString(),
    machine,
    quick,
    elapsed_s: Math.round(elapsedS),
    scenarios: scenarios.map((s) => ({
      name: s.name,
      description: s.description,
      device: { base_ms: s.device.baseMs, per_item_ms: s.device.perItemMs },
      batch: { max_size: s.batch.maxSize, max_delay_ms: s.batch.maxDelayMs },
    })),
    systems: systems.map((s) => ({ name: s.name, description: s.description })),
    rows: [...rows, ...chatRows],
    summary: { ...summary, ...extraSummary, ...(chatLines.length > 0 ? { chat_prefix: chatLines } : {}) },
    ...(http ? { http } : {}),
    skipped,
    failures,
  };
  await writeFile(join(outDir, "latest.json"), JSON.stringify(result, null, 2) + "\n");
  await writeFile(
    join(outDir, "latency-vs-load.svg"),
    renderLatencySvg({
      title: "sluice: latency against offered load",
      subtitle: `load-sweep: device ${sweepScenario.device.baseMs} ms + ${sweepScenario.device.perItemMs} ms/item, batches <= ${sweepScenario.batch.maxSize}; ${machine.cores} cores, ${new Date().toISOString().slice(0, 10)}`,
      series: sweepSeries(rows),
      deviceMaxRps: deviceMaxRps(sweepScenario.device, sweepScenario.batch.maxSize),
      deviceSingleMs: deviceSingleMs(sweepScenario.device),
    }) + "\n",
  );
  console.log(`wrote ${join(outDir, "latest.json")} and ${join(outDir, "latency-vs-load.svg")}`);
  clearTimeout(watchdog);
  return failures.length > 0 ? 1 : 0;
}

let exiting = false;
const shutdown = (signal: NodeJS.Signals): void => {
  if (exiting) return;
  exiting = true;
  log(`${signal}: stopping everything`);
  void stopAll().finally(() => process.exit(130));
};
process.once("SIGINT", shutdown);
process.once("SIGTERM", shutdown);
// Whatever path leads out, no child outlives the benchmark.
process.on("exit", killAllNow);

main()
  .catch((err: unknown): number => {
    log(`failed: ${err instanceof NatsServerMissingError ? err.message : ((err as Error)?.stack ?? String(err))}`);
    return 1;
  })
  .then(async (code) => {
    await stopAll();
    process.exit(code);
  })
  .catch(() => process.exit(1));
