import { expect } from "chai";
import { connect, headers as natsHeaders, ClosedConnectionError, TimeoutError } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, JetStreamApiError } from "@nats-io/jetstream";
import { AckLostError, NoStreamError, StreamPublisher } from "../../../pipeline/settle/stream-publisher.js";
import { StreamResultSink } from "../../../pipeline/settle/result-sink.js";
import { ResultNotStoredError } from "../../../operators/settle-outcome.js";
import type { InferJob, InferResult } from "../../../operators/types.js";
import { STREAM_RESULTS, subjects } from "../../../proto/wire.js";
import { inertDelivery } from "../../support/deliveries.js";
import { useNats } from "../../support/nats.js";

const enc = new TextEncoder();
const h = (): ReturnType<typeof natsHeaders> => natsHeaders();

/** What a promise settles to, as a value (its rejection reason, or "resolved"). */
async function reasonOf(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
    return "resolved";
  } catch (err) {
    return err;
  }
}

describe("StreamPublisher: JetStream publishes acknowledged on one inbox", function () {
  this.timeout(30_000);
  const nats = useNats();
  let publisher: StreamPublisher | undefined;

  before(async () => {
    const jsm = await jetstreamManager(nats.nc);
    await jsm.streams.add({ name: "PUBTEST", subjects: ["pubtest.>"] });
    await jsm.streams.add({ name: "TINY", subjects: ["tiny.>"], max_msg_size: 16 });
  });
  afterEach(() => publisher?.close());

  it("answers each publish with its stream's acknowledgement, and a repeated Nats-Msg-Id as a duplicate", async () => {
    publisher = new StreamPublisher(nats.nc);
    const acks = await Promise.all(Array.from({ length: 200 }, (_, i) => publisher!.publish(`pubtest.a.${i}`, enc.encode(`m${i}`), { msgID: `id-${i}`, headers: h() })));
    expect(acks.every((a) => a.stream === "PUBTEST" && a.duplicate === false)).to.equal(true);
    expect(new Set(acks.map((a) => a.seq)).size, "one sequence per message").to.equal(200);
    const again = await publisher.publish("pubtest.a.7", enc.encode("m7"), { msgID: "id-7", headers: h() });
    expect(again.duplicate).to.equal(true);
    expect(again.seq).to.equal(acks[7]!.seq);
    expect(publisher.pending).to.equal(0);
    // What the stream holds is what was published, with its id.
    const jsm = await jetstreamManager(nats.nc);
    const stored = await jsm.streams.getMessage("PUBTEST", { seq: acks[3]!.seq });
    expect(stored?.subject).to.equal("pubtest.a.3");
    expect(stored?.header.get("Nats-Msg-Id")).to.equal("id-3");
  });

  it("fails a publish no stream listens to with NoStreamError, one the stream refuses with its API error", async () => {
    publisher = new StreamPublisher(nats.nc);
    const none = await reasonOf(publisher.publish("nobody.listens", enc.encode("x"), { msgID: "n1", headers: h() }));
    expect(none).to.be.instanceOf(NoStreamError);
    const refused = await reasonOf(publisher.publish("tiny.x", enc.encode("x".repeat(100)), { msgID: "t1", headers: h() }));
    expect(refused).to.be.instanceOf(JetStreamApiError);
    // The same answers as js.publish gives.
    const js = jetstream(nats.nc);
    expect(await reasonOf(js.publish("tiny.x", enc.encode("x".repeat(100)), { msgID: "t2" }))).to.be.instanceOf(JetStreamApiError);
  });

  it("fails a publish nobody acknowledges with TimeoutError, and closing fails what still waits", async () => {
    // A plain subscriber hears the message and never answers.
    const silent = nats.nc.subscribe("silent.>");
    publisher = new StreamPublisher(nats.nc, { timeoutMs: 50 });
    expect(await reasonOf(publisher.publish("silent.a", enc.encode("x"), { msgID: "s1", headers: h() }))).to.be.instanceOf(TimeoutError);
    const patient = new StreamPublisher(nats.nc, { timeoutMs: 60_000 });
    const waiting = patient.publish("silent.b", enc.encode("x"), { msgID: "s2", headers: h() });
    await nats.nc.flush();
    expect(patient.pending).to.equal(1);
    patient.close();
    expect(await reasonOf(waiting)).to.be.instanceOf(AckLostError);
    // Closed, it sends nothing more.
    expect(await reasonOf(patient.publish("pubtest.c", enc.encode("x"), { msgID: "s3", headers: h() }))).to.be.instanceOf(ClosedConnectionError);
    silent.unsubscribe();
  });

  it("rejects at once what the connection refuses, and fails what waited when the connection closes", async () => {
    const nc = await connect({ servers: nats.url });
    const silent = nats.nc.subscribe("silent2.>");
    await nats.nc.flush();
    const p = new StreamPublisher(nc, { timeoutMs: 60_000 });
    const waiting = p.publish("silent2.a", enc.encode("x"), { msgID: "c1", headers: h() });
    await nc.flush();
    await nc.close();
    expect(await reasonOf(waiting)).to.be.instanceOf(AckLostError);
    const p2 = new StreamPublisher(nc);
    expect(await reasonOf(p2.publish("pubtest.d", enc.encode("x"), { msgID: "c2", headers: h() }))).to.be.instanceOf(ClosedConnectionError);
    silent.unsubscribe();
  });

  it("through the result sink: a refused result is not stored (the client may have it); with no stream at all, nothing was sent", async () => {
    const jsm = await jetstreamManager(nats.nc);
    // A results stream that takes small results only.
    await jsm.streams.add({ name: STREAM_RESULTS, subjects: [subjects.resultsAll], max_msg_size: 400 });
    publisher = new StreamPublisher(nats.nc);
    const sink = new StreamResultSink(jetstream(nats.nc), jsm, undefined, undefined, publisher);
    const job = (id: string): InferJob => ({ id, tenant: "acme", model: "echo", priority: "normal", stream: false, delivery: inertDelivery() });
    const result = (id: string, text: string): InferResult => ({ id, status: "ok", model: "echo", output: { text } });
    await sink.publishResult(job("r1"), result("r1", "fine"));
    expect(await sink.storedResult(job("r1"))).to.deep.include({ id: "r1", status: "ok" });
    const refused = await reasonOf(sink.publishResult(job("r2"), result("r2", "x".repeat(1_000))));
    expect(refused).to.be.instanceOf(ResultNotStoredError);
    // No stream and no listener: the publish reached nobody, so it is an error to send again.
    await jsm.streams.delete(STREAM_RESULTS);
    const unsent = await reasonOf(sink.publishResult(job("r3"), result("r3", "fine")));
    expect(unsent).to.be.instanceOf(NoStreamError);
    expect(publisher.pending).to.equal(0);
  });
});
