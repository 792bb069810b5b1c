/**
 * Bodies beyond max_payload through the object store (claim check): a 16 MB prompt and result
 * round trip through infer() and streaming with their bytes equal; what travels in the streams
 * is a reference; bad references are answered INVALID_ARGUMENT with the reason; the bytes of
 * large bodies held by the pipeline stay within its bound; the sweeper removes objects whose
 * message is gone and keeps the others.
 */
import { expect } from "chai";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { InferenceClient } from "../../pipeline/client/client.js";
import { InferenceError } from "../../pipeline/client/errors.js";
import type { StreamEvent } from "../../pipeline/client/options.js";
import type { PipelineService } from "../../pipeline/service.js";
import type { InferResult } from "../../operators/types.js";
import { STREAM_REQUESTS, STREAM_RESULTS } from "../../proto/wire.js";
import { BODY_REF_HEADER, BODY_SIZE_HEADER, payloadKey } from "../../pipeline/payloads/names.js";
import { PayloadStore } from "../../pipeline/payloads/store.js";
import { Objm } from "@nats-io/obj";
import { useNats, waitFor } from "../support/nats.js";
import { models, startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

const MB = 1024 * 1024;

/** A text of `bytes` ASCII bytes: words of `wordBytes` (so a generation streams it in chunks that fit a message). */
function bigText(bytes: number, seed: number, wordBytes = 200 * 1024): string {
  const parts: string[] = [];
  let left = bytes;
  let k = seed;
  while (left > 0) {
    const n = Math.min(wordBytes, left);
    const letter = String.fromCharCode(97 + (k++ % 26));
    const word = letter.repeat(Math.max(0, n - 1));
    parts.push(left - n > 0 ? word + " " : word + letter);
    left -= n;
  }
  return parts.join("");
}

describe("large bodies through the object store", function () {
  this.timeout(300_000);
  const nats = useNats();
  let worker: TestWorker;
  let pipeline: PipelineService;
  let client: InferenceClient;

  before(async () => {
    worker = await startWorker({ token_interval_ms: 0, ttft_ms: 0 });
    pipeline = await startPipeline(
      testConfig(nats.url, {
        // A long model timeout: this one process runs client, pipeline and worker under heavy load,
        // and a health check that misses its deadline must not fail the requests.
        models: models(["echo"], { timeout_ms: 240_000 }),
        workers: [{ model: "echo", version: "v1", endpoint: worker.server.endpoint, capacity: 8 }],
        // Results over 128 KiB go to the store (requests from the client over its own 256 KiB).
        payloads: { memoryBytes: 24 * MB, sweepIntervalMs: 0, thresholdBytes: 128 * 1024 },
      }),
    );
    client = new InferenceClient(nats.nc, "big");
  });
  after(async () => {
    await client?.close();
    await pipeline?.stop();
    await worker?.stop();
  });

  it("a 16 MB prompt and its 16 MB result round trip through infer(), bytes equal; the streams hold references only", async () => {
    const prompt = bigText(16 * MB, 1);
    const r = await client.infer("echo", { prompt }, { id: "big-infer-1", timeoutMs: 120_000 });
    expect(r.status).to.equal("ok");
    expect(r.output?.text?.length).to.equal(prompt.length);
    expect(r.output?.text === prompt, "result text equals the prompt byte for byte").to.equal(true);

    const jsm = await jetstreamManager(nats.nc);
    const req = await jsm.streams.getMessage(STREAM_REQUESTS, { last_by_subj: "infer.req.normal.big.echo" });
    expect(req!.header.get(BODY_REF_HEADER)).to.equal("req/big-infer-1");
    expect(Number(req!.header.get(BODY_SIZE_HEADER))).to.be.greaterThan(16 * MB);
    expect(req!.data.length).to.equal(0);
    const res = await jsm.streams.getMessage(STREAM_RESULTS, { last_by_subj: "infer.res.big.big-infer-1" });
    expect(res!.header.get(BODY_REF_HEADER)).to.equal("res/big-infer-1");
    expect(res!.data.length).to.be.lessThan(4096);
    const stub = res!.json<InferResult>();
    expect(stub.status).to.equal("ok");
    expect(stub.output).to.equal(undefined);

    // A client reading the stored result later resolves the reference too.
    const later = await client.stored("big-infer-1");
    expect(later?.output?.text === prompt).to.equal(true);
  });

  it("a 16 MB prompt streams back as chunks and a final 16 MB result, bytes equal", async () => {
    const prompt = bigText(16 * MB, 7);
    const events: StreamEvent[] = [];
    for await (const ev of client.stream("echo", { prompt }, { id: "big-stream-1", timeoutMs: 120_000 })) events.push(ev);
    const chunks = events.filter((e): e is { seq: number; text: string } => "text" in e);
    const last = events[events.length - 1] as { result: InferResult };
    expect(last.result.status).to.equal("ok");
    expect(chunks.map((c) => c.seq)).to.deep.equal(chunks.map((_, i) => i));
    expect(chunks.map((c) => c.text).join("") === prompt, "chunks joined equal the prompt").to.equal(true);
    expect(last.result.output?.text === prompt, "final result equals the prompt").to.equal(true);
  });

  it("a reference to a missing object, to another request's object, or with another digest is answered INVALID_ARGUMENT with the reason", async () => {
    const js = jetstream(nats.nc);
    const send = async (id: string, ref: Record<string, string>): Promise<InferResult> => {
      const got = client.result(id, { timeoutMs: 30_000, checkStored: false });
      const h = natsHeaders();
      for (const [k, v] of Object.entries(ref)) h.set(k, v);
      await js.publish("infer.req.normal.big.echo", new Uint8Array(0), { msgID: id, headers: h });
      return got;
    };
    const missing = await send("ref-missing", { [BODY_REF_HEADER]: "req/ref-missing", [BODY_SIZE_HEADER]: "10" });
    expect(missing.error?.code).to.equal("INVALID_ARGUMENT");
    expect(missing.error?.message).to.match(/req\/ref-missing is not in object store infer_payloads_big/);

    const store = new PayloadStore(js);
    await store.put("big", payloadKey("req", "ref-owner"), new TextEncoder().encode(JSON.stringify({ prompt: "theirs" })));
    const foreign = await send("ref-foreign", { [BODY_REF_HEADER]: "req/ref-owner", [BODY_SIZE_HEADER]: "10" });
    expect(foreign.error?.code).to.equal("INVALID_ARGUMENT");
    expect(foreign.error?.message).to.match(/is not this request's object 'req\/ref-foreign'/);

    await store.put("big", payloadKey("req", "ref-digest"), new TextEncoder().encode(JSON.stringify({ prompt: "x" })));
    const digest = await send("ref-digest", { [BODY_REF_HEADER]: "req/ref-digest", [BODY_SIZE_HEADER]: "14", "Infer-Body-Digest": "SHA-256=AAAA" });
    expect(digest.error?.code).to.equal("INVALID_ARGUMENT");
    expect(digest.error?.message).to.match(/has digest SHA-256=.* not the SHA-256=AAAA its reference names/);

    const noSize = await send("ref-nosize", { [BODY_REF_HEADER]: "req/ref-nosize" });
    expect(noSize.error?.code).to.equal("INVALID_ARGUMENT");
    expect(noSize.error?.message).to.match(/Infer-Body-Size/);
  });

  it("a body over max_payload published inline is refused INVALID_ARGUMENT naming the limit and the way around it", async () => {
    const inline = new InferenceClient(nats.nc, "big", false, undefined, 8 * MB, { thresholdBytes: Infinity });
    const err = await inline.publish("echo", { prompt: bigText(2 * MB, 3) }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).to.be.instanceOf(InferenceError);
    expect((err as InferenceError).code).to.equal("INVALID_ARGUMENT");
    expect((err as InferenceError).message).to.match(/max_payload of 1048576 bytes/);
    expect((err as InferenceError).message).to.match(/object store/);
  });

  it("100 concurrent 4 MB requests are all answered while the large bodies held stay within the bound, and pulling waits for it", async () => {
    const gate = pipeline.payloads!.gate;
    const prompt = bigText(4 * MB, 11);
    let sawWaiting = 0;
    const sampler = setInterval(() => (sawWaiting = Math.max(sawWaiting, gate.waitingCount)), 5);
    try {
      const results = await Promise.all(
        Array.from({ length: 100 }, (_, i) => client.infer("echo", { prompt }, { id: `c4-${i}`, timeoutMs: 240_000 })),
      );
      expect(results.every((r) => r.output?.text === prompt)).to.equal(true);
    } finally {
      clearInterval(sampler);
    }
    expect(gate.peakBytes).to.be.at.most(gate.limitBytes);
    expect(gate.peakBytes).to.be.greaterThan(4 * MB);
    expect(sawWaiting, "requests waited for room").to.be.greaterThan(0);
    expect(gate.heldBytes).to.equal(0);
  });

  it("an object store that refuses writes: the client's large request fails UNAVAILABLE; the pipeline retries a large result until it is stored", async () => {
    const jsm = await jetstreamManager(nats.nc);
    // The tenant's bucket exists but takes nothing: every write is refused.
    await new Objm(jetstream(nats.nc)).create("infer_payloads_full", { max_bytes: 1024 });
    const full = new InferenceClient(nats.nc, "full");
    try {
      const err = await full.infer("echo", { prompt: "y".repeat(300 * 1024) }, { timeoutMs: 30_000 }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect((err as InferenceError).code).to.equal("UNAVAILABLE");
      expect((err as InferenceError).message).to.match(/could not be written to the object store/);

      // Inline request (under the client's threshold), result over the pipeline's: held while refused.
      const prompt = "z".repeat(200 * 1024);
      let answered = false;
      const got = full.infer("echo", { prompt }, { id: "full-1", timeoutMs: 60_000 }).finally(() => (answered = true));
      await waitFor("the request run on the worker", () => worker.engine.calls.some((c) => c.ids.includes("full-1")), 30_000);
      await new Promise((r) => setTimeout(r, 1_000));
      expect(answered, "not answered while the store refuses the result").to.equal(false);
      const si = await jsm.streams.info("OBJ_infer_payloads_full");
      await jsm.streams.update("OBJ_infer_payloads_full", { ...si.config, max_bytes: -1 });
      const r = await got;
      expect(r.output?.text === prompt, "the whole result once the store takes it").to.equal(true);
      expect(worker.engine.calls.filter((c) => c.ids.includes("full-1"))).to.have.length(1);
    } finally {
      await full.close();
    }
  });

  it("the sweeper removes objects whose message is gone (or never came) and keeps the referred ones", async () => {
    const js = jetstream(nats.nc);
    const store = new PayloadStore(js);
    // An orphan request body (its writer died before publishing), an orphan result body.
    await store.put("big", payloadKey("req", "orphan-req"), new Uint8Array(300_000));
    await store.put("big", payloadKey("res", "orphan-res"), new Uint8Array(300_000));
    const sweeper = pipeline.payloads!.sweeper;
    const report = await sweeper.sweep(Date.now() + 60 * 60_000);
    expect(report.removed).to.include.members(["big/req/orphan-req", "big/res/orphan-res"]);
    // Objects whose request and result are stored stay.
    expect(report.removed).to.not.include("big/req/big-infer-1");
    expect(report.removed).to.not.include("big/res/big-infer-1");
    expect(await store.info("big", "req/big-infer-1")).to.not.equal(undefined);
    expect(await store.info("big", "req/orphan-req")).to.equal(undefined);
    // Nothing left of the removed objects in the bucket's stream: chunks and descriptions alike.
    const jsm = await jetstreamManager(nats.nc);
    await waitFor("no orphan chunks", async () => {
      const left = (await store.list("big")).map((o) => o.name);
      return !left.includes("req/orphan-req") && !left.includes("res/orphan-res");
    });
    const si = await jsm.streams.info("OBJ_infer_payloads_big", { subjects_filter: "$O.infer_payloads_big.M.>" });
    const live = (await store.list("big")).length;
    expect(Object.keys(si.state.subjects ?? {}).length).to.equal(live);
  });
});
