/**
 * Scenario `http`: the same requests through the HTTP gateway (`POST /v1/completions`, keep-alive
 * connections) and through the NATS client library directly, in one run, against the same
 * pipeline and a zero-cost worker. Two phases, each measured for both doors:
 *
 * - low load: one request at a time, the two doors alternating request by request, so both see
 *   the same machine; p50 of each, and the difference (the gateway's cost per request);
 * - throughput: a closed loop of `CONCURRENCY` requests in flight, the NATS client first, then the
 *   gateway; requests per second of each, and the ratio gateway / client.
 */
import { readFileSync } from "node:fs";
import { Agent, request } from "node:http";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { InferenceClient } from "../../pipeline/client/client.js";
import { hashApiKey } from "../../pipeline/gateway/auth.js";
import { compiled, makeTempDir, removeTempDir, spawnNode, startNats, startWorkerProcess, stopNats, type BenchChild } from "./procs.js";

export const HTTP_SCENARIO = {
  name: "http",
  description: "zero-cost worker: the same requests through the HTTP gateway and through the NATS client, one run; low-load p50 difference and throughput ratio",
};

const TENANT = "bench";
const KEY = "sk-bench";
const MODEL = "bench";
/** Requests in flight in the throughput phase (each door). */
export const CONCURRENCY = 64;

export interface HttpBenchResult {
  low_load: { requests_each: number; nats_p50_ms: number; http_p50_ms: number; http_minus_nats_p50_ms: number; nats_p99_ms: number; http_p99_ms: number };
  throughput: { requests_each: number; concurrency: number; nats_rps: number; http_rps: number; http_over_nats: number };
  /** CPU time per request (user + system, µs) of each process in each throughput run. */
  cpu_us_per_request: { nats: Record<string, number>; http: Record<string, number> };
  errors: number;
}

/** CPU time (user + system) a process has used, µs; from /proc (Linux). */
function cpuUs(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
    // utime and stime are fields 14 and 15 of the whole line (12 and 13 after the name).
    return ((Number(fields[11]) + Number(fields[12])) * 1e6) / 100;
  } catch {
    return NaN;
  }
}

const quantile = (xs: number[], q: number): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))] ?? NaN;
};
const round = (x: number, d = 3): number => Math.round(x * 10 ** d) / 10 ** d;

export async function runHttpScenario(quick: boolean, log: (line: string) => void): Promise<HttpBenchResult> {
  const nats = await startNats();
  const procs: BenchChild[] = [];
  const dir = await makeTempDir("sluice-bench-http-");
  const agent = new Agent({ keepAlive: true, maxSockets: CONCURRENCY });
  let client: InferenceClient | undefined;
  try {
    const worker = await startWorkerProcess({ baseMs: 0, perItemMs: 0 });
    procs.push(worker.proc);
    const configFile = join(dir, "sluice.json");
    await writeFile(
      configFile,
      JSON.stringify({
        models: { [MODEL]: { versions: { v1: { weight: 100 } }, batch: { max_size: 32, max_delay_ms: 5 }, timeout_ms: 30_000 } },
        workers: [{ model: MODEL, version: "v1", endpoint: worker.endpoint }],
        gateway: { apiKeys: { [hashApiKey(KEY)]: TENANT } },
      }),
    );
    const serve = spawnNode("sluice serve", [compiled("pipeline/cli/main.ts"), "serve", "--config", configFile, "--server", nats.url], { SLUICE_METRICS_PORT: "0" });
    procs.push(serve);
    await serve.waitFor(/sluice serve ready/);
    const gateway = spawnNode("sluice gateway", [compiled("pipeline/cli/main.ts"), "gateway", "--config", configFile, "--server", nats.url, "--port", "0", "--host", "127.0.0.1"]);
    procs.push(gateway);
    const base = (await gateway.waitFor(/sluice gateway ready: (http:\S+)/))[1]!;
    const url = new URL(`${base}/completions`);
    client = await InferenceClient.connect({ servers: nats.url, tenant: TENANT });
    const c = client;

    let errors = 0;
    let n = 0;
    const prompt = (): string => `bench request ${n++}: write a haiku about queues`;
    const viaNats = async (): Promise<number> => {
      const t = performance.now();
      await c.infer(MODEL, { prompt: prompt(), parameters: { max_tokens: 16 } }).catch(() => errors++);
      return performance.now() - t;
    };
    const viaHttp = (): Promise<number> => {
      const body = JSON.stringify({ model: MODEL, prompt: prompt(), max_tokens: 16 });
      const t = performance.now();
      return new Promise((resolve) => {
        const req = request(url, { method: "POST", agent, headers: { authorization: `Bearer ${KEY}`, "content-type": "application/json", "content-length": Buffer.byteLength(body) } }, (res) => {
          if (res.statusCode !== 200) errors++;
          res.resume();
          res.on("end", () => resolve(performance.now() - t));
        });
        req.on("error", () => {
          errors++;
          resolve(performance.now() - t);
        });
        req.end(body);
      });
    };

    // Warm-up: connections, JIT, the pipeline's lanes.
    for (let i = 0; i < 50; i++) await Promise.all([viaNats(), viaHttp()]);
    errors = 0;

    const lowN = quick ? 200 : 600;
    const natsLat: number[] = [];
    const httpLat: number[] = [];
    for (let i = 0; i < lowN; i++) {
      if (i % 2 === 0) {
        natsLat.push(await viaNats());
        httpLat.push(await viaHttp());
      } else {
        httpLat.push(await viaHttp());
        natsLat.push(await viaNats());
      }
    }
    log(`  low load: p50 NATS client ${quantile(natsLat, 0.5).toFixed(2)} ms, gateway ${quantile(httpLat, 0.5).toFixed(2)} ms`);

    const total = quick ? 2_000 : 6_000;
    const pids = { pipeline: serve.pid, gateway: gateway.pid, "nats-server": nats.pid };
    const closedLoop = async (one: () => Promise<number>): Promise<{ rps: number; cpu: Record<string, number> }> => {
      let left = total;
      const before = Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, cpuUs(pid)]));
      const self = process.cpuUsage();
      const t = performance.now();
      await Promise.all(
        Array.from({ length: CONCURRENCY }, async () => {
          while (left-- > 0) await one();
        }),
      );
      const rps = total / ((performance.now() - t) / 1_000);
      const used = process.cpuUsage(self);
      const cpu: Record<string, number> = { "load generator": round((used.user + used.system) / total, 0) };
      for (const [k, pid] of Object.entries(pids)) cpu[k] = round((cpuUs(pid) - before[k]!) / total, 0);
      return { rps, cpu };
    };
    const natsRun = await closedLoop(viaNats);
    // Closed before the gateway's run: its subscription to the tenant's results would otherwise
    // receive every result of that run too, costing nats-server and the load generator.
    await c.close();
    const httpRun = await closedLoop(viaHttp);
    const natsRps = natsRun.rps;
    const httpRps = httpRun.rps;
    log(`  CPU µs per request, NATS client: ${JSON.stringify(natsRun.cpu)}; gateway: ${JSON.stringify(httpRun.cpu)}`);
    log(`  throughput at ${CONCURRENCY} in flight: NATS client ${natsRps.toFixed(0)}/s, gateway ${httpRps.toFixed(0)}/s`);
    return {
      low_load: {
        requests_each: lowN,
        nats_p50_ms: round(quantile(natsLat, 0.5)),
        http_p50_ms: round(quantile(httpLat, 0.5)),
        http_minus_nats_p50_ms: round(quantile(httpLat, 0.5) - quantile(natsLat, 0.5)),
        nats_p99_ms: round(quantile(natsLat, 0.99)),
        http_p99_ms: round(quantile(httpLat, 0.99)),
      },
      throughput: { requests_each: total, concurrency: CONCURRENCY, nats_rps: round(natsRps, 0), http_rps: round(httpRps, 0), http_over_nats: round(httpRps / natsRps) },
      cpu_us_per_request: { nats: natsRun.cpu, http: httpRun.cpu },
      errors,
    };
  } finally {
    agent.destroy();
    await client?.close();
    for (const p of procs.reverse()) await p.stop().catch(() => undefined);
    await stopNats(nats).catch(() => undefined);
    await removeTempDir(dir);
  }
}
