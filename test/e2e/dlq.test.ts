/**
 * The dead-letter queue end to end, against a real nats-server, pipeline and gRPC worker:
 * poison requests land in INFER_DLQ with their reasons, `listDeadLetters` / `showDeadLetter`
 * read them, and `requeueDeadLetters` puts them back (under their own request id, once the
 * duplicate windows allow) so a now-healthy worker answers them where the client waits.
 */
import { expect } from "chai";
import { headers as natsHeaders, nuid } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import { InferenceClient } from "../../pipeline/client/client.js";
import { cmdDlq } from "../../pipeline/cli/dlq.js";
import { listDeadLetters, showDeadLetter, type DeadLetterEntry } from "../../pipeline/tools/dlq.js";
import { requeueDeadLetters } from "../../pipeline/tools/dlq-requeue.js";
import { STREAM_DLQ, STREAM_REQUESTS, STREAM_RESULTS } from "../../proto/wire.js";
import type { PipelineService } from "../../pipeline/service.js";
import { EngineError, type Engine, type EngineBatch, type EngineGeneration, type EngineItemResult, type EngineRequest } from "../../worker/engine.js";
import { WorkerServer } from "../../worker/server.js";
import { SimulatedEngine } from "../../worker/engines/simulated.js";
import { useNats, waitFor } from "../support/nats.js";
import { models, startPipeline, testConfig } from "../support/stack.js";

const enc = new TextEncoder();
const SUBJECT = "infer.req.normal.acme.flaky";
/** Short, so the test can wait a window out; the default is 2 minutes. */
const DUPLICATE_WINDOW_MS = 2_500;

/** The simulated engine, failing every batch with UNAVAILABLE while `failing` is set. */
class FlakyEngine implements Engine {
  failing = true;
  failures = 0;
  private readonly inner = new SimulatedEngine({ base_ms: 0, per_item_ms: 0 });
  get capacity(): number {
    return this.inner.capacity;
  }
  async infer(batch: EngineBatch, signal: AbortSignal): Promise<EngineItemResult[]> {
    if (this.failing) {
      this.failures++;
      throw new EngineError("UNAVAILABLE", "device lost");
    }
    return this.inner.infer(batch, signal);
  }
  generate(request: EngineRequest, signal: AbortSignal): EngineGeneration {
    return this.inner.generate(request, signal);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

/** Runs `f` with console.log / console.error collected instead of printed. */
async function captured(f: () => Promise<number>): Promise<{ code: number; out: string[]; err: string[] }> {
  const out: string[] = [];
  const err: string[] = [];
  const { log, error } = console;
  console.log = (...xs: unknown[]) => void out.push(xs.map(String).join(" "));
  console.error = (...xs: unknown[]) => void err.push(xs.map(String).join(" "));
  try {
    return { code: await f(), out, err };
  } finally {
    console.log = log;
    console.error = error;
  }
}

describe("dead-letter queue: list, show, requeue", function () {
  this.timeout(60_000);
  const nats = useNats();
  let engine: FlakyEngine;
  let worker: WorkerServer;
  let pipeline: PipelineService;
  let client: InferenceClient;
  let jsm: JetStreamManager;
  const id = `flaky-${nuid.next()}`;
  const body = { prompt: "try me again" };
  const noIdBody = JSON.stringify({ prompt: "no id" });
  let poisoned: DeadLetterEntry;
  let noId: DeadLetterEntry;
  /** When the duplicate windows of the poisoned request end. */
  let windowEnd = 0;

  before(async () => {
    engine = new FlakyEngine();
    worker = await WorkerServer.start({ engine });
    pipeline = await startPipeline(
      testConfig(nats.url, {
        // Fails fast: 2 deliveries, or 1 s waiting for a worker once the breaker ejected it.
        models: models(["flaky"], { timeout_ms: 1_000 }),
        workers: [{ model: "flaky", version: "v1", endpoint: worker.endpoint }],
        consumer: { maxDeliver: 2 },
        streams: { duplicateWindowMs: DUPLICATE_WINDOW_MS },
        pipeline: { priorities: ["normal"], healthIntervalMs: 200 },
      }),
    );
    client = new InferenceClient(nats.nc, "acme");
    jsm = await jetstreamManager(nats.nc);
  });

  after(async () => {
    await client?.close();
    await pipeline?.stop();
    await worker?.stop();
    await engine?.close();
  });

  it("dead-letters a request without an id and one that stays UNAVAILABLE, with their reasons", async () => {
    const testStartedAt = Date.now();
    const h = natsHeaders();
    h.set("Content-Type", "application/json");
    await jetstream(nats.nc).publish(SUBJECT, enc.encode(noIdBody), { headers: h });
    const r = await client.request("flaky", body, { id, timeoutMs: 20_000 });
    expect(r.status).to.equal("error");
    expect(r.error?.code).to.equal("UNAVAILABLE");
    expect(engine.failures).to.be.greaterThan(0);

    let entries: DeadLetterEntry[] = [];
    await waitFor("two dead letters", async () => (entries = await listDeadLetters(nats.nc, { model: "flaky" })).length >= 2, 10_000);
    expect(entries).to.have.length(2);
    noId = entries.find((e) => e.requestId === undefined)!;
    poisoned = entries.find((e) => e.requestId === id)!;

    expect(noId).to.include({ tenant: "acme", model: "flaky", code: "INVALID_ARGUMENT", originalSubject: SUBJECT, size: noIdBody.length, deliveries: 1 });
    expect(noId.reason).to.match(/Nats-Msg-Id is missing/);
    expect(noId.subject).to.equal("infer.dlq.acme.flaky");

    expect(poisoned).to.include({ tenant: "acme", model: "flaky", code: "UNAVAILABLE", originalSubject: SUBJECT });
    expect(poisoned.reason).to.match(/gave up after \d+ deliveries/);
    expect(poisoned.deliveries).to.be.at.least(2);
    expect(poisoned.originalSeq).to.be.a("number");
    // Dead-lettered during this test (its start is before the request was published).
    expect(poisoned.time.getTime()).to.be.within(testStartedAt, Date.now());

    expect((await listDeadLetters(nats.nc, { code: "unavailable" })).map((e) => e.seq)).to.deep.equal([poisoned.seq]);
    expect(await listDeadLetters(nats.nc, { tenant: "acme", limit: 1 })).to.have.length(1);
    expect(await listDeadLetters(nats.nc, { tenant: "nobody" })).to.deep.equal([]);
  });

  it("does not requeue inside the duplicate window, and says until when", async () => {
    const report = await requeueDeadLetters(nats.nc, { model: "flaky" });
    expect(report).to.include({ selected: 2, requeued: 0, duplicates: 1, skipped: 1, failed: 0 });
    const dup = report.items.find((i) => i.seq === poisoned.seq)!;
    expect(dup.action).to.equal("duplicate");
    expect(dup.reason).to.match(/not requeued yet: .*duplicate window of 2\.5 s/);
    expect(dup.retryAfter!.getTime()).to.be.greaterThan(Date.now());
    const skipped = report.items.find((i) => i.seq === noId.seq)!;
    expect(skipped.action).to.equal("skipped");
    expect(skipped.reason).to.match(/no usable id/);
    expect(await listDeadLetters(nats.nc, { model: "flaky" })).to.have.length(2);
    windowEnd = dup.retryAfter!.getTime();
  });

  it("reports a copy JetStream de-duplicated as not requeued yet, and keeps the entry", async () => {
    // A request on a priority this pipeline does not consume, and a dead letter of it that
    // does not say where the original is (so only the publish acknowledgement can tell).
    const js = jetstream(nats.nc);
    const other = `idle-${nuid.next()}`;
    await js.publish("infer.req.low.acme.idle", enc.encode(JSON.stringify({ prompt: "x" })), { msgID: other });
    const h = natsHeaders();
    h.set("Infer-Request-Id", other);
    h.set("Infer-Original-Subject", "infer.req.low.acme.idle");
    h.set("Infer-Error-Code", "UNAVAILABLE");
    const letter = await js.publish("infer.dlq.acme.idle", enc.encode(JSON.stringify({ prompt: "x" })), { headers: h });
    const report = await requeueDeadLetters(nats.nc, { ids: [other] });
    expect(report).to.include({ selected: 1, requeued: 0, duplicates: 1 });
    expect(report.items[0]!.reason).to.match(/INFER_REQ still remembers request id \S+ within its duplicate window of 2\.5 s and would drop the copy; try again after .* at the latest/);
    expect((await showDeadLetter(nats.nc, letter.seq))?.requestId).to.equal(other);
  });

  it("shows an entry's headers and body, as text or as base64", async () => {
    const d = (await showDeadLetter(nats.nc, poisoned.seq))!;
    expect(d.bodyEncoding).to.equal("utf8");
    expect(JSON.parse(d.body)).to.deep.equal(body);
    const names = d.headers.map(([k]) => k);
    expect(names).to.include.members(["Infer-Error-Code", "Infer-Request-Id", "Infer-Original-Seq", "Content-Type"]);
    expect(await showDeadLetter(nats.nc, 999_999)).to.equal(undefined);

    const binary = await jetstream(nats.nc).publish("infer.dlq.other.bin", new Uint8Array([0xff, 0xfe, 0x00, 0x41]));
    const b = (await showDeadLetter(nats.nc, binary.seq))!;
    expect(b.bodyEncoding).to.equal("base64");
    expect(b.body).to.equal(Buffer.from([0xff, 0xfe, 0x00, 0x41]).toString("base64"));
  });

  it("'dlq list --json' and 'dlq show' print the entries", async () => {
    const list = await captured(() => cmdDlq(["list", "--json", "--model", "flaky", "--server", nats.url]));
    expect(list.code).to.equal(0);
    const rows = list.out.map((l) => JSON.parse(l) as { seq: number; requestId?: string; code: string; reason: string });
    expect(rows.map((r) => r.seq)).to.deep.equal([noId.seq, poisoned.seq].sort((a, b) => a - b));
    expect(rows.find((r) => r.requestId === id)?.code).to.equal("UNAVAILABLE");

    const table = await captured(() => cmdDlq(["list", "--server", nats.url, "--code", "INVALID_ARGUMENT"]));
    expect(table.code).to.equal(0);
    expect(table.out[0]).to.match(/^seq\ttime\ttenant/);
    expect(table.out.join("\n")).to.contain("Nats-Msg-Id is missing").and.to.contain("1 dead letter");

    const show = await captured(() => cmdDlq(["show", String(poisoned.seq), "--server", nats.url]));
    expect(show.code).to.equal(0);
    expect(show.out.join("\n")).to.contain("try me again").and.to.contain("UNAVAILABLE");

    const usage = await captured(() => cmdDlq(["requeue", "--server", nats.url]));
    expect(usage.code).to.equal(2);
    expect(usage.err.join("\n")).to.contain("say which dead letters");
  });

  it("'dlq requeue --dry-run' reports and changes nothing", async () => {
    // Wait the duplicate window out.
    await new Promise((r) => setTimeout(r, Math.max(0, windowEnd - Date.now()) + 100));
    const dry = await captured(() => cmdDlq(["requeue", "--model", "flaky", "--dry-run", "--server", nats.url]));
    expect(dry.code, dry.out.join("\n")).to.equal(0);
    const text = dry.out.join("\n");
    expect(text).to.contain(`would-requeue seq ${poisoned.seq}  id ${id}  → ${SUBJECT}`);
    expect(text).to.contain("2 selected: would requeue 1, not yet (duplicate window) 0, skipped 1, failed 0 (dry run: nothing changed)");
    expect(await listDeadLetters(nats.nc, { model: "flaky" })).to.have.length(2);
  });

  it("requeues under the same id: a healthy worker answers where the client waits, and the entry leaves the DLQ", async () => {
    engine.failing = false;
    // Long enough for the worker's circuit breaker to let a probe through.
    await pipeline.registry.put("flaky", { versions: { v1: { weight: 100 } }, timeout_ms: 20_000 });
    const answer = client.result(id, { timeoutMs: 30_000, checkStored: false });
    const report = await requeueDeadLetters(nats.nc, { model: "flaky" });
    expect(report).to.include({ selected: 2, requeued: 1, duplicates: 0, skipped: 1, failed: 0 });
    const item = report.items.find((i) => i.action === "requeued")!;
    expect(item).to.include({ seq: poisoned.seq, requestId: id, subject: SUBJECT });

    const r = await answer;
    expect(r.status).to.equal("ok");
    expect(r.output?.text).to.equal(`flaky@v1: ${body.prompt}`);

    // The new copy carries the request's own id and none of the DLQ's headers.
    const copy = (await jsm.streams.getMessage(STREAM_REQUESTS, { seq: item.requeuedSeq! }))!;
    expect(copy.header.get("Nats-Msg-Id")).to.equal(id);
    expect(copy.header.get("Content-Type")).to.equal("application/json");
    expect(copy.header.get("Infer-Error-Code")).to.equal("");
    expect(copy.header.get("Infer-Request-Id")).to.equal("");
    // INFER_RES keeps one result per id: the ok replaced the error.
    await waitFor("the stored result to be ok", async () => (await client.stored(id))?.status === "ok", 5_000);
    const left = await listDeadLetters(nats.nc, { model: "flaky" });
    expect(left.map((e) => e.seq)).to.deep.equal([noId.seq]);
    // What else is there stays: the no-id entry, the binary one, the de-duplicated one.
    expect((await jsm.streams.info(STREAM_DLQ)).state.messages).to.equal(3);
    expect((await jsm.streams.getMessage(STREAM_RESULTS, { last_by_subj: `infer.res.acme.${id}` }))!.header.get("Infer-Status")).to.equal("ok");
  });
});
