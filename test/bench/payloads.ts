/**
 * Scenario `payloads` (`npm run bench -- --scenario payloads`): request and result bodies of
 * 1, 4 and 16 MB through the claim check, against nats-server's own object store in the same
 * run. For each size:
 * - baseline: one object store put and one get of the body, straight from this process (the
 *   least a body of that size costs through the store), MB/s = size / (put + get time);
 * - sluice: `infer()` of an echo model through `sluice serve` (the body goes client → store →
 *   pipeline → worker → pipeline → store → client: two puts and two gets of it), MB/s = size /
 *   round trip, one at a time and four at once;
 * - the pipeline's peak RSS (VmHWM) after each size, and at rest before the first.
 */
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { connect } from "@nats-io/transport-node";
import { jetstream } from "@nats-io/jetstream";
import { Objm, StorageType } from "@nats-io/obj";
import { InferenceClient } from "../../pipeline/client/client.js";
import { buildForBench, compiled, makeTempDir, peakRssMb, spawnNode, startNats, startWorkerProcess, stopAll } from "./procs.js";

const MB = 1024 * 1024;

export interface PayloadsRow {
  size_mb: number;
  baseline_put_get_mb_s: number;
  sluice_sequential_mb_s: number;
  sluice_concurrent4_mb_s: number;
  /** sluice one at a time / baseline: the share of the store's own rate a round trip gets. */
  ratio_sequential: number;
  pipeline_peak_rss_mb: number | undefined;
}

const body = (bytes: number, seed: number): string => "x".repeat(bytes - 8) + String(seed).padStart(8, "0");

export async function runPayloadsBench(opts: { quick: boolean; outDir: string; log: (m: string) => void }): Promise<number> {
  const { log } = opts;
  const sizes = [1, 4, 16];
  const rounds = opts.quick ? 2 : 5;
  log("payloads: compiling the pipeline");
  buildForBench();
  const nats = await startNats();
  try {
    const worker = await startWorkerProcess({ baseMs: 0, perItemMs: 0 });
    const dir = await makeTempDir("sluice-bench-payloads-");
    const configFile = join(dir, "sluice.json");
    await writeFile(
      configFile,
      JSON.stringify({
        telemetry: { metricsPort: -1 },
        models: { echo: { versions: { v1: { weight: 100 } }, batch: { max_size: 4, max_delay_ms: 1 }, timeout_ms: 120_000 } },
        workers: [{ model: "echo", version: "v1", endpoint: worker.endpoint, capacity: 4 }],
        payloads: { sweepIntervalMs: 0 },
      }),
    );
    const pipeline = spawnNode("sluice serve", [compiled("pipeline/cli.ts"), "serve", "--config", configFile, "--server", nats.url]);
    await pipeline.waitFor(/sluice serve ready/);
    const nc = await connect({ servers: nats.url, name: "bench-payloads" });
    const client = new InferenceClient(nc, "bench");
    const os = await new Objm(jetstream(nc)).create("bench_baseline", { storage: StorageType.File });
    const restRss = peakRssMb(pipeline.pid);
    log(`payloads: pipeline at rest, peak RSS ${restRss?.toFixed(0)} MB`);
    const rows: PayloadsRow[] = [];
    let seed = 0;
    for (const size of sizes) {
      const bytes = size * MB;
      const text = body(bytes, 0);
      const data = new TextEncoder().encode(text);
      // Warm up both paths once.
      await os.putBlob({ name: "warm" }, data);
      await os.getBlob("warm");
      await client.infer("echo", { prompt: body(bytes, ++seed) }, { timeoutMs: 300_000 });

      let storeMs = 0;
      for (let i = 0; i < rounds; i++) {
        const t0 = performance.now();
        await os.putBlob({ name: `b${i}` }, data);
        const back = await os.getBlob(`b${i}`);
        storeMs += performance.now() - t0;
        if (back?.length !== data.length) throw new Error("baseline object came back of another size");
      }
      let seqMs = 0;
      for (let i = 0; i < rounds; i++) {
        const prompt = body(bytes, ++seed);
        const t0 = performance.now();
        const r = await client.infer("echo", { prompt }, { timeoutMs: 300_000 });
        seqMs += performance.now() - t0;
        if (r.output?.text !== prompt) throw new Error("sluice result differs from its prompt");
      }
      const t1 = performance.now();
      await Promise.all(
        Array.from({ length: 4 }, async () => {
          const prompt = body(bytes, ++seed);
          const r = await client.infer("echo", { prompt }, { timeoutMs: 300_000 });
          if (r.output?.text !== prompt) throw new Error("sluice result differs from its prompt");
        }),
      );
      const concMs = performance.now() - t1;
      const row: PayloadsRow = {
        size_mb: size,
        baseline_put_get_mb_s: round((size * rounds) / (storeMs / 1000)),
        sluice_sequential_mb_s: round((size * rounds) / (seqMs / 1000)),
        sluice_concurrent4_mb_s: round((size * 4) / (concMs / 1000)),
        ratio_sequential: 0,
        pipeline_peak_rss_mb: peakRssMb(pipeline.pid),
      };
      row.ratio_sequential = round(row.sluice_sequential_mb_s / row.baseline_put_get_mb_s);
      rows.push(row);
      log(
        `payloads ${size} MB: object store put+get ${row.baseline_put_get_mb_s} MB/s; sluice round trip ${row.sluice_sequential_mb_s} MB/s ` +
          `(${row.ratio_sequential}x the store), 4 at once ${row.sluice_concurrent4_mb_s} MB/s; pipeline peak RSS ${row.pipeline_peak_rss_mb?.toFixed(0)} MB`,
      );
    }
    await client.close();
    await nc.close();
    const out = join(opts.outDir, "payloads.json");
    await writeFile(out, JSON.stringify({ scenario: "payloads", pipeline_rest_rss_mb: restRss, rows }, null, 2) + "\n");
    log(`payloads: written to ${out}`);
    return 0;
  } finally {
    await stopAll();
  }
}

function round(x: number): number {
  return Math.round(x * 100) / 100;
}
