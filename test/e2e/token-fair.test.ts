/**
 * Token-weighted fair share under a backlog: two tenants, one with prompts ten times longer,
 * both backlogged before the pipeline starts. While both have work, the device's tokens are
 * shared evenly (within 20%): each tenant lane gets credits when its tenant's virtual token
 * counter is the lowest. Sharing by requests gives the long-prompt tenant about ten times the
 * short tenant's tokens.
 */
import { expect } from "chai";
import { jetstreamManager } from "@nats-io/jetstream";
import { InferenceClient } from "../../pipeline/client/client.js";
import { ensureStreams } from "../../pipeline/intake/jetstream.js";
import type { PipelineService } from "../../pipeline/service.js";
import type { InferResult } from "../../operators/types.js";
import { useNats, waitFor } from "../support/nats.js";
import { startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

/** Requests the pipeline holds at once: the granularity of its share. */
const MAX_IN_FLIGHT = 32;
const LONG_WORDS = 400;
const SHORT_WORDS = 40;
/** The long-prompt tenant has more tokens in all, so the short one finishes first and closes the window. */
const LONG_REQUESTS = 900;
const SHORT_REQUESTS = 3_000;

interface Served {
  tenant: string;
  tokens: number;
}

/** Backlogs both tenants, starts the pipeline, and returns the results in the order they came. */
async function serveBacklog(nats: ReturnType<typeof useNats>, fairShare: "tokens" | "requests"): Promise<Served[]> {
  let worker: TestWorker | undefined;
  let pipeline: PipelineService | undefined;
  const clients = { long: new InferenceClient(nats.nc, "long"), short: new InferenceClient(nats.nc, "short") };
  const served: Served[] = [];
  const sub = nats.nc.subscribe("infer.res.*.>", {
    callback: (_e, m) => {
      const r = m.json<InferResult>();
      served.push({ tenant: m.subject.split(".")[2]!, tokens: (r.usage?.prompt_tokens ?? 0) + (r.usage?.completion_tokens ?? 0) });
    },
  });
  try {
    worker = await startWorker({ base_ms: 4, per_item_ms: 0.1 });
    const config = testConfig(nats.url, {
      models: { echo: { versions: { v1: { weight: 100 } }, batch: { max_size: 16, max_delay_ms: 2 } } },
      workers: [{ model: "echo", version: "v1", endpoint: worker.server.endpoint, capacity: 16 }],
      pipeline: { maxInFlight: MAX_IN_FLIGHT, tenantLanes: true, fairShare },
    });
    await ensureStreams(await jetstreamManager(nats.nc), config.streams);
    const words = (n: number): string => Array.from({ length: n }, (_, i) => `w${i % 10}x`).join(" ");
    // Interleaved, so neither tenant's backlog stands in front of the other's in the stream.
    const sends: Array<Promise<unknown>> = [];
    for (let i = 0, j = 0; i < SHORT_REQUESTS; i++) {
      sends.push(clients.short.publish("echo", { prompt: words(SHORT_WORDS) }, { id: `short-${fairShare}-${i}` }));
      if (j < LONG_REQUESTS && j * SHORT_REQUESTS <= i * LONG_REQUESTS)
        sends.push(clients.long.publish("echo", { prompt: words(LONG_WORDS) }, { id: `long-${fairShare}-${j++}` }));
    }
    await Promise.all(sends);
    pipeline = await startPipeline(config);
    await waitFor("every request answered", () => served.length >= LONG_REQUESTS + SHORT_REQUESTS, 120_000);
    return served;
  } finally {
    sub.unsubscribe();
    await pipeline?.stop();
    await worker?.stop();
    await clients.long.close();
    await clients.short.close();
  }
}

/** Tokens per tenant over the results up to the last one of the tenant that finished first (both had work until then). */
function whileBothBacklogged(served: readonly Served[]): { long: number; short: number; window: number } {
  const lastOf = (t: string): number => served.map((s) => s.tenant).lastIndexOf(t);
  const end = Math.min(lastOf("long"), lastOf("short"));
  const sum = { long: 0, short: 0, window: end + 1 };
  for (const s of served.slice(0, end + 1)) sum[s.tenant as "long" | "short"] += s.tokens;
  return sum;
}

describe("token-weighted fair share under a backlog", function () {
  this.timeout(180_000);
  const byTokens = useNats();
  const byRequests = useNats();

  it("splits the device's tokens evenly between a tenant with 10x longer prompts and one with short ones (by requests: many times more to the long one)", async () => {
    const tokens = whileBothBacklogged(await serveBacklog(byTokens, "tokens"));
    const requests = whileBothBacklogged(await serveBacklog(byRequests, "requests"));
    const rt = tokens.long / tokens.short;
    const rr = requests.long / requests.short;
    console.log(`      long/short device tokens while both backlogged: by tokens ${rt.toFixed(3)} (${tokens.window} results), by requests ${rr.toFixed(3)} (${requests.window} results)`);
    // By requests the long-prompt tenant takes about its prompt ratio (10x) of the tokens; by
    // tokens each tenant's lane gets credits when its tenant was given the fewest tokens, so
    // both get the same tokens, within 20%, against the results of the whole window.
    expect(rr).to.be.greaterThan(3);
    expect(rt).to.be.lessThan(rr / 2);
    expect(rt).to.be.within(0.8, 1.25);
  });
});
