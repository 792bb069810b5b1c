/**
 * vLLM's load through its Prometheus endpoint: a real HTTP server on loopback serves `/metrics`
 * in vLLM's exposition format (fixtures/vllm/metrics.prom); VllmEngine.load reads it, and a
 * WorkerServer over that engine answers GetLoad with it.
 */
import { readFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { expect } from "chai";
import { WorkerClient, WorkerCallError } from "../../pipeline/workers/mod.js";
import { EngineError } from "../../worker/engine.js";
import { parsePrometheusText, vllmLoadFromMetrics } from "../../worker/engines/vllm-metrics.js";
import { WorkerServer } from "../../worker/server.js";
import { VllmEngine } from "../../worker/engines/vllm.js";

const METRICS = readFileSync(new URL("./fixtures/vllm/metrics.prom", import.meta.url), "utf8");
const MODEL = "meta-llama/Llama-3.1-8B-Instruct";

/** An HTTP server answering `GET /metrics` with `page()` (and 404 elsewhere); counts its calls. */
async function metricsServer(page: () => { status: number; body: string }): Promise<{ url: string; paths: string[]; stop: () => Promise<void> }> {
  const paths: string[] = [];
  const server: Server = createServer((req, res) => {
    paths.push(`${req.method} ${req.url}`);
    const { status, body } = req.url === "/metrics" ? page() : { status: 404, body: "not found" };
    res.writeHead(status, { "Content-Type": "text/plain; version=0.0.4; charset=utf-8" });
    res.end(body);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    paths,
    stop: async () => {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

describe("vLLM load from /metrics", () => {
  it("parses the Prometheus text: names, labels and values, comments skipped", () => {
    const samples = parsePrometheusText(METRICS);
    expect(samples.find((s) => s.name === "vllm:num_requests_waiting")).to.deep.equal({
      name: "vllm:num_requests_waiting",
      labels: { engine: "0", model_name: MODEL },
      value: 3,
    });
    expect(samples.filter((s) => s.name.startsWith("#"))).to.have.length(0);
  });

  it("sums requests over series, takes the highest KV usage, and filters by the served model", () => {
    const two = `${METRICS}vllm:num_requests_running{engine="0",model_name="other"} 5\nvllm:num_requests_waiting{engine="0",model_name="other"} 1\nvllm:kv_cache_usage_perc{engine="0",model_name="other"} 0.9\n`;
    expect(vllmLoadFromMetrics(two)).to.deep.equal({ waiting: 4, running: 12, kvUsage: 0.9 });
    expect(vllmLoadFromMetrics(two, MODEL)).to.deep.equal({ waiting: 3, running: 7, kvUsage: 0.4375 });
    // Servers before the rename call the usage gpu_cache_usage_perc.
    expect(vllmLoadFromMetrics(METRICS.replaceAll("kv_cache_usage_perc", "gpu_cache_usage_perc")).kvUsage).to.equal(0.4375);
    expect(() => vllmLoadFromMetrics("# nothing\n")).to.throw(/lacks vllm:num_requests_waiting, vllm:num_requests_running, vllm:kv_cache_usage_perc/);
  });

  it("reads the load over HTTP, and fails UNAVAILABLE on an error status or a page without the metrics", async () => {
    let page = { status: 200, body: METRICS };
    const server = await metricsServer(() => page);
    const engine = new VllmEngine({ baseUrl: server.url, servedModel: MODEL });
    try {
      expect(await engine.load({ prefixBlocks: true }, new AbortController().signal)).to.deep.equal({ waiting: 3, running: 7, kvUsage: 0.4375 });
      expect(server.paths).to.deep.equal(["GET /metrics"]);
      page = { status: 500, body: "boom" };
      const e1 = await engine.load({ prefixBlocks: false }, new AbortController().signal).catch((e: unknown) => e);
      expect(e1).to.be.instanceOf(EngineError).with.property("code", "UNAVAILABLE");
      expect((e1 as Error).message).to.match(/answered 500/);
      page = { status: 200, body: "up 1\n" };
      const e2 = await engine.load({ prefixBlocks: false }, new AbortController().signal).catch((e: unknown) => e);
      expect(e2).to.be.instanceOf(EngineError).with.property("code", "UNAVAILABLE");
    } finally {
      await engine.close();
      await server.stop();
    }
  });

  it("answers GetLoad through a worker over the vLLM engine (gRPC end to end)", async () => {
    let page = { status: 200, body: METRICS };
    const server = await metricsServer(() => page);
    const engine = new VllmEngine({ baseUrl: server.url });
    const worker = await WorkerServer.start({ engine });
    const client = new WorkerClient(worker.endpoint);
    try {
      const load = await client.load({ prefixBlocks: true });
      expect(load).to.deep.equal({ waiting: 3, running: 7, kvUsage: 0.4375, kvCapacityTokens: 0, prefixBlocks: [], blockTokens: 0 });
      page = { status: 503, body: "" };
      const err = await client.load().catch((e: unknown) => e);
      expect(err).to.be.instanceOf(WorkerCallError).with.property("code", "UNAVAILABLE");
    } finally {
      client.close();
      await worker.stop();
      await engine.close();
      await server.stop();
    }
  });
});
