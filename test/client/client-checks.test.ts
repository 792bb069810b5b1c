/**
 * The client library refuses what the pipeline would refuse (priority, version, size) before
 * sending it, and says at once when a request id is a duplicate, answering it with the first
 * request's result (stored, or still to come). Real nats-server; the test stores results itself
 * where the pipeline would.
 */
import { expect } from "chai";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { InferenceClient } from "../../pipeline/client/client.js";
import { InferenceError } from "../../pipeline/client/errors.js";
import type { PublishReceipt } from "../../pipeline/client/options.js";
import { loadConfig } from "../../pipeline/config.js";
import { ensureStreams } from "../../pipeline/intake/jetstream.js";
import { subjects } from "../../proto/wire.js";
import type { InferResult } from "../../operators/types.js";
import type { Priority } from "../../proto/wire.js";
import { useNats } from "../support/nats.js";

const TENANT = "checks";

async function refusal(p: Promise<unknown>): Promise<InferenceError> {
  try {
    await p;
  } catch (err) {
    expect(err).to.be.instanceOf(InferenceError);
    return err as InferenceError;
  }
  throw new Error("expected the call to be refused");
}

describe("client: checks before sending, and duplicate request ids", function () {
  this.timeout(60_000);
  const nats = useNats();
  let client: InferenceClient;

  before(async () => {
    await ensureStreams(await jetstreamManager(nats.nc), loadConfig({ overrides: { servers: [nats.url] } }).streams);
    client = new InferenceClient(nats.nc, TENANT);
  });
  after(async () => {
    await client?.close();
  });

  /** Requests queued so far. */
  const queued = async (): Promise<number> => (await (await jetstreamManager(nats.nc)).streams.info("INFER_REQ")).state.messages;

  /** Stores a result where the pipeline would. */
  async function storeResult(id: string, text: string): Promise<InferResult> {
    const result: InferResult = { id, status: "ok", model: "m", version: "v1", output: { text } };
    const h = natsHeaders();
    h.set("Infer-Status", "ok");
    await jetstream(nats.nc).publish(subjects.result(TENANT, id), JSON.stringify(result), { msgID: id, headers: h });
    return result;
  }

  it("refuses an unknown priority, a bad version and a relative deadline as INVALID_ARGUMENT, sending nothing", async () => {
    const before = await queued();
    const p = await refusal(client.publish("m", { prompt: "x" }, { priority: "urgent" as Priority }));
    expect(p.code).to.equal("INVALID_ARGUMENT");
    expect(p.message).to.equal("priority 'urgent' must be one of high, normal, low");
    const v = await refusal(client.infer("m", { prompt: "x" }, { version: "v 2" }));
    expect(v.code).to.equal("INVALID_ARGUMENT");
    expect(v.message).to.contain("version 'v 2'");
    const d = await refusal(client.request("m", { prompt: "x" }, { deadlineMs: -5 }));
    expect(d.code).to.equal("INVALID_ARGUMENT");
    expect(d.message).to.contain("Unix epoch milliseconds");
    expect(await queued()).to.equal(before);
  });

  it("with the claim check off, refuses a 2 MB prompt as INVALID_ARGUMENT naming its size and the 256 KiB limit; a raised limit meets the server's max_payload", async () => {
    const before = await queued();
    const big = { prompt: "a".repeat(2_000_000) };
    const inline = new InferenceClient(nats.nc, TENANT, false, undefined, undefined, { thresholdBytes: Infinity });
    const e = await refusal(inline.infer("m", big));
    expect(e.code).to.equal("INVALID_ARGUMENT");
    expect(e.message).to.equal("request body of 2000013 bytes is over the request size limit of 262144 bytes (256 KiB)");

    const maxPayload = nats.nc.info!.max_payload;
    const lenient = new InferenceClient(nats.nc, TENANT, false, undefined, 8 * 1024 * 1024, { thresholdBytes: Infinity });
    const s = await refusal(lenient.publish("m", big));
    expect(s.code).to.equal("INVALID_ARGUMENT");
    expect(s.message).to.contain("2000013 bytes").and.to.contain(`max_payload of ${maxPayload} bytes`).and.to.contain("object store");
    // With the claim check (the default) the same prompt is sent, as a reference to its object.
    const claimed = await client.publish("m", big);
    expect(claimed.duplicate).to.equal(false);
    // Just under the limit goes through.
    const fits = await client.publish("m", { prompt: "a".repeat(262_144 - 13) });
    expect(fits.duplicate).to.equal(false);
    expect(await queued()).to.equal(before + 2);
  });

  it("a reused id: the receipt says duplicate, and the stored result is the answer, at once", async () => {
    const id = "reused-stored";
    const first = await client.publish("m", { prompt: "first" }, { id });
    expect(first).to.deep.include({ id, duplicate: false });
    const stored = await storeResult(id, "first answer");

    const receipts: PublishReceipt[] = [];
    // A timeout far beyond the test's: only an answer at once passes.
    const r = await client.request("m", { prompt: "second" }, { id, timeoutMs: 3_600_000, onPublished: (x) => receipts.push(x) });
    expect(receipts).to.have.length(1);
    expect(receipts[0]).to.deep.include({ id, seq: first.seq, duplicate: true });
    expect(r).to.deep.equal(stored);
  });

  it("a reused id whose first request is still pending: the answer is that request's, when it comes", async () => {
    const id = "reused-pending";
    await client.publish("m", { prompt: "first" }, { id });
    const receipts: PublishReceipt[] = [];
    const answer = client.request("m", { prompt: "second" }, { id, timeoutMs: 3_600_000, onPublished: (x) => receipts.push(x) });
    // The receipt comes before any result exists.
    while (receipts.length === 0) await new Promise((r) => setTimeout(r, 5));
    expect(receipts[0]!.duplicate).to.equal(true);
    const stored = await storeResult(id, "pending answer");
    expect(await answer).to.deep.equal(stored);
  });
});
