/** Time to first token and time per output token, observed by a real pipeline streaming generations. */
import { expect } from "chai";
import { InferenceClient } from "../../pipeline/client/client.js";
import type { StreamEvent } from "../../pipeline/client/options.js";
import type { PipelineService } from "../../pipeline/service.js";
import type { InferResult } from "../../operators/types.js";
import { useNats, waitFor } from "../support/nats.js";
import { startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

interface Totals {
  count: number;
  sum: number;
}

/** A histogram's `_count` and `_sum` for one model and version. */
async function totals(pipeline: PipelineService, name: "ttftSeconds" | "tpotSeconds", model: string, version: string): Promise<Totals> {
  const { values } = await pipeline.metrics[name].get();
  const pick = (suffix: string): number =>
    values.find((v) => v.metricName?.endsWith(suffix) && v.labels["model"] === model && v.labels["version"] === version)?.value ?? 0;
  return { count: pick("_count"), sum: pick("_sum") };
}

describe("generation metrics (TTFT, TPOT)", function () {
  this.timeout(120_000);
  const nats = useNats();
  let pipeline: PipelineService;
  let client: InferenceClient;
  let worker: TestWorker;

  before(async () => {
    pipeline = await startPipeline(testConfig(nats.url, { pipeline: { maxInFlight: 64 } }));
    client = new InferenceClient(nats.nc, "tm");
    worker = await startWorker({ ttft_ms: 5, token_interval_ms: 1, capacity: 16 });
    const rev = pipeline.registry.table.revision;
    await pipeline.registry.put("gen", { versions: { v1: { weight: 100 } } });
    await waitFor("registry", () => pipeline.registry.table.revision > rev, 5_000, 2);
    pipeline.pool.add("gen", "v1", worker.server.endpoint, 16);
  });
  after(async () => {
    await client?.close();
    await pipeline?.stop();
    await worker?.stop();
  });

  it("observes one TTFT per streamed generation and one TPOT per generation of more than one token", async () => {
    const n = 24;
    // Every third generation is capped at one token: it has a first token but no time per token.
    const run = async (i: number): Promise<InferResult> => {
      const parameters = i % 3 === 0 ? { max_tokens: 1 } : {};
      const events: StreamEvent[] = [];
      for await (const ev of client.stream("gen", { prompt: `p${i} a b c d e`, parameters }, { id: `tm-${i}` })) events.push(ev);
      const last = events[events.length - 1]!;
      expect("result" in last, `tm-${i} ends with its result`).to.equal(true);
      expect(events.filter((e) => "text" in e).length, `chunks of tm-${i}`).to.be.at.least(1);
      return (last as { result: InferResult }).result;
    };
    const results = await Promise.all(Array.from({ length: n }, (_, i) => run(i)));
    for (const r of results) expect(r.status, r.id).to.equal("ok");
    const multi = results.filter((r) => (r.usage?.completion_tokens ?? 0) > 1).length;
    expect(multi, "generations of more than one token").to.equal(n - Math.ceil(n / 3));
    // The settle tap runs right after the result is published; wait for the last ones.
    await waitFor("every request settled", () => pipeline.stats.settled >= n, 10_000, 5);

    const ttft = await totals(pipeline, "ttftSeconds", "gen", "v1");
    const tpot = await totals(pipeline, "tpotSeconds", "gen", "v1");
    expect(ttft.count, "TTFT observations").to.equal(n);
    expect(tpot.count, "TPOT observations").to.equal(multi);
    expect(ttft.sum).to.be.greaterThan(0);
    expect(tpot.sum).to.be.greaterThan(0);

    const text = await pipeline.metrics.exposition();
    expect(text).to.include(`sluice_ttft_seconds_count{model="gen",version="v1"} ${n}`);
    expect(text).to.include(`sluice_tpot_seconds_count{model="gen",version="v1"} ${multi}`);
  });
});
