import { createServer, type AddressInfo, type Socket } from "node:net";
import { expect } from "chai";
import type { Settled } from "../operators/settle-outcome.js";
import type { Delivery, InferJob, InferResult } from "../operators/types.js";
import {
  resolveTracingConfig,
  SERVICE_CLIENT,
  SERVICE_PIPELINE,
  SERVICE_WORKER,
  startTracing,
  traceEngine,
  type Env,
  type Tracing,
} from "../pipeline/telemetry/telemetry.js";
import type { Engine, EngineBatch, EngineGeneration, EngineItemResult } from "../worker/engine.js";
import { OtlpReceiver, type ReceivedSpan } from "./support/otlp-receiver.js";

const SUBJECT = "infer.req.normal.acme.echo";
const FOREIGN_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736";
const FOREIGN_SPAN = "00f067aa0ba902b7";

function fakeDelivery(opts: { seq: number; storedAtMs: number; pulledAtMs: number; headers?: Record<string, string>; subject?: string }): Delivery {
  const headers = opts.headers ?? {};
  return {
    subject: opts.subject ?? SUBJECT,
    data: new Uint8Array(),
    header: (name) => Object.entries(headers).find(([k]) => k.toLowerCase() === name.toLowerCase())?.[1],
    headerEntries: () => Object.entries(headers),
    seq: opts.seq,
    deliveryCount: 1,
    storedAtMs: opts.storedAtMs,
    pulledAtMs: opts.pulledAtMs,
    settled: false,
    ack: () => undefined,
    nak: () => undefined,
    term: () => undefined,
    working: () => undefined,
  };
}

function fakeJob(id: string, delivery: Delivery): InferJob {
  return { id, tenant: "acme", model: "echo", priority: "normal", stream: false, delivery, version: "v1" };
}

function settledWith(job: InferJob, result: InferResult): Settled {
  return { outcome: { kind: "result", job, result }, action: result.status === "ok" ? "ack" : "term", result, deadLettered: false };
}

/** An engine that answers every request with its prompt, and generates three tokens. */
const echoEngine: Engine = {
  capacity: 8,
  close: () => Promise.resolve(),
  infer: (batch: EngineBatch): Promise<EngineItemResult[]> =>
    Promise.resolve(batch.requests.map((r) => ({ ok: true as const, output: { text: r.prompt ?? "" }, usage: { prompt_tokens: 1, completion_tokens: 1 } }))),
  generate: (): EngineGeneration => ({
    usage: () => ({ prompt_tokens: 1, completion_tokens: 3 }),
    [Symbol.asyncIterator]: async function* () {
      for (const text of ["a", "b", "c"]) yield { text };
    },
  }),
};

function one(spans: ReceivedSpan[], pred: (s: ReceivedSpan) => boolean, what: string): ReceivedSpan {
  const found = spans.filter(pred);
  expect(found, `exactly one span: ${what}`).to.have.length(1);
  return found[0]!;
}

async function closedPort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve) => srv.listen(0, "127.0.0.1", resolve));
  const port = (srv.address() as AddressInfo).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

describe("telemetry: tracing", function () {
  let receiver: OtlpReceiver;
  const started: Tracing[] = [];
  const env = (extra: Env = {}): Env => ({ OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url, OTEL_BSP_SCHEDULE_DELAY: "20", ...extra });
  const tracing = (serviceName: string, extra: Env = {}): Tracing => {
    const t = startTracing({ serviceName, env: env(extra) });
    started.push(t);
    return t;
  };

  before(async function () {
    receiver = await OtlpReceiver.start();
  });
  beforeEach(function () {
    receiver.clear();
  });
  afterEach(async function () {
    await Promise.all(started.splice(0).map((t) => t.shutdown()));
  });
  after(async function () {
    await receiver.stop();
  });

  it("exports one trace from publish through queue, batch and worker over OTLP http/protobuf", async function () {
    const client = tracing(SERVICE_CLIENT);
    const pipeline = tracing(SERVICE_PIPELINE);
    const worker = tracing(SERVICE_WORKER);
    expect(client.enabled && pipeline.enabled && worker.enabled).to.equal(true);

    const send1 = client.startPublish({ subject: SUBJECT, id: "r1", tenant: "acme", model: "echo", priority: "normal" });
    const send2 = client.startPublish({ subject: SUBJECT, id: "r2", tenant: "acme", model: "echo", priority: "normal" });
    send1.end();
    send2.end();
    expect(send1.carrier.traceparent).to.match(/^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/);

    const now = Date.now();
    const d1 = fakeDelivery({ seq: 7, storedAtMs: now - 40, pulledAtMs: now - 5, headers: { "Nats-Msg-Id": "r1", traceparent: send1.carrier.traceparent! } });
    const d2 = fakeDelivery({ seq: 8, storedAtMs: now - 30, pulledAtMs: now - 4, headers: { "Nats-Msg-Id": "r2", traceparent: send2.carrier.traceparent! } });
    const job1 = fakeJob("r1", d1);
    const job2 = fakeJob("r2", d2);
    const req1 = pipeline.startRequest(d1, job1);
    const req2 = pipeline.startRequest(d2, job2);
    expect(pipeline.requestOf(d1)).to.equal(req1);
    expect(pipeline.startRequest(d1)).to.equal(req1, "a second start returns the open span");
    expect(req1.queueMs).to.equal(35);
    expect(req2.queueMs).to.equal(26);

    const batch = pipeline.startBatch({ model: "echo", version: "v1", jobs: [job1, job2] });
    const failedCall = batch.startWorkerCall("127.0.0.1:50050");
    failedCall.end("UNAVAILABLE", new Error("connection refused"));
    const call = batch.startWorkerCall("127.0.0.1:50051");
    const traced = traceEngine(echoEngine, worker, { workerId: "w1" });
    const answers = await traced.infer(
      { model: "echo", version: "v1", traceparent: call.carrier.traceparent, requests: [{ id: "r1", tenant: "acme", model: "echo", version: "v1", prompt: "hi" }] },
      new AbortController().signal,
    );
    expect(answers).to.deep.equal([{ ok: true, output: { text: "hi" }, usage: { prompt_tokens: 1, completion_tokens: 1 } }]);
    call.end();
    batch.end();

    const result1 = req1.startPublish("infer.res.acme.r1");
    result1.end();
    pipeline.settle(settledWith(job1, { id: "r1", status: "ok" }));
    pipeline.settle(settledWith(job2, { id: "r2", status: "error", error: { code: "INTERNAL", message: "boom" } }));
    expect(pipeline.requestOf(d1)).to.equal(undefined, "a settled request is forgotten");

    await Promise.all([client.forceFlush(), pipeline.forceFlush(), worker.forceFlush()]);
    // 2 sends, 2 receives with their queue waits, the batch (in r1's trace) with a member span
    // in r2's trace, 2 calls, the result's send, the worker's server and engine spans.
    const spans = await receiver.waitForSpans((all) => all.length >= 13);
    expect(spans).to.have.length(13);
    expect(new Set(receiver.requests().map((r) => r.contentType))).to.deep.equal(new Set(["application/x-protobuf"]));

    const pub1 = one(spans, (s) => s.name === "send infer.req" && s.attributes["messaging.message.id"] === "r1", "client send r1");
    const pub2 = one(spans, (s) => s.name === "send infer.req" && s.attributes["messaging.message.id"] === "r2", "client send r2");
    expect(pub1.kind).to.equal("PRODUCER");
    expect(pub1.serviceName).to.equal("sluice-client");
    expect(pub1.parentSpanId).to.equal(undefined);
    expect(pub1.attributes).to.include({ "messaging.system": "nats", "messaging.destination.name": SUBJECT, "messaging.operation.type": "send" });

    const recv1 = one(spans, (s) => s.name === "receive infer.req" && s.attributes["messaging.message.id"] === "r1", "receive r1");
    const recv2 = one(spans, (s) => s.name === "receive infer.req" && s.attributes["messaging.message.id"] === "r2", "receive r2");
    expect(recv1.kind).to.equal("CONSUMER");
    expect(recv1.serviceName).to.equal("sluice-pipeline");
    expect(recv1.traceId).to.equal(pub1.traceId);
    expect(recv1.parentSpanId).to.equal(pub1.spanId);
    expect(recv2.traceId).to.equal(pub2.traceId);
    expect(recv2.parentSpanId).to.equal(pub2.spanId);
    expect(recv1.attributes).to.include({
      "messaging.system": "nats",
      "messaging.destination.name": SUBJECT,
      "sluice.stream.sequence": 7,
      "sluice.delivery.count": 1,
      "sluice.tenant": "acme",
      "sluice.model": "echo",
      "sluice.version": "v1",
      "sluice.priority": "normal",
      "sluice.status": "ok",
    });
    // The JetStream wait is in the trace: the span starts when the message was stored.
    expect(Math.abs(recv1.startMs - (now - 40))).to.be.below(1);
    expect(recv1.status.code).to.equal("UNSET");
    expect(recv2.status.code).to.equal("ERROR");
    expect(recv2.attributes["error.type"]).to.equal("INTERNAL");

    const wait1 = one(spans, (s) => s.name === "queue wait" && s.parentSpanId === recv1.spanId, "queue wait of r1");
    expect(Math.abs(wait1.startMs - (now - 40))).to.be.below(1);
    expect(Math.abs(wait1.endMs - (now - 5))).to.be.below(1);

    const proc = one(spans, (s) => s.name === "process infer.req", "batch");
    expect(proc.kind).to.equal("CONSUMER");
    // The batch rides in its first request's trace: that trace holds the whole path.
    expect(proc.traceId).to.equal(recv1.traceId);
    expect(proc.parentSpanId).to.equal(recv1.spanId);
    expect(proc.attributes).to.include({ "messaging.batch.message_count": 2, "sluice.model": "echo", "sluice.version": "v1", "sluice.worker": "127.0.0.1:50051" });
    expect(proc.links.map((l) => `${l.traceId}/${l.spanId}`)).to.have.members([`${recv1.traceId}/${recv1.spanId}`, `${recv2.traceId}/${recv2.spanId}`]);

    expect(spans.filter((s) => s.name === "batch" && s.parentSpanId === recv1.spanId)).to.have.length(0);
    for (const recv of [recv2]) {
      const member = one(spans, (s) => s.name === "batch" && s.parentSpanId === recv.spanId, "batch member");
      expect(member.traceId).to.equal(recv.traceId);
      expect(member.links).to.have.length(1);
      expect(member.links[0]).to.include({ traceId: proc.traceId, spanId: proc.spanId });
    }

    const calls = spans.filter((s) => s.name === "infer.v1.Worker/Infer" && s.kind === "CLIENT");
    expect(calls).to.have.length(2);
    for (const c of calls) {
      expect(c.traceId).to.equal(proc.traceId);
      expect(c.parentSpanId).to.equal(proc.spanId);
    }
    const ok = one(calls, (s) => s.attributes["server.port"] === 51 + 50000, "the call that answered");
    expect(ok.attributes).to.include({ "rpc.system": "grpc", "rpc.service": "infer.v1.Worker", "rpc.method": "Infer", "server.address": "127.0.0.1", "sluice.attempt": 2 });
    const refused = one(calls, (s) => s.attributes["server.port"] === 50050, "the call that failed");
    expect(refused.status.code).to.equal("ERROR");
    expect(refused.events.map((e) => e.name)).to.include("exception");

    const server = one(spans, (s) => s.kind === "SERVER", "worker server span");
    expect(server.serviceName).to.equal("sluice-worker");
    expect(server.traceId).to.equal(proc.traceId);
    expect(server.parentSpanId).to.equal(ok.spanId);
    expect(server.attributes).to.include({ "sluice.worker": "w1", "sluice.batch.size": 1, "sluice.model": "echo" });
    const engine = one(spans, (s) => s.name === "engine infer", "engine span");
    expect(engine.parentSpanId).to.equal(server.spanId);
    expect(engine.serviceName).to.equal("sluice-worker");

    const res = one(spans, (s) => s.name === "send infer.res", "result publish");
    expect(res.kind).to.equal("PRODUCER");
    expect(res.traceId).to.equal(recv1.traceId);
    expect(res.parentSpanId).to.equal(recv1.spanId);
    expect(res.attributes["messaging.destination.name"]).to.equal("infer.res.acme.r1");
  });

  it("starts a new trace for a request without context and continues one with context", async function () {
    const pipeline = tracing(SERVICE_PIPELINE);
    const now = Date.now();
    const bare = fakeDelivery({ seq: 1, storedAtMs: now - 3, pulledAtMs: now });
    const carried = fakeDelivery({ seq: 2, storedAtMs: now - 3, pulledAtMs: now, headers: { traceparent: `00-${FOREIGN_TRACE}-${FOREIGN_SPAN}-01`, tracestate: "vendor=x" } });
    const malformed = fakeDelivery({ seq: 3, storedAtMs: now - 3, pulledAtMs: now, headers: { traceparent: "00-not-a-trace-01" } });
    const a = pipeline.startRequest(bare);
    const b = pipeline.startRequest(carried);
    const c = pipeline.startRequest(malformed);
    expect(b.traceId).to.equal(FOREIGN_TRACE);
    expect(b.carrier.tracestate).to.equal("vendor=x");
    expect(a.traceId).to.match(/^[0-9a-f]{32}$/).and.not.equal(FOREIGN_TRACE);
    expect(c.traceId).to.match(/^[0-9a-f]{32}$/).and.not.equal(FOREIGN_TRACE).and.not.equal(a.traceId);
    for (const r of [a, b, c]) r.end();
    await pipeline.forceFlush();

    const spans = (await receiver.waitForSpans((all) => all.filter((s) => s.name === "receive infer.req").length >= 3)).filter((s) => s.name === "receive infer.req");
    const bySeq = (seq: number): ReceivedSpan => one(spans, (s) => s.attributes["sluice.stream.sequence"] === seq, `seq ${seq}`);
    expect(bySeq(1).parentSpanId).to.equal(undefined);
    expect(bySeq(1).traceId).to.equal(a.traceId);
    expect(bySeq(2).traceId).to.equal(FOREIGN_TRACE);
    expect(bySeq(2).parentSpanId).to.equal(FOREIGN_SPAN);
    expect(bySeq(2).traceState).to.equal("vendor=x");
    expect(bySeq(3).parentSpanId).to.equal(undefined);
  });

  it("exports over http/json to a traces endpoint given as is", async function () {
    const t = startTracing({
      serviceName: SERVICE_CLIENT,
      env: { OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: receiver.tracesUrl, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: "http/json", OTEL_SERVICE_NAME: "json-client" },
    });
    started.push(t);
    const send = t.startPublish({ subject: SUBJECT, id: "j1" });
    send.end();
    await t.forceFlush();
    const spans = await receiver.waitForSpans((all) => all.length >= 1);
    expect(receiver.requests().map((r) => r.contentType)).to.deep.equal(["application/json"]);
    expect(spans[0]).to.include({ name: "send infer.req", kind: "PRODUCER", serviceName: "json-client", traceId: send.traceId });
    expect(spans[0]!.attributes["messaging.message.id"]).to.equal("j1");
  });

  it("traces a streamed generation on the worker, ending it as cancelled when the caller leaves early", async function () {
    const worker = tracing(SERVICE_WORKER);
    const traced = traceEngine(echoEngine, worker);
    const parent = `00-${FOREIGN_TRACE}-${FOREIGN_SPAN}-01`;
    const request = { id: "g1", tenant: "acme", model: "llm", version: "v1", prompt: "x", traceparent: parent };
    const full: string[] = [];
    for await (const t of traced.generate(request, new AbortController().signal)) full.push(t.text);
    expect(full).to.deep.equal(["a", "b", "c"]);
    for await (const t of traced.generate({ ...request, id: "g2" }, new AbortController().signal)) {
      expect(t.text).to.equal("a");
      break;
    }
    await worker.forceFlush();
    const spans = await receiver.waitForSpans((all) => all.length >= 4);
    const engines = spans.filter((s) => s.name === "engine generate");
    expect(engines).to.have.length(2);
    const servers = spans.filter((s) => s.kind === "SERVER");
    expect(servers.map((s) => s.parentSpanId)).to.deep.equal([FOREIGN_SPAN, FOREIGN_SPAN]);
    const done = one(engines, (s) => s.attributes["sluice.tokens"] === 3, "finished generation");
    expect(done.status.code).to.equal("UNSET");
    expect(done.events.map((e) => e.name)).to.deep.equal(["first token"]);
    const left = one(engines, (s) => s.attributes["sluice.tokens"] === 1, "abandoned generation");
    expect(left.status.code).to.equal("ERROR");
    expect(left.attributes["error.type"]).to.equal("CANCELLED");
  });

  it("is off without an endpoint, yet passes incoming trace context through unchanged", async function () {
    const off = startTracing({ serviceName: SERVICE_PIPELINE, env: {} });
    expect(off.enabled).to.equal(false);
    const incoming = `00-${FOREIGN_TRACE}-${FOREIGN_SPAN}-01`;
    const d = fakeDelivery({ seq: 1, storedAtMs: Date.now() - 1, pulledAtMs: Date.now(), headers: { traceparent: incoming } });
    const req = off.startRequest(d, fakeJob("o1", d));
    expect(req.recording).to.equal(false);
    expect(req.carrier.traceparent).to.equal(incoming);
    const batch = off.startBatch({ model: "echo", version: "v1", jobs: [fakeJob("o0", fakeDelivery({ seq: 0, storedAtMs: 0, pulledAtMs: 0 })), fakeJob("o1", d)] });
    expect(batch.startWorkerCall("127.0.0.1:1").carrier.traceparent).to.equal(incoming);
    expect(req.startPublish("infer.res.acme.o1").carrier.traceparent).to.equal(incoming);
    const noContext = off.startPublish({ subject: SUBJECT, id: "o2" });
    expect(noContext.carrier).to.deep.equal({});
    batch.end();
    req.end();
    await off.forceFlush();
    await off.shutdown();
    await off.shutdown();
    expect(off.stats()).to.deep.equal({ spansExported: 0, spansDropped: 0, spansFailed: 0, errors: 0 });
  });

  it("never blocks or throws when the collector is down: the queue is bounded and drops are counted", async function () {
    const unhandled: unknown[] = [];
    const onUnhandled = (reason: unknown): void => void unhandled.push(reason);
    process.on("unhandledRejection", onUnhandled);
    try {
      const port = await closedPort();
      const t = startTracing({
        serviceName: SERVICE_PIPELINE,
        env: { OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${port}`, OTEL_BSP_MAX_QUEUE_SIZE: "100", OTEL_EXPORTER_OTLP_TIMEOUT: "300" },
        flushTimeoutMs: 1_000,
      });
      expect(t.enabled).to.equal(true);
      const n = 2_000;
      for (let i = 0; i < n; i++) t.startPublish({ subject: SUBJECT, id: `x${i}` }).end();
      // Span calls return at once (nothing is awaited): what does not fit the queue is dropped
      // there and then, not kept.
      expect(t.stats().spansDropped, "dropped at the queue bound, before any export").to.be.at.least(n - 200);

      // Flush and shutdown end although nothing can be delivered (a hang would end the test by
      // its timeout).
      await t.forceFlush();
      await t.shutdown();
      await t.shutdown();
      await t.forceFlush();
      const s = t.stats();
      expect(s.spansExported).to.equal(0);
      expect(s.spansDropped, "spans beyond the queue bound").to.be.at.least(n - 200);
      expect(s.spansDropped + s.spansFailed, "every span accounted for").to.equal(n);
      // After shutdown spans are dropped, not queued.
      t.startPublish({ subject: SUBJECT, id: "late" }).end();
      expect(t.stats().spansDropped).to.equal(s.spansDropped + 1);
      await new Promise((r) => setTimeout(r, 50));
      expect(unhandled).to.deep.equal([]);
    } finally {
      process.removeListener("unhandledRejection", onUnhandled);
    }
  });

  it("keeps flush and shutdown bounded when the collector accepts but never answers", async function () {
    const sockets = new Set<Socket>();
    const blackhole = createServer((socket) => void sockets.add(socket));
    await new Promise<void>((resolve) => blackhole.listen(0, "127.0.0.1", resolve));
    try {
      const port = (blackhole.address() as AddressInfo).port;
      const t = startTracing({ serviceName: SERVICE_PIPELINE, env: { OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${port}`, OTEL_EXPORTER_OTLP_TIMEOUT: "1500" }, flushTimeoutMs: 300 });
      for (let i = 0; i < 10; i++) t.startPublish({ subject: SUBJECT, id: `h${i}` }).end();
      const t0 = performance.now();
      await t.forceFlush();
      // It waited its flushTimeoutMs (a timer never fires early; 5 ms for rounding), and no
      // longer: it returned while the export was still waiting for the collector (the
      // exporter's own timeout, 1,500 ms, had not ended it).
      expect(performance.now() - t0, "forceFlush waits flushTimeoutMs").to.be.at.least(300 - 5);
      expect(sockets.size, "the exporter did reach the collector").to.be.at.least(1);
      expect(t.stats(), "the export is still in progress").to.include({ spansExported: 0, spansFailed: 0 });
      await t.shutdown();
      expect(t.stats(), "shutdown returned with the export still in progress").to.include({ spansExported: 0, spansFailed: 0 });
    } finally {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => blackhole.close(() => resolve()));
    }
  });

  it("samples by the ratio from OTEL_TRACES_SAMPLER(_ARG), and follows the request for the batch", async function () {
    const ratio = tracing("ratio-test", { OTEL_TRACES_SAMPLER: "traceidratio", OTEL_TRACES_SAMPLER_ARG: "0.25" });
    expect(ratio.config.sampler).to.equal("traceidratio");
    const n = 400;
    let sampled = 0;
    for (let i = 0; i < n; i++) {
      const s = ratio.startPublish({ subject: SUBJECT, id: `s${i}` });
      if (s.recording) sampled++;
      expect(s.carrier.traceparent?.endsWith(s.recording ? "-01" : "-00")).to.equal(true);
      s.end();
    }
    // 100 expected; the bounds are 5.8 standard deviations away.
    expect(sampled).to.be.within(50, 150);
    await ratio.forceFlush();
    await receiver.waitForSpans((all) => all.length >= sampled);
    expect(receiver.spans()).to.have.length(sampled);

    const none = tracing("ratio-zero", { OTEL_TRACES_SAMPLER: "parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG: "0" });
    const now = Date.now();
    const orphan = fakeDelivery({ seq: 1, storedAtMs: now, pulledAtMs: now });
    const child = fakeDelivery({ seq: 2, storedAtMs: now, pulledAtMs: now, headers: { traceparent: `00-${FOREIGN_TRACE}-${FOREIGN_SPAN}-01` } });
    const r1 = none.startRequest(orphan);
    const r2 = none.startRequest(child);
    expect(r1.recording, "a root at ratio 0 is not sampled").to.equal(false);
    expect(r2.recording, "a sampled parent's child is").to.equal(true);
    const b1 = none.startBatch({ model: "m", version: "v", jobs: [{ delivery: orphan }] });
    const b2 = none.startBatch({ model: "m", version: "v", jobs: [{ delivery: orphan }, { delivery: child }] });
    expect(b1.recording, "a batch of unsampled requests").to.equal(false);
    expect(b2.recording, "a batch with a sampled request").to.equal(true);
  });

  it("resolves endpoint, protocol, sampler and service name from options and the standard variables", function () {
    const base = { serviceName: SERVICE_PIPELINE };
    expect(resolveTracingConfig({ ...base, env: {} })).to.include({ enabled: false, url: undefined, serviceName: "sluice-pipeline", protocol: "http/protobuf", sampler: "parentbased_always_on" });
    expect(resolveTracingConfig({ ...base, env: { OTEL_EXPORTER_OTLP_ENDPOINT: "http://jaeger:4318/" } })).to.include({ enabled: true, url: "http://jaeger:4318/v1/traces" });
    expect(
      resolveTracingConfig({ ...base, env: { OTEL_EXPORTER_OTLP_ENDPOINT: "http://a:4318", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "http://b:9999/custom" } }).url,
    ).to.equal("http://b:9999/custom");
    expect(resolveTracingConfig({ ...base, env: { OTEL_EXPORTER_OTLP_ENDPOINT: "http://jaeger:4317", OTEL_EXPORTER_OTLP_PROTOCOL: "grpc" } })).to.include({
      protocol: "grpc",
      url: "http://jaeger:4317",
    });
    expect(resolveTracingConfig({ ...base, endpoint: "http://opt:4318", protocol: "http/json", env: { OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "http://env:1/x", OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: "grpc" } })).to.include({
      url: "http://opt:4318/v1/traces",
      protocol: "http/json",
    });
    const odd = resolveTracingConfig({ ...base, env: { OTEL_EXPORTER_OTLP_ENDPOINT: "http://a:1", OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: "carrier-pigeon", OTEL_TRACES_SAMPLER: "traceidratio", OTEL_TRACES_SAMPLER_ARG: "2", OTEL_BSP_MAX_QUEUE_SIZE: "-3" } });
    expect(odd).to.include({ protocol: "http/protobuf", sampler: "traceidratio", samplerRatio: 1, maxQueueSize: 2048 });
    expect(odd.warnings).to.have.length(3);
    expect(resolveTracingConfig({ ...base, env: { OTEL_EXPORTER_OTLP_ENDPOINT: "http://a:1", OTEL_SDK_DISABLED: "true" } }).enabled).to.equal(false);
    expect(resolveTracingConfig({ ...base, env: { OTEL_SERVICE_NAME: "custom" } }).serviceName).to.equal("custom");
    expect(resolveTracingConfig({ ...base, env: { OTEL_EXPORTER_OTLP_HEADERS: "authorization=Bearer%20t,x-a=1" } }).headers).to.deep.equal({ authorization: "Bearer t", "x-a": "1" });
    expect(resolveTracingConfig({ ...base, env: { OTEL_BSP_MAX_QUEUE_SIZE: "64", OTEL_BSP_MAX_EXPORT_BATCH_SIZE: "512" } })).to.include({ maxQueueSize: 64, maxExportBatchSize: 64 });
  });

  it("keeps a host's bad input and a throwing hook away from the host", async function () {
    const warnings: string[] = [];
    const t = startTracing({
      serviceName: SERVICE_PIPELINE,
      env: { OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url, OTEL_TRACES_SAMPLER: "nonsense" },
      onWarning: (m) => {
        warnings.push(m);
        throw new Error("hook failure");
      },
    });
    started.push(t);
    expect(warnings).to.have.length(1);
    const broken: Delivery = {
      ...fakeDelivery({ seq: 1, storedAtMs: Number.NaN, pulledAtMs: Number.NaN }),
      header: () => {
        throw new Error("headers unreadable");
      },
    };
    const r = t.startRequest(broken);
    expect(r.traceId).to.match(/^[0-9a-f]{32}$/);
    r.end();
    r.end("INTERNAL");
    t.settle({ outcome: { kind: "dead", delivery: broken, error: { code: "INVALID_ARGUMENT", message: "x" } }, action: "term", deadLettered: true });
    await t.forceFlush();
    const spans = await receiver.waitForSpans((all) => all.some((s) => s.name === "receive infer.req"));
    const recv = one(spans, (s) => s.name === "receive infer.req", "receive");
    expect(recv.status.code, "the first end wins").to.equal("UNSET");
    expect(recv.endMs).to.be.at.least(recv.startMs);
  });
});
