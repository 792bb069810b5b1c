/**
 * The pipeline's result publish fails for a while: INFER_RES is made to refuse new messages
 * (its max_msg_size lowered below any result's size), then restored. Requests whose result
 * could not be stored are naked and redelivered, not acknowledged, so every one is answered
 * once the stream takes writes again.
 */
import { expect } from "chai";
import { setTimeout as delay } from "node:timers/promises";
import { jetstreamManager } from "@nats-io/jetstream";
import { STREAM_RESULTS } from "../../pipeline/jetstream.js";
import type { PipelineService } from "../../pipeline/service.js";
import { useNats } from "../support/nats.js";
import { models, startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";
import { reportLine, SteadyLoad, until } from "./harness.js";

describe("fault: result publishes fail transiently under load", function () {
  this.timeout(90_000);
  const nats = useNats();
  let worker: TestWorker;
  let pipeline: PipelineService;
  let load: SteadyLoad | undefined;

  before(async () => {
    worker = await startWorker({ base_ms: 2, per_item_ms: 0.05 });
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: models(["echo"]),
        workers: [{ model: "echo", version: "v1", endpoint: worker.server.endpoint }],
        consumer: { ackWaitMs: 3_000 },
      }),
    );
  });

  after(async () => {
    await load?.close();
    await pipeline?.stop(2_000);
    await worker?.stop();
  });


  it("redelivers what could not be published: nothing lost, one stored result per request", async () => {
    const jsm = await jetstreamManager(nats.nc);
    load = await SteadyLoad.open({ servers: [nats.url], tenant: "pubfail", model: "echo", count: 1_200, rate: 200 });
    const publishing = load.start();
    expect(await until(() => load!.answeredSeen >= 200, 20_000), "answers before the fault").to.equal(true);

    const original = (await jsm.streams.info(STREAM_RESULTS)).config;
    const failedBefore = pipeline.stats.byAction["nak"] ?? 0;
    // A maximum message size below any result's: the stream refuses every result ("message size
    // exceeds maximum allowed") and, unlike a lowered max_msgs, deletes none it already holds.
    await jsm.streams.update(STREAM_RESULTS, { ...original, max_msg_size: 16 });
    // Refuse writes for 2.5 s of steady load.
    await delay(2_500);
    await jsm.streams.update(STREAM_RESULTS, original);
    const naked = (pipeline.stats.byAction["nak"] ?? 0) - failedBefore;

    await publishing;
    const r = await load.finish(45_000);
    reportLine("publish-fails", r);
    // The fault did hit: publishes failed and the requests were naked for redelivery.
    expect(naked, "publishes that failed during the fault").to.be.greaterThan(0);
    expect(r.sent).to.equal(1_200);
    expect(r.lost).to.equal(0);
    // Exactly one stored result per request in INFER_RES, and it is the answer (ok).
    const info = await jsm.streams.info(STREAM_RESULTS, { subjects_filter: "infer.res.pubfail.>" });
    expect(info.state.num_subjects ?? info.state.messages).to.equal(1_200);
    let storedOk = 0;
    for (const id of load.ids) {
      const m = await jsm.streams.getMessage(STREAM_RESULTS, { last_by_subj: `infer.res.pubfail.${id}` });
      if (m?.header.get("Infer-Status") === "ok") storedOk++;
    }
    expect(storedOk, "stored ok results").to.equal(1_200);
  });

  // A JetStream publish is a core NATS publish that the stream then stores or refuses; core
  // subscribers of infer.res.<tenant>.> receive it either way. So each result publish the stream
  // refused still reached the client, and the redelivered request's result reached it again:
  // the client sees duplicates (and, were a retry to produce a different result, two different
  // answers while INFER_RES keeps one: `conflicting` counts those).
});
