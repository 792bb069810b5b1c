import { createServer } from "node:net";
import type { AddressInfo } from "node:net";
import { expect } from "chai";
import type { Settled } from "../operators/settle-outcome.js";
import type { Delivery, InferJob } from "../operators/types.js";
import { DEFAULT_METRICS_PORT, PipelineMetrics } from "../pipeline/telemetry/metrics.js";
import { OTHER_LABEL_VALUE } from "../pipeline/telemetry/metric-labels.js";
import { MetricsServer, MetricsServerError } from "../pipeline/telemetry/metrics-server.js";

// A small parser of the Prometheus text exposition format (0.0.4), strict enough to fail on
// malformed output: HELP and TYPE lines, samples with escaped label values.

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

interface Family {
  name: string;
  help?: string;
  type?: string;
  samples: Sample[];
}

const SUFFIXES = ["_bucket", "_sum", "_count"];

function unescape(s: string, quotes: boolean): string {
  let out = "";
  for (let i = 0; i < s.length; i++) {
    const c = s[i]!;
    if (c !== "\\") {
      out += c;
      continue;
    }
    const next = s[++i];
    if (next === "\\") out += "\\";
    else if (next === "n") out += "\n";
    else if (next === '"' && quotes) out += '"';
    else throw new Error(`bad escape \\${next ?? ""} in '${s}'`);
  }
  return out;
}

/** Special values case-insensitively, as Prometheus reads them (prom-client writes `Nan`). */
function parseValue(v: string): number {
  const lower = v.toLowerCase();
  if (lower === "+inf" || lower === "inf") return Infinity;
  if (lower === "-inf") return -Infinity;
  if (lower === "nan") return NaN;
  const n = Number(v);
  if (v === "" || Number.isNaN(n)) throw new Error(`bad sample value '${v}'`);
  return n;
}

function parseSample(line: string): Sample {
  const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(.*)$/.exec(line);
  if (!m) throw new Error(`bad sample line '${line}'`);
  const name = m[1]!;
  let rest = m[2]!;
  const labels: Record<string, string> = {};
  if (rest.startsWith("{")) {
    let i = 1;
    for (;;) {
      if (rest[i] === "}") {
        i++;
        break;
      }
      const lm = /^([a-zA-Z_][a-zA-Z0-9_]*)="/.exec(rest.slice(i));
      if (!lm) throw new Error(`bad label in '${line}'`);
      i += lm[0].length;
      let raw = "";
      while (rest[i] !== '"') {
        if (i >= rest.length) throw new Error(`unterminated label value in '${line}'`);
        if (rest[i] === "\\") raw += rest[i++];
        raw += rest[i++];
      }
      i++;
      if (rest[i] === "\n") throw new Error("raw newline in a label value");
      labels[lm[1]!] = unescape(raw, true);
      if (rest[i] === ",") i++;
    }
    rest = rest.slice(i);
  }
  const parts = rest.trim().split(" ");
  if (parts.length < 1 || parts.length > 2 || !rest.startsWith(" ")) throw new Error(`bad value part in '${line}'`);
  return { name, labels, value: parseValue(parts[0]!) };
}

function parseExposition(text: string): Map<string, Family> {
  const families = new Map<string, Family>();
  const family = (name: string): Family => {
    let f = families.get(name);
    if (!f) families.set(name, (f = { name, samples: [] }));
    return f;
  };
  for (const line of text.split("\n")) {
    if (line === "") continue;
    if (line.startsWith("# HELP ")) {
      const [, name, ...help] = line.split(" ").slice(1);
      family(name!).help = unescape(help.join(" "), false);
    } else if (line.startsWith("# TYPE ")) {
      const [name, type] = line.slice(7).split(" ");
      if (!["counter", "gauge", "histogram", "summary", "untyped"].includes(type ?? "")) throw new Error(`bad type in '${line}'`);
      family(name!).type = type;
    } else if (line.startsWith("#")) {
      continue;
    } else {
      const s = parseSample(line);
      const base = SUFFIXES.find((suf) => s.name.endsWith(suf) && families.get(s.name.slice(0, -suf.length))?.type === "histogram");
      family(base ? s.name.slice(0, -base.length) : s.name).samples.push(s);
    }
  }
  return families;
}

function sampleValue(f: Map<string, Family>, family: string, sampleName: string, labels: Record<string, string>): number | undefined {
  const fam = f.get(family);
  const s = fam?.samples.find((x) => x.name === sampleName && Object.entries(labels).every(([k, v]) => x.labels[k] === v) && Object.keys(x.labels).length === Object.keys(labels).length);
  return s?.value;
}

// --- fixtures ---------------------------------------------------------------------------------

function fakeDelivery(storedAtMs: number, pulledAtMs: number, subject = "infer.req.high.acme.echo"): Delivery {
  return {
    subject,
    data: new Uint8Array(),
    header: () => undefined,
    headerEntries: () => [],
    seq: 1,
    deliveryCount: 1,
    storedAtMs,
    pulledAtMs,
    settled: false,
    ack: () => undefined,
    nak: () => undefined,
    term: () => undefined,
    working: () => undefined,
  };
}

function job(id: string, d: Delivery): InferJob {
  return { id, tenant: "acme", model: "echo", priority: "high", stream: false, delivery: d, version: "v1" };
}

describe("metrics: PipelineMetrics", function () {
  const ALL = {
    sluice_requests_total: "counter",
    sluice_queue_seconds: "histogram",
    sluice_batch_size: "histogram",
    sluice_worker_seconds: "histogram",
    sluice_request_seconds: "histogram",
    sluice_ttft_seconds: "histogram",
    sluice_tpot_seconds: "histogram",
    sluice_inflight: "gauge",
    sluice_consumer_pending: "gauge",
    sluice_consumer_ack_pending: "gauge",
    sluice_model_inflight: "gauge",
    sluice_dlq_total: "counter",
    sluice_worker_healthy: "gauge",
    sluice_worker_breaker_open: "gauge",
    sluice_publish_errors_total: "counter",
    sluice_pull_errors_total: "counter",
    sluice_trace_spans_lost_total: "counter",
  };

  it("exposes every metric with HELP and TYPE, named by Prometheus conventions", async function () {
    const m = new PipelineMetrics({ processMetrics: false });
    const f = parseExposition(await m.exposition());
    expect([...f.keys()].sort()).to.deep.equal(Object.keys(ALL).sort());
    for (const [name, type] of Object.entries(ALL)) {
      const fam = f.get(name)!;
      expect(fam.type, name).to.equal(type);
      expect(fam.help, name).to.be.a("string").and.not.equal("");
      expect(name.endsWith("_total"), `${name}: _total exactly on counters`).to.equal(type === "counter");
      if (/time|latency|duration|wait/.test(fam.help!)) expect(name, "times are in seconds").to.match(/_seconds$/);
    }
    // Series start at zero for the known priorities.
    expect(sampleValue(f, "sluice_pull_errors_total", "sluice_pull_errors_total", { priority: "low" })).to.equal(0);
    expect(sampleValue(f, "sluice_inflight", "sluice_inflight", { priority: "normal" })).to.equal(0);
    expect(sampleValue(f, "sluice_publish_errors_total", "sluice_publish_errors_total", {})).to.equal(0);
  });

  it("adds process metrics unless told not to", async function () {
    const text = await new PipelineMetrics().exposition();
    expect(parseExposition(text).has("process_cpu_user_seconds_total")).to.equal(true);
  });

  it("counts settled requests by model, version, tenant, priority and status", async function () {
    const m = new PipelineMetrics({ processMetrics: false });
    m.requestSettled({ model: "echo", version: "v1", tenant: "acme", priority: "high", status: "ok", queueMs: 3, totalMs: 20 });
    m.requestSettled({ model: "echo", version: "v1", tenant: "acme", priority: "high", status: "ok", queueMs: 4, totalMs: 30 });
    m.requestSettled({ model: "echo", tenant: "acme", priority: "high", status: "NOT_FOUND" });
    m.setInflight("high", 12);
    m.setConsumerState("high", 340, 17);
    m.pullFailed("normal");
    m.pullFailed("normal");
    m.batchDispatched({ model: "echo", version: "v1", size: 12, workerSeconds: 0.04 });
    const f = parseExposition(await m.exposition());
    const req = (status: string, version = "v1"): number | undefined =>
      sampleValue(f, "sluice_requests_total", "sluice_requests_total", { model: "echo", version, tenant: "acme", priority: "high", status });
    expect(req("ok")).to.equal(2);
    expect(req("NOT_FOUND", "none")).to.equal(1);
    expect(sampleValue(f, "sluice_queue_seconds", "sluice_queue_seconds_count", { priority: "high" })).to.equal(2);
    expect(sampleValue(f, "sluice_queue_seconds", "sluice_queue_seconds_sum", { priority: "high" })).to.be.closeTo(0.007, 1e-9);
    expect(sampleValue(f, "sluice_request_seconds", "sluice_request_seconds_sum", { model: "echo", priority: "high" })).to.be.closeTo(0.05, 1e-9);
    expect(sampleValue(f, "sluice_inflight", "sluice_inflight", { priority: "high" })).to.equal(12);
    expect(sampleValue(f, "sluice_consumer_pending", "sluice_consumer_pending", { priority: "high", model: "" })).to.equal(340);
    expect(sampleValue(f, "sluice_consumer_ack_pending", "sluice_consumer_ack_pending", { priority: "high" })).to.equal(17);
    expect(sampleValue(f, "sluice_pull_errors_total", "sluice_pull_errors_total", { priority: "normal" })).to.equal(2);
    expect(sampleValue(f, "sluice_batch_size", "sluice_batch_size_sum", { model: "echo", version: "v1" })).to.equal(12);
    expect(sampleValue(f, "sluice_worker_seconds", "sluice_worker_seconds_count", { model: "echo", version: "v1" })).to.equal(1);
  });

  it("reads everything a settled outcome says: results, retries, duplicates, dead letters, failed publishes", async function () {
    const m = new PipelineMetrics({ processMetrics: false });
    const now = 1_000_000;
    const d = fakeDelivery(now - 500, now - 400);
    const j = job("a", d);
    const outcomes: Settled[] = [
      { outcome: { kind: "result", job: j, result: { id: "a", status: "ok" } }, action: "ack", result: { id: "a", status: "ok" }, deadLettered: false },
      {
        outcome: { kind: "result", job: j, result: { id: "a", status: "error", error: { code: "DEADLINE_EXCEEDED", message: "late" } } },
        action: "term",
        result: { id: "a", status: "error", error: { code: "DEADLINE_EXCEEDED", message: "late" } },
        deadLettered: false,
      },
      { outcome: { kind: "retry", job: j, delayMs: 100, lastResort: { id: "a", status: "error", error: { code: "UNAVAILABLE", message: "x" } } }, action: "nak", deadLettered: false },
      { outcome: { kind: "result", job: j, result: { id: "a", status: "ok" } }, action: "duplicate", deadLettered: false },
      { outcome: { kind: "result", job: j, result: { id: "a", status: "ok" } }, action: "nak", deadLettered: false, error: new Error("no stream") },
      {
        outcome: { kind: "result", job: j, result: { id: "a", status: "error", error: { code: "UNAVAILABLE", message: "gave up" } }, deadLetter: true },
        action: "term",
        result: { id: "a", status: "error", error: { code: "UNAVAILABLE", message: "gave up" } },
        deadLettered: true,
      },
      {
        outcome: { kind: "dead", delivery: fakeDelivery(now - 10, now - 5, "infer.req.low.acme.bad"), error: { code: "INVALID_ARGUMENT", message: "no id" } },
        action: "term",
        deadLettered: true,
      },
    ];
    for (const s of outcomes) m.settled(s, now);
    const f = parseExposition(await m.exposition());
    const req = (status: string, priority = "high", tenant = "acme", model = "echo", version = "v1"): number | undefined =>
      sampleValue(f, "sluice_requests_total", "sluice_requests_total", { model, version, tenant, priority, status });
    expect(req("ok")).to.equal(1);
    expect(req("DEADLINE_EXCEEDED")).to.equal(1);
    expect(req("retry")).to.equal(2, "a nak and a failed publish");
    expect(req("duplicate")).to.equal(1);
    expect(req("UNAVAILABLE")).to.equal(1);
    expect(req("INVALID_ARGUMENT", "low", "_unknown", "_unknown", "none")).to.equal(1);
    expect(sampleValue(f, "sluice_dlq_total", "sluice_dlq_total", { code: "UNAVAILABLE" })).to.equal(1);
    expect(sampleValue(f, "sluice_dlq_total", "sluice_dlq_total", { code: "INVALID_ARGUMENT" })).to.equal(1);
    expect(sampleValue(f, "sluice_publish_errors_total", "sluice_publish_errors_total", {})).to.equal(1);
    // Times are observed once a request is final: ok, DEADLINE_EXCEEDED, UNAVAILABLE here.
    expect(sampleValue(f, "sluice_request_seconds", "sluice_request_seconds_count", { model: "echo", priority: "high" })).to.equal(3);
    expect(sampleValue(f, "sluice_request_seconds", "sluice_request_seconds_sum", { model: "echo", priority: "high" })).to.be.closeTo(1.5, 1e-9);
    expect(sampleValue(f, "sluice_queue_seconds", "sluice_queue_seconds_sum", { priority: "high" })).to.be.closeTo(0.3, 1e-9);
    expect(sampleValue(f, "sluice_queue_seconds", "sluice_queue_seconds_count", { priority: "low" })).to.equal(1);
  });

  it("escapes label values as the exposition format requires", async function () {
    const m = new PipelineMetrics({ processMetrics: false });
    const endpoint = 'we"ird\\host\nname';
    m.setWorkers([{ endpoint, healthy: true, breaker: "open" }]);
    const text = await m.exposition();
    expect(text).to.include('sluice_worker_healthy{endpoint="we\\"ird\\\\host\\nname"} 1');
    const f = parseExposition(text);
    expect(sampleValue(f, "sluice_worker_healthy", "sluice_worker_healthy", { endpoint })).to.equal(1);
    expect(sampleValue(f, "sluice_worker_breaker_open", "sluice_worker_breaker_open", { endpoint })).to.equal(1);
  });

  it("writes histograms with cumulative buckets, +Inf equal to _count, and _sum", async function () {
    const m = new PipelineMetrics({ processMetrics: false });
    for (const ms of [3, 300, 7_000, 400_000]) m.requestSettled({ model: "echo", version: "v1", tenant: "t", priority: "low", status: "ok", queueMs: ms });
    const f = parseExposition(await m.exposition());
    const buckets = f.get("sluice_queue_seconds")!.samples.filter((s) => s.name === "sluice_queue_seconds_bucket" && s.labels.priority === "low");
    const les = buckets.map((b) => parseValue(b.labels.le!));
    expect(les).to.deep.equal([...les].sort((a, b) => a - b), "buckets in order");
    expect(les[les.length - 1]).to.equal(Infinity);
    for (let i = 1; i < buckets.length; i++) expect(buckets[i]!.value).to.be.at.least(buckets[i - 1]!.value, "cumulative");
    const at = (le: string): number | undefined => buckets.find((b) => b.labels.le === le)?.value;
    expect([at("0.001"), at("0.005"), at("0.5"), at("10"), at("300"), at("+Inf")]).to.deep.equal([0, 1, 2, 3, 3, 4]);
    expect(sampleValue(f, "sluice_queue_seconds", "sluice_queue_seconds_count", { priority: "low" })).to.equal(4);
    expect(sampleValue(f, "sluice_queue_seconds", "sluice_queue_seconds_sum", { priority: "low" })).to.be.closeTo(407.303, 1e-9);
  });

  it("caps the distinct values of outside-supplied labels", async function () {
    const m = new PipelineMetrics({ processMetrics: false, maxLabelValues: 2 });
    for (const model of ["a", "b", "c", "d", "a"]) m.requestSettled({ model, version: "v1", tenant: "t", priority: "low", status: "ok" });
    const f = parseExposition(await m.exposition());
    const models = f.get("sluice_requests_total")!.samples.map((s) => `${s.labels.model}=${s.value}`);
    expect(models).to.have.members(["a=2", "b=1", `${OTHER_LABEL_VALUE}=2`]);
  });

  it("replaces the worker gauges: a worker that is gone disappears", async function () {
    const m = new PipelineMetrics({ processMetrics: false });
    m.setWorkers([
      { endpoint: "w1:1", healthy: true, breaker: "closed" },
      { endpoint: "w2:1", healthy: false, breaker: "open" },
    ]);
    let f = parseExposition(await m.exposition());
    expect(sampleValue(f, "sluice_worker_healthy", "sluice_worker_healthy", { endpoint: "w2:1" })).to.equal(0);
    expect(sampleValue(f, "sluice_worker_breaker_open", "sluice_worker_breaker_open", { endpoint: "w2:1" })).to.equal(1);
    m.setWorkers([{ endpoint: "w1:1", healthy: true, breaker: "half-open" }]);
    f = parseExposition(await m.exposition());
    expect(f.get("sluice_worker_healthy")!.samples.map((s) => s.labels.endpoint)).to.deep.equal(["w1:1"]);
    expect(sampleValue(f, "sluice_worker_breaker_open", "sluice_worker_breaker_open", { endpoint: "w1:1" })).to.equal(0);
  });

  it("splits a priority's pending by model (shares that sum to it), and drops a model no longer in the split", async function () {
    const m = new PipelineMetrics({ processMetrics: false, maxLabelValues: 2 });
    m.setConsumerState("normal", 30, 4, new Map([["echo", 20], ["upper", 6], ["", 4]]));
    m.setConsumerState("high", 5, 0);
    let f = parseExposition(await m.exposition());
    const pending = (priority: string, model: string): number | undefined => sampleValue(f, "sluice_consumer_pending", "sluice_consumer_pending", { priority, model });
    expect(pending("normal", "echo")).to.equal(20);
    expect(pending("normal", "upper")).to.equal(6);
    expect(pending("normal", "")).to.equal(4);
    expect(pending("high", "")).to.equal(5);
    const normal = f.get("sluice_consumer_pending")!.samples.filter((x) => x.labels.priority === "normal");
    expect(normal.reduce((s, x) => s + x.value, 0), "sum by (priority) is the consumer's pending").to.equal(30);
    // A third model is beyond the label cap: its share is added to `_other`, the sum holds.
    m.setConsumerState("normal", 12, 4, new Map([["echo", 7], ["llm", 5]]));
    f = parseExposition(await m.exposition());
    expect(pending("normal", "echo")).to.equal(7);
    expect(pending("normal", OTHER_LABEL_VALUE)).to.equal(5);
    expect(pending("normal", "upper"), "gone from the split, gone from the metric").to.equal(undefined);
    expect(pending("normal", "")).to.equal(undefined);
    expect(sampleValue(f, "sluice_consumer_ack_pending", "sluice_consumer_ack_pending", { priority: "normal" })).to.equal(4);
  });

  it("exports the requests in flight per model, replacing the previous counts", async function () {
    const m = new PipelineMetrics({ processMetrics: false });
    m.setModelInflight(new Map([["echo", 3], ["upper", 0]]));
    let f = parseExposition(await m.exposition());
    expect(sampleValue(f, "sluice_model_inflight", "sluice_model_inflight", { model: "echo" })).to.equal(3);
    expect(sampleValue(f, "sluice_model_inflight", "sluice_model_inflight", { model: "upper" })).to.equal(0);
    m.setModelInflight(new Map([["upper", 2]]));
    f = parseExposition(await m.exposition());
    expect(sampleValue(f, "sluice_model_inflight", "sluice_model_inflight", { model: "echo" })).to.equal(undefined);
    expect(sampleValue(f, "sluice_model_inflight", "sluice_model_inflight", { model: "upper" })).to.equal(2);
  });

  it("runs collect hooks before a scrape, within a time bound, ignoring their failures", async function () {
    const m = new PipelineMetrics({ processMetrics: false, collectTimeoutMs: 100 });
    let calls = 0;
    m.onCollect(async () => {
      calls++;
      await new Promise((r) => setTimeout(r, 5));
      m.setConsumerState("normal", 10 * calls, calls);
    });
    m.onCollect(() => {
      throw new Error("consumer info failed");
    });
    let hanging = 0;
    const remove = m.onCollect(() => {
      hanging++;
      return new Promise<void>(() => undefined); // never settles
    });
    // The scrape ends although a hook never does (were it to wait for it, the test's timeout
    // would end the test), and it waited for the hook that does end.
    let f = parseExposition(await m.exposition());
    expect(hanging).to.equal(1);
    expect(sampleValue(f, "sluice_consumer_pending", "sluice_consumer_pending", { priority: "normal", model: "" })).to.equal(10);
    remove();
    f = parseExposition(await m.exposition());
    expect(hanging, "the hanging hook was removed").to.equal(1);
    expect(sampleValue(f, "sluice_consumer_ack_pending", "sluice_consumer_ack_pending", { priority: "normal" })).to.equal(2);
  });

  it("reports spans lost by tracing as a counter", async function () {
    const m = new PipelineMetrics({ processMetrics: false });
    let stats = { spansDropped: 3, spansFailed: 2 };
    m.trackTracing(() => stats);
    let f = parseExposition(await m.exposition());
    expect(sampleValue(f, "sluice_trace_spans_lost_total", "sluice_trace_spans_lost_total", {})).to.equal(5);
    stats = { spansDropped: 10, spansFailed: 2 };
    f = parseExposition(await m.exposition());
    expect(sampleValue(f, "sluice_trace_spans_lost_total", "sluice_trace_spans_lost_total", {})).to.equal(12);
  });

  it("times a generation's first token once, and its tokens after it only for ok results of more than one token", async function () {
    const m = new PipelineMetrics({ processMetrics: false });
    const t0 = 1_000_000;
    const many = { ...job("many", fakeDelivery(t0, t0 + 50)), version: "v1" };
    const one = { ...job("one", fakeDelivery(t0, t0 + 50)), version: "v1" };
    const failed = { ...job("failed", fakeDelivery(t0, t0 + 50)), version: "v1" };
    for (const j of [many, one, failed]) {
      m.chunkPublished(j, t0 + 100);
      m.chunkPublished(j, t0 + 150);
    }
    const ok = (j: typeof many, tokens: number): Settled => {
      const result = { id: j.id, status: "ok" as const, usage: { prompt_tokens: 1, completion_tokens: tokens } };
      return { outcome: { kind: "result", job: j, result }, action: "ack", result, deadLettered: false };
    };
    m.generationSettled(ok(many, 5), t0 + 500);
    m.generationSettled(ok(many, 5), t0 + 900); // settled already: not observed again
    m.generationSettled(ok(one, 1), t0 + 500);
    const err = { id: "failed", status: "error" as const, error: { code: "INTERNAL" as const, message: "x" } };
    m.generationSettled({ outcome: { kind: "result", job: failed, result: err }, action: "ack", result: err, deadLettered: false }, t0 + 500);
    // A job that never streamed a token, and outcomes without a job, are ignored.
    m.generationSettled(ok({ ...job("none", fakeDelivery(t0, t0)), version: "v1" }, 3), t0 + 500);
    m.generationSettled({ outcome: { kind: "dead", delivery: fakeDelivery(t0, t0), error: { code: "INVALID_ARGUMENT", message: "x" } }, action: "term", deadLettered: true });
    const f = parseExposition(await m.exposition());
    const labels = { model: "echo", version: "v1" };
    expect(sampleValue(f, "sluice_ttft_seconds", "sluice_ttft_seconds_count", labels)).to.equal(3);
    expect(sampleValue(f, "sluice_ttft_seconds", "sluice_ttft_seconds_sum", labels)).to.be.closeTo(0.3, 1e-9);
    expect(sampleValue(f, "sluice_tpot_seconds", "sluice_tpot_seconds_count", labels)).to.equal(1);
    expect(sampleValue(f, "sluice_tpot_seconds", "sluice_tpot_seconds_sum", labels)).to.be.closeTo(0.1, 1e-9);
  });

  it("never throws from generation timings, whatever it is handed", function () {
    const m = new PipelineMetrics({ processMetrics: false });
    expect(() => m.chunkPublished({} as never)).not.to.throw();
    expect(() => m.chunkPublished(null as never)).not.to.throw();
    expect(() => m.generationSettled({} as never)).not.to.throw();
    expect(() => m.generationSettled(null as never)).not.to.throw();
  });
});

describe("metrics: MetricsServer", function () {
  let server: MetricsServer | undefined;
  afterEach(async function () {
    await server?.stop();
    server = undefined;
  });

  it("serves /metrics, /healthz and /readyz, and 404 elsewhere", async function () {
    const metrics = new PipelineMetrics({ processMetrics: false });
    metrics.setInflight("high", 3);
    let ready = false;
    server = await MetricsServer.start({ port: 0, host: "127.0.0.1", metrics, ready: () => ready });
    expect(server.port).to.be.above(0);
    expect(DEFAULT_METRICS_PORT).to.equal(9464);
    const base = server.url;

    const res = await fetch(`${base}/metrics`);
    expect(res.status).to.equal(200);
    expect(res.headers.get("content-type")).to.match(/^text\/plain; version=0\.0\.4/);
    const f = parseExposition(await res.text());
    expect(sampleValue(f, "sluice_inflight", "sluice_inflight", { priority: "high" })).to.equal(3);
    expect((await fetch(`${base}/metrics?debug=1`)).status).to.equal(200);

    const health = await fetch(`${base}/healthz`);
    expect([health.status, await health.text()]).to.deep.equal([200, "ok\n"]);
    expect((await fetch(`${base}/readyz`)).status).to.equal(503);
    ready = true;
    expect((await fetch(`${base}/readyz`)).status).to.equal(200);
    ready = false;
    expect((await fetch(`${base}/readyz`)).status).to.equal(503);

    expect((await fetch(`${base}/nope`)).status).to.equal(404);
    expect((await fetch(`${base}/`)).status).to.equal(404);
    const post = await fetch(`${base}/metrics`, { method: "POST", body: "x" });
    expect(post.status).to.equal(405);
    expect(post.headers.get("allow")).to.equal("GET, HEAD");
    const head = await fetch(`${base}/metrics`, { method: "HEAD" });
    expect([head.status, await head.text()]).to.deep.equal([200, ""]);
  });

  it("reads not ready when the readiness check throws, and 500 when collecting fails", async function () {
    server = await MetricsServer.start({
      port: 0,
      host: "127.0.0.1",
      metrics: { contentType: "text/plain", exposition: () => Promise.reject(new Error("registry broken")) },
      ready: () => {
        throw new Error("no idea");
      },
    });
    expect((await fetch(`${server.url}/readyz`)).status).to.equal(503);
    const res = await fetch(`${server.url}/metrics`);
    expect(res.status).to.equal(500);
    expect(await res.text()).to.include("registry broken");
    expect((await fetch(`${server.url}/healthz`)).status).to.equal(200);
  });

  it("stops once however often asked, and refuses a port in use", async function () {
    const metrics = new PipelineMetrics({ processMetrics: false });
    const s = await MetricsServer.start({ port: 0, host: "127.0.0.1", metrics });
    const url = s.url;
    expect((await fetch(`${url}/healthz`)).status).to.equal(200);
    await Promise.all([s.stop(), s.stop()]);
    await s.stop();
    let refused = false;
    try {
      await fetch(`${url}/healthz`);
    } catch {
      refused = true;
    }
    expect(refused, "nothing listens after stop").to.equal(true);

    const taken = createServer();
    await new Promise<void>((resolve) => taken.listen(0, "127.0.0.1", resolve));
    try {
      const port = (taken.address() as AddressInfo).port;
      let error: unknown;
      try {
        server = await MetricsServer.start({ port, host: "127.0.0.1", metrics });
      } catch (err) {
        error = err;
      }
      expect(error).to.be.instanceOf(MetricsServerError);
      expect((error as MetricsServerError).code).to.equal("BIND_FAILED");
    } finally {
      await new Promise<void>((resolve) => taken.close(() => resolve()));
    }
  });
});
