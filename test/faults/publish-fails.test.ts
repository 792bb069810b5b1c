/**
 * The pipeline's result publish fails for a while: INFER_RES is made to refuse new messages
 * (its max_msg_size lowered below any result's size), then restored. A JetStream publish is a
 * core publish that the stream then stores or refuses, so each refused result has reached its
 * client already: the pipeline keeps the request and stores that same result, without sending
 * it again, under infer.kept.<tenant>.<id> once the stream takes writes. Every request is
 * answered exactly once, and INFER_RES holds one result per request.
 */
import { expect } from "chai";
import { setTimeout as delay } from "node:timers/promises";
import { jetstreamManager } from "@nats-io/jetstream";
import { getStoredResult } from "../../pipeline/settle/stored-result.js";
import { STREAM_RESULTS } from "../../proto/wire.js";
import { useNats } from "../support/nats.js";
import { reportLine, SteadyLoad, until, useFaultStack } from "./harness.js";

describe("fault: result publishes fail transiently under load", function () {
  this.timeout(90_000);
  const nats = useNats();
  const stack = useFaultStack(nats);

  it("answers every request once and stores each result once: nothing lost, nothing sent twice", async () => {
    const jsm = await jetstreamManager(nats.nc);
    const load = (stack.load = await SteadyLoad.open({ servers: [nats.url], tenant: "pubfail", model: "echo", count: 1_200, rate: 200 }));
    const publishing = load.start();
    expect(await until(() => load.answeredSeen >= 200, 20_000), "answers before the fault").to.equal(true);

    const original = (await jsm.streams.info(STREAM_RESULTS)).config;
    const errorsBefore = await publishErrors();
    // A maximum message size below any result's: the stream refuses every result ("message size
    // exceeds maximum allowed") and, unlike a lowered max_msgs, deletes none it already holds.
    await jsm.streams.update(STREAM_RESULTS, { ...original, max_msg_size: 16 });
    // Refuse writes for 2.5 s of steady load.
    await delay(2_500);
    await jsm.streams.update(STREAM_RESULTS, original);

    await publishing;
    const r = await load.finish(45_000);
    reportLine("publish-fails", r);
    const failedPublishes = (await publishErrors()) - errorsBefore;
    // The fault did hit: result publishes failed while the stream refused them.
    expect(failedPublishes, "result publishes that failed during the fault").to.be.greaterThan(0);
    expect(r.sent).to.equal(1_200);
    expect(r.lost).to.equal(0);
    // What the client's subscription saw: one result per request, never a second copy.
    expect(r.duplicated, "results a client received twice").to.equal(0);
    expect(r.conflicting).to.equal(0);
    // Exactly one stored result per request in INFER_RES (under infer.res, or infer.kept for those
    // refused live), and it is the answer (ok).
    const live = await jsm.streams.info(STREAM_RESULTS, { subjects_filter: "infer.res.pubfail.>" });
    const kept = await jsm.streams.info(STREAM_RESULTS, { subjects_filter: "infer.kept.pubfail.>" });
    // subjects_filter lists the matching subjects, with how many messages each holds.
    const count = (m: Record<string, number> | undefined): { subjects: number; messages: number } => ({
      subjects: Object.keys(m ?? {}).length,
      messages: Object.values(m ?? {}).reduce((a, n) => a + n, 0),
    });
    const { subjects: liveN, messages: liveMsgs } = count(live.state.subjects);
    const { subjects: keptN, messages: keptMsgs } = count(kept.state.subjects);
    console.log(`  stored: ${liveN} under infer.res, ${keptN} under infer.kept (refused live, stored afterwards); failed publishes ${failedPublishes}`);
    expect(keptN, "results refused live and stored afterwards").to.be.greaterThan(0);
    expect(liveN + keptN).to.equal(1_200);
    expect(liveMsgs + keptMsgs).to.equal(1_200);
    let storedOk = 0;
    for (const id of load.ids) {
      const m = await getStoredResult(jsm, "pubfail", id);
      if (m?.header.get("Infer-Status") === "ok") storedOk++;
    }
    expect(storedOk, "stored ok results").to.equal(1_200);
  });

  /** sluice_publish_errors_total as the pipeline's /metrics would show it. */
  async function publishErrors(): Promise<number> {
    const m = await stack.pipeline.metrics.registry.getSingleMetricAsString("sluice_publish_errors_total");
    const line = m.split("\n").find((l) => l.startsWith("sluice_publish_errors_total"));
    return Number(line?.split(" ")[1] ?? 0);
  }
});
