/**
 * The pipeline process SIGKILLed while it reads request bodies from and writes results to the
 * object store, then restarted: every large request answered exactly once with its whole body,
 * and once the retention grace has passed the sweeper leaves no object (nor chunk) that no
 * message refers to, and removes none that one does.
 */
import { expect } from "chai";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { InferenceClient } from "../../pipeline/client/client.js";
import { PayloadStore } from "../../pipeline/payloads/store.js";
import { PayloadSweeper } from "../../pipeline/payloads/sweeper.js";
import { useNats, waitFor } from "../support/nats.js";
import { countResults, useCrashStack } from "../support/crash.js";

const N = 40;
const prompt = (i: number): string => `${i} `.padEnd(2 * 1024 * 1024, String.fromCharCode(97 + (i % 26)));

describe("crash: SIGKILL the pipeline mid-transfer of large bodies", function () {
  this.timeout(300_000);
  const nats = useNats();
  const { serve } = useCrashStack(nats, {
    device: { base_ms: 30, per_item_ms: 1 },
    batch: { max_size: 4, max_delay_ms: 5 },
    config: {
      consumer: { ackWaitMs: 3_000 },
      pipeline: { maxInFlight: 16, retryBaseMs: 50, retryMaxMs: 500, pullExpiresMs: 1_000 },
      payloads: { memoryBytes: 16 * 1024 * 1024, sweepIntervalMs: 0 },
    },
  });

  it("answers every 2 MB request once, whole, across a SIGKILL and a restart; no orphaned objects after the grace", async () => {
    const client = new InferenceClient(nats.nc, "crashbig");
    const { seen, sub } = countResults(nats.nc, "infer.res.crashbig.>");
    const first = serve();
    await first.waitFor(/ready/, 60_000);
    for (let i = 0; i < N; i++) await client.publish("echo", { prompt: prompt(i) }, { id: `big${i}` });
    await waitFor("some results", () => seen.size >= 5, 120_000);
    first.kill("SIGKILL");
    expect(await first.exited).to.equal("SIGKILL");
    expect(seen.size).to.be.lessThan(N);
    const second = serve();
    await second.waitFor(/ready/, 60_000);
    await waitFor(`all ${N} results (have ${seen.size})`, () => seen.size >= N, 240_000);
    await new Promise((r) => setTimeout(r, 500));
    sub.unsubscribe();
    second.kill("SIGTERM");
    await second.exited;

    expect([...seen.values()].every((n) => n === 1), JSON.stringify([...seen].filter(([, n]) => n !== 1))).to.equal(true);
    for (let i = 0; i < N; i++) {
      const r = await client.stored(`big${i}`);
      expect(r?.output?.text === prompt(i), `big${i} answered with its whole body`).to.equal(true);
    }

    // After the grace: nothing that no message refers to, and everything that one does.
    const js = jetstream(nats.nc);
    const jsm = await jetstreamManager(nats.nc);
    const store = new PayloadStore(js);
    await new PayloadSweeper({ js, jsm, store, graceMs: 0 }).sweep(Date.now() + 1);
    const objects = await store.list("crashbig");
    const names = objects.map((o) => o.name).sort();
    const expected = Array.from({ length: N }, (_, i) => [`req/big${i}`, `res/big${i}`]).flat().sort();
    expect(names).to.deep.equal(expected);
    const si = await jsm.streams.info("OBJ_infer_payloads_crashbig", { subjects_filter: "$O.infer_payloads_crashbig.C.>" });
    const chunkOwners = Object.keys(si.state.subjects ?? {}).map((s) => s.split(".").pop()!).sort();
    expect(chunkOwners, "every chunk belongs to a live object").to.deep.equal(objects.map((o) => o.nuid).sort());
    await client.close();
  });
});
