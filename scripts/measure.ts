/**
 * Focused measurements reported in the issue notes (ratios within one run; the machine is
 * noisy): registry propagation, time to first token added by the pipeline, and throughput with
 * tracing on (100% sampling) against off. Everything runs on loopback with its own nats-server.
 *
 *   node --import tsx scripts/measure.ts [registry] [ttft] [tracing]
 *   (SLUICE_LANES=0 measures with tenant lanes off)
 */
import { InferenceClient } from "../pipeline/client/client.js";
import { loadConfig } from "../pipeline/config.js";
import { NatsServer } from "../pipeline/dev/nats-server.js";
import { PipelineService } from "../pipeline/service.js";
import { silentLogger } from "../pipeline/support/logger.js";
import { SERVICE_PIPELINE, startTracing } from "../pipeline/telemetry/telemetry.js";
import { SimulatedEngine } from "../worker/engines/simulated.js";
import { WorkerServer } from "../worker/server.js";
import { OtlpReceiver } from "../test/support/otlp-receiver.js";
import { connect } from "@nats-io/transport-node";

const pct = (xs: number[], p: number): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? NaN;
};
const f = (n: number): string => n.toFixed(2);

async function stack(opts: { ttft_ms?: number; token_interval_ms?: number; base_ms?: number; per_item_ms?: number; tracesEndpoint?: string } = {}) {
  const nats = await NatsServer.start();
  const engine = new SimulatedEngine({ base_ms: opts.base_ms ?? 0, per_item_ms: opts.per_item_ms ?? 0, ttft_ms: opts.ttft_ms ?? 20, token_interval_ms: opts.token_interval_ms ?? 5, capacity: 256 });
  const worker = await WorkerServer.start({ engine });
  const config = loadConfig({
    env: {},
    overrides: {
      servers: [nats.url],
      telemetry: { metricsPort: -1 },
      pipeline: { tenantLanes: process.env["SLUICE_LANES"] !== "0" },
      models: { m: { versions: { v1: { weight: 100 }, v2: { weight: 0 } } }, gen: { versions: { v1: { weight: 100 } }, generate: true } },
      workers: [
        { model: "m", version: "v1", endpoint: worker.endpoint, capacity: 256 },
        { model: "m", version: "v2", endpoint: worker.endpoint, capacity: 256 },
        { model: "gen", version: "v1", endpoint: worker.endpoint, capacity: 256 },
      ],
    },
  });
  const tracing = opts.tracesEndpoint ? startTracing({ serviceName: SERVICE_PIPELINE, tracesEndpoint: opts.tracesEndpoint, sampler: "always_on" }) : undefined;
  const pipeline = await PipelineService.start(config, { logger: silentLogger, ...(tracing ? { tracing } : {}) });
  const nc = await connect({ servers: nats.url });
  const client = new InferenceClient(nc, "measure");
  return {
    pipeline,
    client,
    stop: async () => {
      await client.close();
      await nc.close();
      await pipeline.stop(1_000);
      await tracing?.shutdown();
      await worker.stop();
      await engine.close();
      await nats.stop();
    },
  };
}

async function registry(): Promise<void> {
  const s = await stack();
  const times: number[] = [];
  for (let i = 0; i < 60; i++) {
    const rev = s.pipeline.registry.table.revision;
    const [a, b] = i % 2 === 0 ? [0, 100] : [100, 0];
    const t0 = performance.now();
    await s.pipeline.registry.kv.put("m", JSON.stringify({ versions: { v1: { weight: a }, v2: { weight: b } } }));
    while (s.pipeline.registry.table.revision === rev) await new Promise((r) => setImmediate(r));
    times.push(performance.now() - t0);
  }
  console.log(`registry: KV write to routing by it (n=60): p50 ${f(pct(times, 50))} ms, p99 ${f(pct(times, 99))} ms, max ${f(Math.max(...times))} ms`);
  await s.stop();
}

async function ttft(): Promise<void> {
  const engineTtft = 20;
  const s = await stack({ ttft_ms: engineTtft, token_interval_ms: 5 });
  const one = async (i: number): Promise<number> => {
    const t0 = performance.now();
    for await (const ev of s.client.stream("gen", { prompt: `a b c d e f ${i}` })) {
      // The first chunk is what is measured; leaving the loop cancels the rest of the generation.
      if ("text" in ev) return performance.now() - t0;
    }
    return NaN;
  };
  // Warm up.
  await Promise.all(Array.from({ length: 20 }, (_, i) => one(i)));
  const low: number[] = [];
  for (let i = 0; i < 50; i++) low.push(await one(i));
  const high: number[] = [];
  for (let r = 0; r < 3; r++) high.push(...(await Promise.all(Array.from({ length: 100 }, (_, i) => one(i)))));
  console.log(
    `ttft: engine's own ${engineTtft} ms; through the pipeline at concurrency 1: p50 ${f(pct(low, 50))} ms (+${f(pct(low, 50) - engineTtft)}), p99 ${f(pct(low, 99))} ms (+${f(pct(low, 99) - engineTtft)}); ` +
      `at concurrency 100: p50 ${f(pct(high, 50))} ms (+${f(pct(high, 50) - engineTtft)}), p99 ${f(pct(high, 99))} ms (+${f(pct(high, 99) - engineTtft)})`,
  );
  await s.stop();
}

async function burst(s: Awaited<ReturnType<typeof stack>>, n: number): Promise<number> {
  const t0 = performance.now();
  const inflight = new Set<Promise<unknown>>();
  for (let i = 0; i < n; i++) {
    const p = s.client.infer("m", { prompt: `p${i}` }).finally(() => inflight.delete(p));
    inflight.add(p);
    if (inflight.size >= 2_000) await Promise.race(inflight);
  }
  await Promise.all(inflight);
  return n / ((performance.now() - t0) / 1000);
}

async function tracing(): Promise<void> {
  const receiver = await OtlpReceiver.start();
  const rates: Record<string, number[]> = { off: [], on: [], unreachable: [] };
  for (let round = 0; round < 2; round++) {
    for (const mode of ["off", "on", "unreachable"] as const) {
      const endpoint = mode === "on" ? `${receiver.url}/v1/traces` : mode === "unreachable" ? "http://127.0.0.1:9/v1/traces" : undefined;
      const s = await stack(endpoint ? { tracesEndpoint: endpoint } : {});
      await burst(s, 500);
      rates[mode]!.push(await burst(s, 5_000));
      await s.stop();
    }
  }
  const best = (xs: number[]): number => Math.max(...xs);
  console.log(
    `tracing: 5,000-request bursts, zero-cost worker, best of 2: off ${best(rates.off!).toFixed(0)} rps, on (100% sampled, exported) ${best(rates.on!).toFixed(0)} rps (${(best(rates.on!) / best(rates.off!)).toFixed(2)}x), ` +
      `collector unreachable ${best(rates.unreachable!).toFixed(0)} rps (${(best(rates.unreachable!) / best(rates.off!)).toFixed(2)}x); spans received ${receiver.spans().length}`,
  );
  await receiver.stop();
}

const which = process.argv.slice(2);
const all = which.length === 0;
if (all || which.includes("registry")) await registry();
if (all || which.includes("ttft")) await ttft();
if (all || which.includes("tracing")) await tracing();
process.exit(0);
