/**
 * A lane at its transitions, against a real nats-server: a request of the lane's tenant that
 * reaches the stream as the lane begins to close is served once, on its first delivery.
 *
 * The test plays the other pipeline process that owns the lane (docs/protocol.md, "Lane stages"):
 * it creates the lane, announces `closing` and publishes the tenant's request right behind the
 * announcement, so the server hands the request to the lane's open pull before the intake has
 * heard of the stage. The intake must keep that pull, and defer the request, not drop it.
 */
import { expect } from "chai";
import { connect, nanos, type NatsConnection } from "@nats-io/transport-node";
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import type { Subscription } from "rxjs";
import { defaultConfig, type ConsumerSettings } from "../../pipeline/config.js";
import { durableName, ensureConsumers, ensureStreams } from "../../pipeline/intake/jetstream.js";
import { laneIntake } from "../../pipeline/intake/lanes.js";
import { describeLane, encodeAnnouncement, laneConsumerName, laneSubject, type LaneAnnouncement } from "../../pipeline/intake/lane-protocol.js";
import { STREAM_REQUESTS } from "../../proto/wire.js";
import type { Delivery } from "../../operators/types.js";
import { useNats, waitFor } from "../support/nats.js";

const TENANT = "t";
/** The other process: its id sorts first, so the intake leaves the lane's stages to it. */
const OWNER = "0-other";

describe("a lane at its transitions", function () {
  this.timeout(60_000);
  const nats = useNats();
  let intakeNc: NatsConnection | undefined;
  let sub: Subscription | undefined;
  let jsm: JetStreamManager;
  // Short enough that a request lost in transit comes back (delivered a second time) within the test.
  const consumer: ConsumerSettings = { durablePrefix: "sluice", ackWaitMs: 3_000, maxDeliver: 5, maxAckPending: 1_000 };
  const lane = laneConsumerName(consumer.durablePrefix, "normal", TENANT);
  const delivered: Array<{ subject: string; seq: number; deliveryCount: number }> = [];
  /** Deliveries the test holds unsettled (a lane holding one is not drained: nobody else closes it). */
  const holding: Delivery[] = [];
  let hold = true;

  const announce = async (a: LaneAnnouncement): Promise<void> => {
    nats.nc.publish(laneSubject("normal"), encodeAnnouncement(a));
    await nats.nc.flush();
  };

  before(async () => {
    jsm = await jetstreamManager(nats.nc);
    await ensureStreams(jsm, defaultConfig().streams);
    await ensureConsumers(jsm, consumer, ["normal"]);
    // The lane exists before the intake starts (the intake reads it from its description).
    await jsm.consumers.add(STREAM_REQUESTS, {
      durable_name: lane,
      description: describeLane({ stage: "open", owner: OWNER, start: 1 }),
      ack_policy: AckPolicy.Explicit,
      deliver_policy: DeliverPolicy.StartSequence,
      opt_start_seq: 1,
      filter_subject: `infer.req.normal.${TENANT}.*`,
      ack_wait: nanos(consumer.ackWaitMs),
      max_deliver: -1,
    });
    intakeNc = await connect({ servers: nats.url, name: "intake" });
    const intake = laneIntake({
      nc: intakeNc,
      js: jetstream(intakeNc),
      jsm: await jetstreamManager(intakeNc),
      consumer,
      priorities: ["normal"],
      weights: { high: 8, normal: 4, low: 1 },
      maxUnsettled: 64,
      expiresMs: 5_000,
      workingIntervalMs: 500,
    });
    sub = intake.subscribe((d: Delivery) => {
      delivered.push({ subject: d.subject, seq: d.seq, deliveryCount: d.deliveryCount });
      if (hold) holding.push(d);
      else d.ack();
    });
  });
  after(async () => {
    sub?.unsubscribe();
    await intakeNc?.close();
  });

  it("serves a request that reaches the lane's open pull as it begins to close, on its first delivery", async () => {
    const js = jetstream(nats.nc);
    const subject = `infer.req.normal.${TENANT}.m`;
    // A first request, served by the lane and held: the lane is busy, only this test closes it.
    const first = (await js.publish(subject, new TextEncoder().encode("{}"))).seq;
    await waitFor("the first request served", () => delivered.length > 0);
    hold = false;
    // The lane's pull and the shared consumer's are open on the server.
    await waitFor("the lane's pull", async () => (await jsm.consumers.info(STREAM_REQUESTS, lane)).num_waiting > 0);
    await waitFor("the shared consumer's pull", async () => (await jsm.consumers.info(STREAM_REQUESTS, durableName(consumer, "normal"))).num_waiting > 0);

    // The request right behind the announcement: the server gives it to the lane's pull (and the
    // shared consumer's) before the intake can act on the announcement.
    nats.nc.publish(laneSubject("normal"), encodeAnnouncement({ tenant: TENANT, stage: "closing", owner: OWNER, start: 1 }));
    const ack = await js.publish(subject, new TextEncoder().encode("{}"));
    const s = ack.seq;

    // The end, read as the owner does: past everything either consumer delivered.
    let end = 0;
    await waitFor("both consumers to deliver the request", async () => {
      const shared = await jsm.consumers.info(STREAM_REQUESTS, durableName(consumer, "normal"));
      const mine = await jsm.consumers.info(STREAM_REQUESTS, lane);
      end = Math.max(shared.delivered.stream_seq, mine.delivered.stream_seq);
      return shared.delivered.stream_seq >= s && mine.delivered.stream_seq >= s;
    });
    expect(end).to.equal(s);
    // Nothing is served while the lane closes (its end is not known yet).
    expect(delivered.map((d) => d.seq), "served while closing").to.deep.equal([first]);
    await announce({ tenant: TENANT, stage: "closed", owner: OWNER, start: 1, end });

    // The lane serves it (it is within the lane's end; the shared consumer skips it), once.
    await waitFor("the request served", () => delivered.length > 1, 20_000);
    for (const d of holding) d.ack();
    await waitFor("the lane settled", async () => (await jsm.consumers.info(STREAM_REQUESTS, lane)).num_ack_pending === 0, 20_000);
    expect(delivered).to.deep.equal([
      { subject, seq: first, deliveryCount: 1 },
      { subject, seq: s, deliveryCount: 1 },
    ]);
  });
});
