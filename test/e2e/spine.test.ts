/**
 * The spine, end to end against a real nats-server and a real gRPC worker: publish → JetStream →
 * pipeline → worker → result.
 */
import { expect } from "chai";
import { headers as natsHeaders, nuid } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { InferenceClient } from "../../pipeline/client/client.js";
import { InferenceError } from "../../pipeline/client/errors.js";
import { STREAM_DLQ, STREAM_RESULTS } from "../../proto/wire.js";
import type { PipelineService } from "../../pipeline/service.js";
import type { InferResult } from "../../operators/types.js";
import { useNats, waitFor } from "../support/nats.js";
import { models, startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

const enc = new TextEncoder();
const dec = new TextDecoder();

describe("spine: publish → pipeline → worker → result", function () {
  this.timeout(120_000);
  const nats = useNats();
  let worker: TestWorker;
  let pipeline: PipelineService;
  let client: InferenceClient;

  before(async () => {
    worker = await startWorker({ base_ms: 2, per_item_ms: 0.05 });
    const names = ["echo", "reverse", "upper"];
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: models(names),
        workers: names.map((model) => ({ model, version: "v1", endpoint: worker.server.endpoint })),
      }),
    );
    client = new InferenceClient(nats.nc, "acme");
  });

  after(async () => {
    await client?.close();
    await pipeline?.stop();
    await worker?.stop();
  });

  it("answers 2,000 concurrent requests across 3 models, each exactly once with its own output", async () => {
    const seen = new Map<string, number>();
    const sub = nats.nc.subscribe("infer.res.acme.>", {
      callback: (_e, m) => {
        const id = m.subject.split(".")[3]!;
        seen.set(id, (seen.get(id) ?? 0) + 1);
      },
    });
    const expected = (model: string, p: string): string =>
      model === "echo" ? p : model === "reverse" ? [...p].reverse().join("") : p.toUpperCase();
    const jobs = Array.from({ length: 2000 }, (_, i) => {
      const model = ["echo", "reverse", "upper"][i % 3]!;
      const prompt = `request ${i} ${nuid.next()}`;
      return { model, prompt, id: `spine-${i}` };
    });
    const results = await Promise.all(jobs.map((j) => client.infer(j.model, { prompt: j.prompt }, { id: j.id })));
    for (let i = 0; i < jobs.length; i++) {
      const r = results[i]!;
      const j = jobs[i]!;
      expect(r.id).to.equal(j.id);
      expect(r.status).to.equal("ok");
      expect(r.model).to.equal(j.model);
      expect(r.version).to.equal("v1");
      expect(r.output?.text).to.equal(expected(j.model, j.prompt));
      expect(r.timing?.batch_size).to.be.within(1, 32);
    }
    // Let any stray duplicate arrive before counting.
    await new Promise((r) => setTimeout(r, 300));
    sub.unsubscribe();
    expect(seen.size).to.equal(2000);
    for (const [id, n] of seen) expect(n, `results for ${id}`).to.equal(1);
    const jsm = await jetstreamManager(nats.nc);
    const info = await jsm.streams.info(STREAM_RESULTS);
    expect(info.state.messages).to.be.at.least(2000);
    // Batching happened: fewer device batches than requests.
    expect(worker.engine.counters.batches).to.be.lessThan(2000);
  });

  it("answers an unknown model with NOT_FOUND and keeps serving", async () => {
    const err = await client.infer("no-such-model", { prompt: "x" }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).to.be.instanceOf(InferenceError);
    expect((err as InferenceError).code).to.equal("NOT_FOUND");
    expect((err as InferenceError).message).to.contain("no-such-model");
    const ok = await client.infer("echo", { prompt: "still here" });
    expect(ok.output?.text).to.equal("still here");
  });

  it("answers an unknown pinned version with NOT_FOUND", async () => {
    const r = await client.request("echo", { prompt: "x" }, { version: "v99" });
    expect(r.status).to.equal("error");
    expect(r.error?.code).to.equal("NOT_FOUND");
    expect(r.error?.message).to.contain("v99");
  });

  it("answers malformed JSON with INVALID_ARGUMENT", async () => {
    const js = jetstream(nats.nc);
    const id = `bad-json-${nuid.next()}`;
    const waiting = client.result(id, { timeoutMs: 10_000 });
    await js.publish("infer.req.normal.acme.echo", enc.encode("{not json"), { msgID: id });
    const r = await waiting;
    expect(r.status).to.equal("error");
    expect(r.error?.code).to.equal("INVALID_ARGUMENT");
  });

  it("answers an over-size payload with INVALID_ARGUMENT naming the limit", async () => {
    // Any NATS client may send one (the sluice client sends such a body through the object store).
    const id = `big-${nuid.next()}`;
    const waiting = client.result(id, { timeoutMs: 10_000 });
    await jetstream(nats.nc).publish("infer.req.normal.acme.echo", enc.encode(JSON.stringify({ prompt: "x".repeat(300 * 1024) })), { msgID: id });
    const r = await waiting;
    expect(r.status).to.equal("error");
    expect(r.error?.code).to.equal("INVALID_ARGUMENT");
    expect(r.error?.message).to.match(/limit/);
    const claimed = await client.request("echo", { prompt: "x".repeat(300 * 1024) });
    expect(claimed.status).to.equal("ok");
  });

  it("sends a request without an id to the DLQ with the reason, and keeps serving", async () => {
    const js = jetstream(nats.nc);
    const jsm = await jetstreamManager(nats.nc);
    const before = (await jsm.streams.info(STREAM_DLQ)).state.messages;
    const h = natsHeaders();
    h.set("Content-Type", "application/json");
    await js.publish("infer.req.normal.acme.echo", enc.encode(JSON.stringify({ prompt: "no id" })), { headers: h });
    await waitFor("a dead letter", async () => (await jsm.streams.info(STREAM_DLQ)).state.messages > before);
    const m = await jsm.streams.getMessage(STREAM_DLQ, { last_by_subj: "infer.dlq.acme.echo" });
    expect(m).to.not.equal(null);
    expect(m!.header.get("Infer-Error-Code")).to.equal("INVALID_ARGUMENT");
    expect(m!.header.get("Infer-Error-Reason")).to.match(/id/i);
    expect(m!.header.get("Infer-Original-Subject")).to.equal("infer.req.normal.acme.echo");
    expect(JSON.parse(dec.decode(m!.data))).to.deep.equal({ prompt: "no id" });
    const ok = await client.infer("echo", { prompt: "after dlq" });
    expect(ok.output?.text).to.equal("after dlq");
  });

  it("answers per-item worker errors without failing the rest of the batch", async () => {
    const [bad, good] = await Promise.all([
      client.request("echo", { prompt: "a", parameters: { simulate_error: "INTERNAL" } }),
      client.request("echo", { prompt: "b" }),
    ]);
    expect(bad.status).to.equal("error");
    expect(bad.error?.code).to.equal("INTERNAL");
    expect(good.status).to.equal("ok");
    expect(good.output?.text).to.equal("b");
  });

  it("answers a request whose deadline already passed with DEADLINE_EXCEEDED, without a worker call", async () => {
    const before = worker.engine.counters.items;
    const id = `late-${nuid.next()}`;
    const r = await client.request("echo", { prompt: "too late" }, { id, deadlineMs: Date.now() - 1 });
    expect(r.error?.code).to.equal("DEADLINE_EXCEEDED");
    expect(worker.engine.calls.some((c) => c.ids.includes(id))).to.equal(false);
    expect(worker.engine.counters.items).to.equal(before);
  });

  it("publishes one result per id: publishing the same id twice is one request", async () => {
    const id = `dup-${nuid.next()}`;
    const [a, b] = await Promise.all([
      client.request("echo", { prompt: "once" }, { id }),
      client.request("echo", { prompt: "once" }, { id }),
    ]);
    expect(a.output?.text).to.equal("once");
    expect(b.output?.text).to.equal("once");
    expect(worker.engine.calls.filter((c) => c.ids.includes(id))).to.have.length(1);
  });

  it("lets a late client read a stored result", async () => {
    const { id } = await client.publish("echo", { prompt: "for later" });
    await waitFor("the result to be stored", async () => (await client.stored(id)) !== undefined);
    const late = new InferenceClient(nats.nc, "acme");
    const r: InferResult = await late.result(id, { timeoutMs: 5_000 });
    expect(r.output?.text).to.equal("for later");
    await late.close();
  });
});
