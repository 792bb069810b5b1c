/**
 * Soak test: a dev-like stack (a local nats-server, a simulated worker and the pipeline, all of
 * it on loopback, the models of `sluice dev`) under steady load for a bounded time, watching
 * this process for leaks. The simulated engine keeps only a short call log here (`sluice dev`
 * keeps the last 100,000 calls, which would read as growth for the first 100,000 batches).
 *
 *   node --import tsx scripts/soak.ts [--seconds 60] [--rate 200] [--every 5]
 *
 * Every few seconds it prints RSS, heap used (after a full GC), the number of active handles
 * (process.getActiveResourcesInfo()) and the traffic so far; at the end the growth per minute of
 * each, fitted over the samples after warm-up. It exits 1 on clear growth (a steady upward trend
 * beyond the thresholds below), 2 when requests failed, 0 otherwise.
 */
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { parseArgs } from "node:util";
import { setTimeout as delay } from "node:timers/promises";
import { InferenceClient } from "../pipeline/client/client.js";
import { loadConfig } from "../pipeline/config.js";
import { DEV_MODELS } from "../pipeline/dev/dev.js";
import { NatsServer } from "../pipeline/dev/nats-server.js";
import { PipelineService } from "../pipeline/service.js";
import { silentLogger } from "../pipeline/support/logger.js";
import { SimulatedEngine } from "../worker/engines/simulated.js";
import { WorkerServer } from "../worker/server.js";

/** Longest soak allowed (a guard against a typo running for days). */
const MAX_SECONDS = 6 * 3600;
/** Requests in flight at once, whatever the rate. */
const MAX_IN_FLIGHT = 256;
/** Samples taken before this fraction of the run are warm-up and not fitted. */
const WARMUP_FRACTION = 0.25;
/** Growth per minute above which a steady trend is a leak. */
const HEAP_MB_PER_MIN = 1;
const RSS_MB_PER_MIN = 8;
const HANDLES_PER_MIN = 5;
/** How well the trend must fit (R²) to count as steady rather than noise. */
const MIN_R2 = 0.6;

interface Sample {
  tSec: number;
  rssMb: number;
  heapMb: number;
  handles: number;
}

function options(): { seconds: number; rate: number; every: number } {
  const { values } = parseArgs({
    options: { seconds: { type: "string" }, rate: { type: "string" }, every: { type: "string" }, help: { type: "boolean", short: "h" } },
    strict: true,
  });
  if (values.help) {
    console.log("usage: node --import tsx scripts/soak.ts [--seconds N (60)] [--rate REQ_PER_S (200)] [--every SAMPLE_S (5)]");
    process.exit(0);
  }
  const num = (v: string | undefined, dflt: number, name: string, max: number): number => {
    if (v === undefined) return dflt;
    const n = Number(v);
    if (!Number.isFinite(n) || n <= 0 || n > max) throw new Error(`--${name} must be a number in (0, ${max}], got '${v}'`);
    return n;
  };
  return { seconds: num(values.seconds, 60, "seconds", MAX_SECONDS), rate: num(values.rate, 200, "rate", 10_000), every: num(values.every, 5, "every", 600) };
}

setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

function sample(startedAt: number): Sample {
  gc();
  gc();
  const m = process.memoryUsage();
  return {
    tSec: (Date.now() - startedAt) / 1000,
    rssMb: m.rss / 1024 / 1024,
    heapMb: m.heapUsed / 1024 / 1024,
    handles: process.getActiveResourcesInfo().length,
  };
}

/** Least-squares slope (per second) and R² of y over x. */
function fit(xs: number[], ys: number[]): { slope: number; r2: number } {
  const n = xs.length;
  if (n < 3) return { slope: 0, r2: 0 };
  const mx = xs.reduce((a, b) => a + b, 0) / n;
  const my = ys.reduce((a, b) => a + b, 0) / n;
  let sxy = 0;
  let sxx = 0;
  let syy = 0;
  for (let i = 0; i < n; i++) {
    const dx = xs[i]! - mx;
    const dy = ys[i]! - my;
    sxy += dx * dy;
    sxx += dx * dx;
    syy += dy * dy;
  }
  if (sxx === 0) return { slope: 0, r2: 0 };
  const slope = sxy / sxx;
  const r2 = syy === 0 ? 0 : (sxy * sxy) / (sxx * syy);
  return { slope, r2 };
}

/** nats-server + simulated worker + pipeline, as `sluice dev` runs them, with a short call log. */
class DevLikeStack {
  private constructor(
    readonly nats: NatsServer,
    readonly engine: SimulatedEngine,
    readonly worker: WorkerServer,
    readonly pipeline: PipelineService,
  ) {}

  static async start(): Promise<DevLikeStack> {
    const nats = await NatsServer.start();
    const engine = new SimulatedEngine({ base_ms: 2, per_item_ms: 0.05, call_log_limit: 100 });
    let worker: WorkerServer | undefined;
    try {
      worker = await WorkerServer.start({ engine, workerId: "soak-worker" });
      const endpoint = worker.endpoint;
      const config = loadConfig({
        env: {},
        overrides: {
          servers: [nats.url],
          models: DEV_MODELS,
          workers: Object.keys(DEV_MODELS).map((model) => ({ model, version: "v1", endpoint })),
        },
      });
      const pipeline = await PipelineService.start(config, { logger: silentLogger });
      return new DevLikeStack(nats, engine, worker, pipeline);
    } catch (err) {
      await worker?.stop();
      await engine.close();
      await nats.stop();
      throw err;
    }
  }

  async stop(): Promise<void> {
    await this.pipeline.stop(2_000);
    await this.worker.stop();
    await this.engine.close();
    await this.nats.stop();
  }
}

async function main(): Promise<number> {
  const opts = options();
  console.log(`soak: ${opts.seconds} s at ${opts.rate} req/s, a sample every ${opts.every} s (dev stack on loopback)`);
  const stack = await DevLikeStack.start();
  const client = await InferenceClient.connect({ servers: stack.nats.url, tenant: "soak" });
  const startedAt = Date.now();
  const endAt = startedAt + opts.seconds * 1000;
  const samples: Sample[] = [];
  let sent = 0;
  let ok = 0;
  let failed = 0;
  const inflight = new Set<Promise<void>>();
  const models = ["echo", "reverse", "upper"];

  const sampler = (async () => {
    let next = startedAt;
    while (Date.now() < endAt) {
      const s = sample(startedAt);
      samples.push(s);
      console.log(
        `t=${s.tSec.toFixed(0).padStart(5)}s rss=${s.rssMb.toFixed(1)}MB heap=${s.heapMb.toFixed(1)}MB handles=${s.handles} sent=${sent} ok=${ok} failed=${failed} inflight=${inflight.size}`,
      );
      next += opts.every * 1000;
      await delay(Math.max(0, Math.min(next, endAt) - Date.now()));
    }
  })();

  try {
    // Steady load: one request every 1/rate seconds, bounded in flight and in time.
    const intervalMs = 1000 / opts.rate;
    let due = Date.now();
    while (Date.now() < endAt) {
      due += intervalMs;
      const wait = due - Date.now();
      if (wait > 0) await delay(wait);
      if (inflight.size >= MAX_IN_FLIGHT) await Promise.race(inflight);
      const i = sent++;
      const p = client
        .infer(models[i % models.length]!, { prompt: `soak ${i}` }, { timeoutMs: 30_000 })
        .then(
          () => void ok++,
          () => void failed++,
        )
        .finally(() => inflight.delete(p));
      inflight.add(p);
    }
    await sampler;
    // Drain what is still in flight (bounded by the request timeout), then the last sample,
    // taken while the stack still runs so that it compares with the others.
    await Promise.all(inflight);
    samples.push(sample(startedAt));
  } finally {
    await client.close();
    await stack.stop();
  }

  const fitted = samples.filter((s) => s.tSec >= opts.seconds * WARMUP_FRACTION);
  const xs = fitted.map((s) => s.tSec);
  const trend = (ys: number[]): { perMin: number; r2: number } => {
    const f = fit(xs, ys);
    return { perMin: f.slope * 60, r2: f.r2 };
  };
  const heap = trend(fitted.map((s) => s.heapMb));
  const rss = trend(fitted.map((s) => s.rssMb));
  const handles = trend(fitted.map((s) => s.handles));
  console.log(`done: sent=${sent} ok=${ok} failed=${failed} (${(ok / Math.max(1, (Date.now() - startedAt) / 1000)).toFixed(0)} ok/s)`);
  console.log(`growth per minute after warm-up (${fitted.length} samples):`);
  console.log(`  heap    ${heap.perMin >= 0 ? "+" : ""}${heap.perMin.toFixed(2)} MB/min   (R²=${heap.r2.toFixed(2)}, limit ${HEAP_MB_PER_MIN})`);
  console.log(`  rss     ${rss.perMin >= 0 ? "+" : ""}${rss.perMin.toFixed(2)} MB/min   (R²=${rss.r2.toFixed(2)}, limit ${RSS_MB_PER_MIN})`);
  console.log(`  handles ${handles.perMin >= 0 ? "+" : ""}${handles.perMin.toFixed(2)} /min     (R²=${handles.r2.toFixed(2)}, limit ${HANDLES_PER_MIN})`);

  const leaks: string[] = [];
  if (fitted.length >= 3) {
    if (heap.perMin > HEAP_MB_PER_MIN && heap.r2 >= MIN_R2) leaks.push("heap");
    if (rss.perMin > RSS_MB_PER_MIN && rss.r2 >= MIN_R2) leaks.push("rss");
    if (handles.perMin > HANDLES_PER_MIN && handles.r2 >= MIN_R2) leaks.push("handles");
  } else {
    console.log("  (too few samples after warm-up to judge growth: run longer or sample more often)");
  }
  if (leaks.length > 0) {
    console.log(`FAIL: steady growth of ${leaks.join(", ")}`);
    return 1;
  }
  if (failed > 0) {
    console.log(`FAIL: ${failed} requests failed`);
    return 2;
  }
  console.log("OK: no clear growth");
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(`soak: ${(err as Error)?.stack ?? String(err)}`);
    process.exit(3);
  },
);
