/**
 * Observability end to end: a real pipeline and a real worker in separate processes export
 * their spans over OTLP to a test receiver; the metrics endpoint counts what was sent.
 */
import { expect } from "chai";
import { jetstreamManager } from "@nats-io/jetstream";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { InferenceClient } from "../../pipeline/client/client.js";
import { STREAM_REQUESTS } from "../../proto/wire.js";
import { SERVICE_CLIENT, type Tracing } from "../../pipeline/telemetry/types.js";
import { startTracing } from "../../pipeline/telemetry/export.js";
import { useNats } from "../support/nats.js";
import { OtlpReceiver, type ReceivedSpan } from "../support/otlp-receiver.js";
import { runCli, type CliProcess } from "../support/process.js";
import { models } from "../support/stack.js";

const byName = (spans: ReceivedSpan[], name: string): ReceivedSpan[] => spans.filter((s) => s.name === name);

/** The trace id of the request `id`'s client send or pipeline receive span. */
function traceOf(spans: ReceivedSpan[], id: string): string | undefined {
  return spans.find((s) => (s.name === "send infer.req" || s.name === "receive infer.req") && s.attributes["messaging.message.id"] === id)?.traceId;
}

/** True once the trace of each request holds its result publish (and `also`, when given). */
function complete(spans: ReceivedSpan[], ids: string[], also: string[] = []): boolean {
  return ids.every((id) => {
    const t = traceOf(spans, id);
    return t !== undefined && ["send infer.res", ...also].every((n) => spans.some((s) => s.traceId === t && s.name === n));
  });
}

describe("observability: traces and metrics across processes", function () {
  this.timeout(120_000);
  const nats = useNats();
  let receiver: OtlpReceiver;
  let dir: string;
  let worker: CliProcess;
  let pipeline: CliProcess;
  let metricsUrl: string;
  let tracing: Tracing;
  let client: InferenceClient;
  const procs: CliProcess[] = [];

  before(async () => {
    receiver = await OtlpReceiver.start();
    const otel = {
      OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: `${receiver.url}/v1/traces`,
      OTEL_BSP_SCHEDULE_DELAY: "100",
    };
    worker = runCli(["worker", "--base-ms", "1", "--per-item-ms", "0", "--id", "w-obs"], otel);
    procs.push(worker);
    const endpoint = (await worker.waitFor(/ready: (\S+:\d+)/))[1]!;
    dir = await mkdtemp(join(tmpdir(), "sluice-obs-"));
    const config = join(dir, "sluice.json");
    await writeFile(
      config,
      JSON.stringify({
        models: models(["echo"], { batch: { max_size: 32, max_delay_ms: 2 } }),
        workers: [{ model: "echo", version: "v1", endpoint }],
        pipeline: { pullExpiresMs: 1_000 },
      }),
    );
    pipeline = runCli(["serve", "--config", config, "--server", nats.url, "--metrics-port", "0"], otel);
    procs.push(pipeline);
    await pipeline.waitFor(/ready/);
    metricsUrl = `http://127.0.0.1:${(await pipeline.waitFor(/metrics on http:\/\/[^:]+:(\d+)\/metrics/))[1]!}/metrics`;
    tracing = startTracing({ serviceName: SERVICE_CLIENT, tracesEndpoint: `${receiver.url}/v1/traces`, scheduledDelayMs: 100 });
    client = new InferenceClient(nats.nc, "obs", false, tracing);
  });

  after(async () => {
    await client?.close();
    await tracing?.shutdown();
    for (const p of procs) p.kill("SIGTERM");
    await Promise.all(procs.map((p) => p.exited));
    await receiver?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it("exports, for each request, one trace: publish → consume → batch → gRPC client → worker → engine → result", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      const r = await client.infer("echo", { prompt: `traced ${i}` }, { id: `tr-${i}` });
      expect(r.output?.text).to.equal(`traced ${i}`);
      ids.push(r.id);
    }
    await tracing.forceFlush();
    const spans = await receiver.waitForSpans((all) => complete(all, ids, ["engine infer"]), 20_000);
    for (const id of ids) {
      const send = byName(spans, "send infer.req").find((s) => s.attributes["messaging.message.id"] === id)!;
      expect(send, `client send of ${id}`).to.not.equal(undefined);
      expect(send.kind).to.equal("PRODUCER");
      expect(send.serviceName).to.equal("sluice-client");
      const inTrace = spans.filter((s) => s.traceId === send.traceId);
      const child = (parent: ReceivedSpan, name: string): ReceivedSpan => {
        const c = inTrace.find((s) => s.name === name && s.parentSpanId === parent.spanId);
        expect(c, `${name} under ${parent.name} in the trace of ${id}: ${inTrace.map((s) => s.name).join(", ")}`).to.not.equal(undefined);
        return c!;
      };
      const recv = child(send, "receive infer.req");
      expect(recv.kind).to.equal("CONSUMER");
      expect(recv.serviceName).to.equal("sluice-pipeline");
      expect(recv.attributes).to.include({ "messaging.system": "nats", "sluice.tenant": "obs", "sluice.model": "echo", "sluice.version": "v1" });
      expect(recv.attributes["sluice.stream.sequence"]).to.be.a("number");
      child(recv, "queue wait");
      const batch = child(recv, "process infer.req");
      expect(batch.attributes["messaging.batch.message_count"]).to.equal(1);
      expect(batch.links.some((l) => l.spanId === recv.spanId)).to.equal(true);
      const call = child(batch, "infer.v1.Worker/Infer");
      expect(call.kind).to.equal("CLIENT");
      const server = child(call, "infer.v1.Worker/Infer");
      expect(server.kind).to.equal("SERVER");
      expect(server.serviceName).to.equal("sluice-worker");
      child(server, "engine infer");
      const result = child(recv, "send infer.res");
      expect(result.kind).to.equal("PRODUCER");
      // Order in time: the worker runs inside the call, the result follows the call.
      expect(server.startMs).to.be.at.least(call.startMs - 5);
      expect(result.startMs).to.be.at.least(call.endMs - 5);
    }
  });

  it("starts a new trace for a request without context and continues one with context", async () => {
    const plain = new InferenceClient(nats.nc, "obs");
    const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
    await plain.infer("echo", { prompt: "no context" }, { id: "ctx-none" });
    await plain.infer("echo", { prompt: "with context" }, { id: "ctx-given", traceparent: `00-${traceId}-00f067aa0ba902b7-01` });
    const spans = await receiver.waitForSpans((all) => complete(all, ["ctx-none", "ctx-given"]), 20_000);
    const recvNone = spans.find((s) => s.name === "receive infer.req" && s.attributes["messaging.message.id"] === "ctx-none")!;
    const recvGiven = spans.find((s) => s.name === "receive infer.req" && s.attributes["messaging.message.id"] === "ctx-given")!;
    expect(recvNone.parentSpanId).to.equal(undefined);
    expect(recvNone.traceId).to.not.equal(traceId);
    expect(recvGiven.traceId).to.equal(traceId);
    expect(recvGiven.parentSpanId).to.equal("00f067aa0ba902b7");
    await plain.close();
  });

  it("reports request counts on /metrics that match the requests sent, scraped during load", async () => {
    const scrape = async (): Promise<Map<string, number>> => {
      const text = await (await fetch(metricsUrl)).text();
      const out = new Map<string, number>();
      for (const line of text.split("\n")) {
        const m = /^sluice_requests_total\{([^}]*)\} (\S+)$/.exec(line);
        if (m && m[1]!.includes('tenant="metrics"')) out.set(m[1]!, Number(m[2]));
      }
      return out;
    };
    const mc = new InferenceClient(nats.nc, "metrics");
    const N = 600;
    const all = Promise.all(Array.from({ length: N }, (_, i) => mc.request(i % 10 === 0 ? "nope" : "echo", { prompt: `m${i}` })));
    const during = await scrape();
    const results = await all;
    const ok = results.filter((r) => r.status === "ok").length;
    const notFound = results.filter((r) => r.error?.code === "NOT_FOUND").length;
    expect(ok + notFound).to.equal(N);
    let after = await scrape();
    for (let i = 0; i < 20 && [...after.values()].reduce((a, b) => a + b, 0) < N; i++) {
      await new Promise((r) => setTimeout(r, 100));
      after = await scrape();
    }
    const sum = (m: Map<string, number>, status: string): number =>
      [...m.entries()].filter(([k]) => k.includes(`status="${status}"`)).reduce((a, [, v]) => a + v, 0);
    expect(sum(after, "ok")).to.equal(ok);
    expect(sum(after, "NOT_FOUND")).to.equal(notFound);
    expect([...during.values()].reduce((a, b) => a + b, 0)).to.be.at.most(N);
    const text = await (await fetch(metricsUrl)).text();
    for (const name of ["sluice_queue_seconds_bucket", "sluice_batch_size_bucket", "sluice_worker_seconds_bucket", "sluice_request_seconds_bucket", "sluice_inflight", "sluice_consumer_pending", "sluice_consumer_ack_pending", "sluice_dlq_total"]) {
      expect(text, name).to.contain(name);
    }
    const health = await fetch(metricsUrl.replace("/metrics", "/healthz"));
    expect(health.status).to.equal(200);
    const ready = await fetch(metricsUrl.replace("/metrics", "/readyz"));
    expect(ready.status).to.equal(200);
    await mc.close();
  });

  it("keeps serving, with no error escaping, when the trace collector is unreachable", async () => {
    const cfg = join(dir, "down.json");
    const endpoint = (await worker.waitFor(/ready: (\S+:\d+)/))[1]!;
    await writeFile(
      cfg,
      JSON.stringify({ models: models(["echo"]), workers: [{ model: "echo", version: "v1", endpoint }], consumer: { durablePrefix: "down" } }),
    );
    // Port 9 on loopback: nothing listens there.
    const down = runCli(["serve", "--config", cfg, "--server", nats.url, "--metrics-port=-1"], {
      OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "http://127.0.0.1:9/v1/traces",
      OTEL_BSP_SCHEDULE_DELAY: "50",
    });
    procs.push(down);
    await down.waitFor(/ready/);
    // The first pipeline shares the consumers; stop it so this one serves.
    pipeline.kill("SIGTERM");
    await pipeline.exited;
    const dc = new InferenceClient(nats.nc, "down");
    const results = await Promise.all(Array.from({ length: 300 }, (_, i) => dc.infer("echo", { prompt: `d${i}` })));
    expect(results).to.have.length(300);
    await new Promise((r) => setTimeout(r, 500));
    expect(down.child.exitCode).to.equal(null);
    expect(down.output()).to.not.match(/Unhandled|uncaught|TypeError/i);
    await dc.close();
  });
});

describe("observability: the backlog per model on /metrics", function () {
  this.timeout(120_000);
  const nats = useNats();
  const procs: CliProcess[] = [];
  let dir: string;
  /** Requests in flight at most (the normal priority's share of them ends up held by the slow model). */
  const MAX_IN_FLIGHT = 4;

  after(async () => {
    for (const p of procs) p.kill("SIGTERM");
    await Promise.all(procs.map((p) => p.exited));
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("splits a priority's pending between the two models of its backlog, and the shares sum to the consumer's pending", async () => {
    // `echo` on a worker that holds each batch for a minute, `upper` on one that answers at once:
    // the pipeline ends up holding MAX_IN_FLIGHT echo requests and pulls no more.
    const slow = runCli(["worker", "--base-ms", "60000", "--per-item-ms", "0", "--id", "w-slow"]);
    const fast = runCli(["worker", "--base-ms", "1", "--per-item-ms", "0", "--id", "w-fast"]);
    procs.push(slow, fast);
    const slowAt = (await slow.waitFor(/ready: (\S+:\d+)/))[1]!;
    const fastAt = (await fast.waitFor(/ready: (\S+:\d+)/))[1]!;
    dir = await mkdtemp(join(tmpdir(), "sluice-backlog-"));
    const config = join(dir, "sluice.json");
    await writeFile(
      config,
      JSON.stringify({
        models: models(["echo", "upper"], { batch: { max_size: 32, max_delay_ms: 2 }, timeout_ms: 120_000 }),
        workers: [
          { model: "echo", version: "v1", endpoint: slowAt },
          { model: "upper", version: "v1", endpoint: fastAt },
        ],
        consumer: { durablePrefix: "bl" },
        pipeline: { maxInFlight: MAX_IN_FLIGHT, pullExpiresMs: 1_000 },
      }),
    );
    const pipeline = runCli(["serve", "--config", config, "--server", nats.url, "--metrics-port", "0"]);
    procs.push(pipeline);
    await pipeline.waitFor(/ready/);
    const url = `http://127.0.0.1:${(await pipeline.waitFor(/metrics on http:\/\/[^:]+:(\d+)\/metrics/))[1]!}/metrics`;
    const scrape = async (): Promise<Array<{ name: string; labels: string; value: number }>> => {
      const text = await (await fetch(url)).text();
      return text
        .split("\n")
        .map((line) => /^(sluice_consumer_pending|sluice_model_inflight|sluice_inflight)\{([^}]*)\} (\S+)$/.exec(line))
        .filter((m): m is RegExpExecArray => m !== null)
        .map((m) => ({ name: m[1]!, labels: m[2]!, value: Number(m[3]) }));
    };
    const value = (samples: Awaited<ReturnType<typeof scrape>>, name: string, labels: string): number | undefined => samples.find((s) => s.name === name && s.labels === labels)?.value;

    const client = new InferenceClient(nats.nc, "backlog");
    const N = 200;
    // A few upper requests first (they are pulled, and answered, before any echo request), then both.
    for (let i = 0; i < N; i++) await client.publish(i < 4 || i % 2 === 1 ? "upper" : "echo", { prompt: `b${i}` });

    // Until the pipeline holds only echo requests (its share of the credits): it then pulls no more.
    const heldEcho = (): number | undefined => value(samples, "sluice_model_inflight", 'model="echo"');
    const stuck = (): boolean => (heldEcho() ?? 0) > 0 && heldEcho() === value(samples, "sluice_inflight", 'priority="normal"');
    let samples = await scrape();
    for (let i = 0; i < 400 && !stuck(); i++) {
      await new Promise((r) => setTimeout(r, 50));
      samples = await scrape();
    }
    expect(stuck(), JSON.stringify(samples)).to.equal(true);
    expect(heldEcho()).to.be.at.most(MAX_IN_FLIGHT);
    expect(value(samples, "sluice_model_inflight", 'model="upper"')).to.equal(0);

    // The consumers' pending as the server says, the same before and after the scrape.
    const jsm = await jetstreamManager(nats.nc);
    const serverPending = async (): Promise<number> => {
      let n = 0;
      for await (const ci of jsm.consumers.list(STREAM_REQUESTS)) if (ci.name === "bl-normal" || ci.name.startsWith("bl-normal-lane-")) n += ci.num_pending;
      return n;
    };
    let before = await serverPending();
    samples = await scrape();
    let after = await serverPending();
    for (let i = 0; i < 20 && before !== after; i++) {
      before = after;
      samples = await scrape();
      after = await serverPending();
    }
    expect(after, "the backlog stands still").to.equal(before);
    const normal = samples.filter((s) => s.name === "sluice_consumer_pending" && s.labels.includes('priority="normal"'));
    const share = (model: string): number | undefined => normal.find((s) => s.labels.includes(`model="${model}"`))?.value;
    expect(after).to.be.greaterThan(N / 2);
    expect(normal.reduce((a, s) => a + s.value, 0), "the shares sum to the consumer's pending").to.equal(after);
    // Both models were pulled, so all of the backlog is attributed, to both of them.
    expect(share("echo")).to.be.greaterThan(0);
    expect(share("upper")).to.be.greaterThan(0);
    expect(share("")).to.equal(0);
    expect(share("echo")! + share("upper")!).to.equal(after);
    await client.close();
  });
});
