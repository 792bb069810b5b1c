/** The pipeline process is killed with requests in flight and restarted: nothing lost, nothing twice. */
import { expect } from "chai";
import { InferenceClient } from "../../pipeline/client/client.js";
import { useNats, waitFor } from "../support/nats.js";
import { countResults, useCrashStack } from "../support/crash.js";

describe("crash: SIGKILL the pipeline with requests in flight", function () {
  this.timeout(180_000);
  const nats = useNats();
  // A slow device so that many requests are in flight when the process dies.
  const { serve } = useCrashStack(nats, {
    device: { base_ms: 20, per_item_ms: 0.5 },
    batch: { max_size: 16, max_delay_ms: 5 },
    config: {
      consumer: { ackWaitMs: 2_000 },
      pipeline: { maxInFlight: 128, retryBaseMs: 50, retryMaxMs: 500, pullExpiresMs: 1_000 },
    },
  });

  it("answers every request exactly once across a SIGKILL and a restart", async () => {
    const client = new InferenceClient(nats.nc, "crash");
    const texts = new Map<string, string>();
    const { seen, sub } = countResults(nats.nc, "infer.res.crash.>", (id, data) => {
      texts.set(id, (JSON.parse(new TextDecoder().decode(data)) as { output?: { text?: string } }).output?.text ?? "");
    });
    const first = serve();
    await first.waitFor(/ready/);
    const N = 1500;
    for (let i = 0; i < N; i++) await client.publish("echo", { prompt: `p${i}` }, { id: `c${i}` });
    // Kill while the backlog is being worked through.
    await waitFor("some results", () => seen.size >= 100);
    first.kill("SIGKILL");
    expect(await first.exited).to.equal("SIGKILL");
    const answeredBeforeCrash = seen.size;
    expect(answeredBeforeCrash).to.be.lessThan(N);
    const second = serve();
    await second.waitFor(/ready/);
    await waitFor(`all ${N} results (have ${seen.size})`, () => seen.size >= N, 120_000);
    await new Promise((r) => setTimeout(r, 500));
    sub.unsubscribe();
    second.kill("SIGTERM");
    await second.exited;
    expect(seen.size).to.equal(N);
    for (let i = 0; i < N; i++) {
      expect(seen.get(`c${i}`), `results for c${i}`).to.equal(1);
      expect(texts.get(`c${i}`)).to.equal(`p${i}`);
    }
    await client.close();
  });
});
