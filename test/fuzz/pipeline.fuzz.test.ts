/**
 * Fuzzing the whole pipeline (real nats-server, real pipeline, simulated gRPC worker): a few
 * hundred hostile requests (random bodies, headers, content types, parameters, models) each get
 * exactly one result, ok or an error code of docs/protocol.md; requests without a usable id or
 * tenant land in INFER_DLQ; and afterwards a normal request is still answered. The requests
 * are drawn from fixed seeds, so every run sends the same traffic.
 */
import { expect } from "chai";
import fc from "fast-check";
import { headers as natsHeaders, type MsgHdrs, type Subscription } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import { InferenceClient } from "../../pipeline/client/client.js";
import { STREAM_DLQ, ERROR_CODES } from "../../proto/wire.js";
import { PipelineService } from "../../pipeline/service.js";
import type { PipelineLogger } from "../../pipeline/support/logger.js";
import { infer } from "../../proto/gen/inference.js";
import { useNats, waitFor } from "../support/nats.js";
import { models, startWorker, testConfig, type TestWorker } from "../support/stack.js";
import { rawPublish, type RawMessage } from "./raw-publish.js";

const SEED = 7_919;
const REQUESTS = 320;
const TENANT = "fz";
const MODELS = ["echo", "reverse", "upper", "llm-sim"];
const enc = new TextEncoder();
const dec = new TextDecoder();

type IdKind = "valid" | "missing" | "invalid" | "bad-tenant";

interface HostileRequest {
  idKind: IdKind;
  priority: string;
  model: string;
  headers: Array<[string, string]>;
  body: Uint8Array;
}

// ---- generators (nats.js can publish all of these: header names of visible ASCII, no CR/LF) ----

// Header names of visible ASCII; not the server's own Nats-* headers (Nats-Expected-Stream and
// the like make the server refuse the publish, which is not the pipeline's business).
const printable = fc
  .string({ unit: fc.integer({ min: 0x21, max: 0x7e }).map((c) => String.fromCharCode(c)), minLength: 1, maxLength: 24 })
  .filter((s) => !s.includes(":") && !s.toLowerCase().startsWith("nats-"));
const anyText = fc.oneof(fc.string({ maxLength: 60 }), fc.string({ unit: "grapheme", maxLength: 30 }), fc.string({ unit: "binary", maxLength: 30 }));
const headerValue = fc
  .oneof({ weight: 5, arbitrary: anyText }, { weight: 1, arbitrary: fc.integer({ min: 1_000, max: 8_000 }).map((n) => "v".repeat(n)) })
  .map((s) => s.replace(/[\r\n]/g, " "));

const absurd = fc.oneof(
  fc.double(),
  fc.integer(),
  fc.constantFrom(0, -1, 1e308, 2 ** 53 + 2, 1e-320, 1_000_001),
  fc.string({ maxLength: 10 }),
  fc.boolean(),
  fc.constant(null),
  fc.array(fc.integer(), { maxLength: 3 }),
);

const params = fc.oneof(
  fc.record(
    {
      max_tokens: fc.oneof(fc.integer({ min: 1, max: 64 }), absurd),
      temperature: fc.oneof(fc.double({ min: 0, max: 2, noNaN: true }), absurd),
      top_p: absurd,
      simulate_error: fc.constantFrom(...ERROR_CODES, "BOGUS"),
    },
    { requiredKeys: [] },
  ),
  absurd,
);

const jsonBody = fc.oneof(
  { weight: 4, arbitrary: fc.record({ prompt: fc.oneof(anyText, absurd), inputs: fc.jsonValue({ maxDepth: 3 }), parameters: params }, { requiredKeys: [] }) },
  { weight: 1, arbitrary: fc.record({ prompt: anyText, id: anyText, tenant: anyText }, { requiredKeys: [] }) },
  { weight: 1, arbitrary: fc.jsonValue({ maxDepth: 3 }) },
);

const body = fc.oneof(
  { weight: 6, arbitrary: jsonBody.map((v) => enc.encode(JSON.stringify(v) ?? "null")) },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 512 }) },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 40 }).map((b) => Uint8Array.from([...enc.encode('{"prompt":"'), ...b, 0xc0, 0xaf, ...enc.encode('"}')])) },
  { weight: 1, arbitrary: fc.constantFrom("", "{", "null", "[]", '{"prompt":"a","prompt":1}', '{"__proto__":{"prompt":"x"}}', '{"inputs":1e999}').map((s) => enc.encode(s)) },
  { weight: 1, arbitrary: fc.string({ maxLength: 40 }).map((prompt) => infer.v1.InferRequest.encode({ prompt, deadline_unix_ms: -5 }).finish()) },
  // Over the 256 KiB body limit (the stream itself takes up to 1 MiB).
  { weight: 1, arbitrary: fc.constantFrom(262_145, 400_000).map((n) => enc.encode(JSON.stringify({ prompt: "p".repeat(n) }))) },
);

const contentType = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom("application/json", "application/x-protobuf", "APPLICATION/JSON; charset=UTF-8") },
  { weight: 1, arbitrary: headerValue },
);

const extraHeaders = fc.array(
  fc.tuple(
    fc.oneof(fc.constantFrom("Infer-Version", "Infer-Deadline", "Infer-Stream", "traceparent", "tracestate", "Infer-Status", "X-Anything"), printable),
    headerValue,
  ),
  { maxLength: 4 },
);

/** Well-formed requests with odd but valid content: these must come back ok (or with the error they ask for). */
const benign: fc.Arbitrary<HostileRequest> = fc
  .record({
    priority: fc.constantFrom("high", "normal", "low"),
    model: fc.constantFrom(...MODELS),
    prompt: fc.oneof(fc.string({ unit: "grapheme", minLength: 1, maxLength: 200 }), fc.string({ unit: "binary", minLength: 1, maxLength: 50 })),
    inputs: fc.option(fc.jsonValue({ maxDepth: 3 }), { nil: undefined }),
    parameters: fc.option(
      fc.record({ max_tokens: fc.integer({ min: 1, max: 64 }), temperature: fc.double({ min: 0, max: 2, noNaN: true }), top_p: fc.double({ min: 0.01, max: 1, noNaN: true }) }, { requiredKeys: [] }),
      { nil: undefined },
    ),
    protobuf: fc.boolean(),
    stream: fc.constantFrom(undefined, "0", "1"),
    extra: fc.array(fc.tuple(fc.constantFrom("X-Anything", "X-Tenant", "Infer-Status", "tracestate"), headerValue), { maxLength: 3 }),
  })
  .map((r) => {
    const headers: Array<[string, string]> = [["Content-Type", r.protobuf ? "application/x-protobuf" : "application/json"], ...r.extra];
    if (r.stream !== undefined) headers.push(["Infer-Stream", r.stream]);
    const body = r.protobuf
      ? infer.v1.InferRequest.encode({ prompt: r.prompt }).finish()
      : enc.encode(JSON.stringify({ prompt: r.prompt, ...(r.inputs !== undefined ? { inputs: r.inputs } : {}), ...(r.parameters ? { parameters: r.parameters } : {}) }));
    return { idKind: "valid" as const, priority: r.priority, model: r.model, headers, body };
  });

const hostile: fc.Arbitrary<HostileRequest> = fc
  .record({
    idKind: fc.oneof({ weight: 8, arbitrary: fc.constant<IdKind>("valid") }, { weight: 1, arbitrary: fc.constantFrom<IdKind>("missing", "invalid", "bad-tenant") }),
    priority: fc.constantFrom("high", "normal", "low"),
    model: fc.oneof({ weight: 5, arbitrary: fc.constantFrom(...MODELS) }, { weight: 1, arbitrary: fc.constantFrom("nope", "x", "a-b_c") }),
    contentType: fc.option(contentType, { nil: undefined }),
    version: fc.option(fc.oneof(fc.constantFrom("v1", "v2"), headerValue), { nil: undefined }),
    deadline: fc.option(
      fc.oneof(fc.constant("past"), fc.constant("future"), headerValue, fc.constantFrom("0", "-1", "1e3", "9007199254740993")),
      { nil: undefined },
    ),
    extra: extraHeaders,
    body,
  })
  .map((r) => {
    const headers: Array<[string, string]> = [];
    if (r.contentType !== undefined) headers.push(["Content-Type", r.contentType]);
    if (r.version !== undefined) headers.push(["Infer-Version", r.version]);
    if (r.deadline === "past") headers.push(["Infer-Deadline", String(Date.now() - 1_000)]);
    else if (r.deadline === "future") headers.push(["Infer-Deadline", String(Date.now() + 3_600_000)]);
    else if (r.deadline !== undefined) headers.push(["Infer-Deadline", r.deadline]);
    headers.push(...r.extra);
    return { idKind: r.idKind, priority: r.priority, model: r.model, headers, body: r.body };
  });

function capturingLogger(lines: string[]): PipelineLogger {
  return { info: () => undefined, warn: (m) => lines.push(`warn: ${m}`), error: (m) => lines.push(`error: ${m}`) };
}

/** The stream sequences of the requests that the DLQ holds a letter for. */
async function deadLetteredSeqs(jsm: JetStreamManager): Promise<Set<number>> {
  const info = await jsm.streams.info(STREAM_DLQ);
  const out = new Set<number>();
  for (let seq = info.state.first_seq; seq <= info.state.last_seq && seq > 0; seq++) {
    const m = await jsm.streams.getMessage(STREAM_DLQ, { seq });
    const original = m?.header.get("Infer-Original-Seq");
    if (original) out.add(Number(original));
  }
  return out;
}

describe("fuzz: the whole pipeline under hostile requests", function () {
  this.timeout(60_000);
  const nats = useNats();
  let worker: TestWorker;
  let pipeline: PipelineService;
  const log: string[] = [];
  const results = new Map<string, Array<{ status: string; code?: string }>>();
  let sub: Subscription | undefined;
  /** Rethrows a wait's error with the pipeline's last log lines (why it could not settle). */
  const withLog = (err: Error): never => {
    throw new Error(`${err.message}; pipeline log: ${log.slice(-3).map((l) => l.slice(0, 300)).join(" | ")}`);
  };

  before(async () => {
    worker = await startWorker({ base_ms: 0, per_item_ms: 0 });
    pipeline = await PipelineService.start(
      testConfig(nats.url, {
        models: models(MODELS, { batch: { max_size: 16, max_delay_ms: 2 } }),
        workers: MODELS.map((model) => ({ model, version: "v1", endpoint: worker.server.endpoint })),
        consumer: { ackWaitMs: 3_000, maxDeliver: 3 },
        pipeline: { retryBaseMs: 20, retryMaxMs: 100 },
      }),
      { logger: capturingLogger(log) },
    );
    sub = nats.nc.subscribe(`infer.res.${TENANT}.>`, {
      callback: (_e, m) => {
        const id = m.subject.slice(`infer.res.${TENANT}.`.length);
        const list = results.get(id) ?? [];
        let parsed: { status?: string; error?: { code?: string } } = {};
        try {
          parsed = JSON.parse(dec.decode(m.data)) as typeof parsed;
        } catch {
          parsed = { status: "unparseable" };
        }
        list.push({ status: `${m.headers?.get("Infer-Status") ?? "?"}/${parsed.status ?? "?"}`, ...(parsed.error?.code ? { code: parsed.error.code } : {}) });
        results.set(id, list);
      },
    });
  });

  after(async () => {
    sub?.unsubscribe();
    await pipeline?.stop(2_000);
    await worker?.stop();
  });

  it(`answers ${REQUESTS} hostile requests exactly once each, dead-letters those without a usable id, and keeps serving`, async () => {
    const requests = fc.sample(fc.oneof({ weight: 2, arbitrary: benign }, { weight: 3, arbitrary: hostile }), { seed: SEED, numRuns: REQUESTS });
    const js = jetstream(nats.nc);
    const jsm = await jetstreamManager(nats.nc);
    const expectResult = new Map<string, HostileRequest>();
    const expectDead = new Map<number, HostileRequest>();
    await Promise.all(
      requests.map(async (r, i) => {
        const h: MsgHdrs = natsHeaders();
        for (const [k, v] of r.headers) h.append(k, v);
        let tenant = TENANT;
        let id: string | undefined = `fz-${i}`;
        if (r.idKind === "missing" || r.idKind === "invalid") id = undefined;
        if (r.idKind === "bad-tenant") tenant = ["FZ", "fz!", "t".repeat(65)][i % 3]!;
        if (id !== undefined) h.set("Nats-Msg-Id", id);
        if (r.idKind === "invalid") h.set("Nats-Msg-Id", [`bad id ${i}`, `${"x".repeat(129)}${i}`, `a.b.${i}`, `ünï-${i}`][i % 4]!);
        const ack = await js.publish(`infer.req.${r.priority}.${tenant}.${r.model}`, r.body, { headers: h, timeout: 10_000 });
        expect(ack.duplicate, `request ${i} stored once`).to.equal(false);
        if (r.idKind === "valid") expectResult.set(id!, r);
        else expectDead.set(ack.seq, r);
      }),
    );
    expect(expectResult.size + expectDead.size).to.equal(REQUESTS);

    await waitFor(
      `a result for each of ${expectResult.size} requests`,
      () => [...expectResult.keys()].every((id) => results.has(id)),
      30_000,
      50,
    ).catch((err: Error) => {
      const missing = [...expectResult.keys()].filter((id) => !results.has(id));
      throw new Error(`${err.message}; missing ${missing.length}: ${missing.slice(0, 10).join(", ")}; pipeline log: ${log.slice(-5).join(" | ")}`);
    });
    await waitFor(
      `a dead letter for each of ${expectDead.size} requests without a usable id or tenant`,
      async () => {
        const seqs = await deadLetteredSeqs(jsm);
        return [...expectDead.keys()].every((s) => seqs.has(s));
      },
      15_000,
      100,
    ).catch(async (err: Error) => {
      const seqs = await deadLetteredSeqs(jsm);
      const missing = [...expectDead.entries()].filter(([s]) => !seqs.has(s));
      const show = missing.slice(0, 5).map(([s, r]) => `seq ${s} ${r.idKind} ${r.priority}.${r.model} headers=${JSON.stringify(r.headers).slice(0, 200)} body=${r.body.length}B`);
      const stored = await jsm.streams.getMessage("INFER_REQ", { seq: missing[0]![0] });
      const hdrs = stored?.header ? [...stored.header.keys()].map((k) => `${k}=${stored.header.get(k).slice(0, 40)}`) : [];
      throw new Error(`${err.message}; missing ${missing.length}: ${show.join(" | ")}; first stored: ${hdrs.join(",")}; stats ${JSON.stringify(pipeline.stats)}; pipeline log: ${log.slice(-5).join(" | ").slice(0, 1_500)}`);
    });
    // Let any duplicate arrive before counting.
    await new Promise((r) => setTimeout(r, 300));

    const byStatus: Record<string, number> = {};
    for (const [id] of expectResult) {
      const got = results.get(id)!;
      expect(got, `results for ${id}`).to.have.length(1);
      const { status, code } = got[0]!;
      byStatus[code ?? status] = (byStatus[code ?? status] ?? 0) + 1;
      if (status === "ok/ok") continue;
      expect(status, `status of ${id}`).to.equal(`${code}/error`);
      expect(ERROR_CODES, `error code of ${id}`).to.include(code);
    }
    // No result for anything that had no usable id.
    for (const id of results.keys()) expect(expectResult.has(id), `unexpected result for '${id}'`).to.equal(true);
    // Both outcomes happened: the generators are not all-valid or all-invalid.
    expect(byStatus["ok/ok"] ?? 0, `${JSON.stringify(byStatus)} ${JSON.stringify(pipeline.stats)}`).to.be.greaterThan(10);
    expect(byStatus["INVALID_ARGUMENT"] ?? 0, JSON.stringify(byStatus)).to.be.greaterThan(10);

    console.log(`      stats: ${JSON.stringify(pipeline.stats.byAction)} ${JSON.stringify(byStatus)}`);
    // Still serving.
    const client = new InferenceClient(nats.nc, TENANT);
    const ok = await client.infer("echo", { prompt: "still alive" }, { timeoutMs: 10_000 });
    expect(ok.output?.text).to.equal("still alive");
    await client.close();
    expect(log.filter((l) => l.startsWith("error:")), log.join("\n")).to.deep.equal([]);
  });

  // Header blocks that nats.js cannot decode (a bare LF inside a value, a space or a non-ASCII
  // letter in a name) throw from JsMsg.headers. decodeDelivery catches that and makes a dead
  // letter, but writing the dead letter reads the headers again (Delivery.headerEntries()),
  // throws, and the request is naked and redelivered forever: never answered, never in the DLQ.
  it("a request whose header block nats.js cannot parse is dead-lettered, not redelivered forever", async () => {
    const jsm = await jetstreamManager(nats.nc);
    const body = enc.encode(JSON.stringify({ prompt: "raw" }));
    const blocks = [
      "NATS/1.0\r\nNats-Msg-Id: raw-lf\r\nX-Note: a\nb\r\n\r\n",
      "NATS/1.0\r\nNats-Msg-Id: raw-space\r\nBad Key: v\r\n\r\n",
      "NATS/1.0\r\nNats-Msg-Id: raw-utf8\r\nKey\u00e9: v\r\n\r\n",
    ];
    const before = await deadLetteredSeqs(jsm);
    const lastSeq = (await jsm.streams.info("INFER_REQ")).state.last_seq;
    const messages: RawMessage[] = blocks.map((headerBlock) => ({ subject: `infer.req.normal.${TENANT}.echo`, headerBlock, data: body }));
    await rawPublish(nats.url, messages);
    await waitFor(
      "each raw request answered or dead-lettered",
      async () => {
        const answered = ["raw-lf", "raw-space", "raw-utf8"].filter((id) => results.has(id)).length;
        const dead = [...(await deadLetteredSeqs(jsm))].filter((seq) => seq > lastSeq && !before.has(seq)).length;
        return answered + dead >= blocks.length;
      },
      10_000,
      100,
    ).catch(withLog);
  });

  // A request without a usable id whose header block is just under the server's 64 KiB header
  // limit cannot be dead-lettered: the letter copies every header and adds its own
  // (Infer-Error-Reason, Infer-Original-Subject, ...), the server refuses the letter ("header
  // size exceeds maximum allowed of 64k"), and the request is naked and redelivered forever.
  it("a request without an id whose headers are near the 64 KiB limit is still dead-lettered", async () => {
    const jsm = await jetstreamManager(nats.nc);
    // The header block is "NATS/1.0\r\nX-Padding: <value>\r\n\r\n"; make it 40 bytes short of 64 KiB.
    const h = natsHeaders();
    h.set("X-Padding", "p".repeat(65_536 - 40 - "NATS/1.0\r\nX-Padding: \r\n\r\n".length));
    const ack = await jetstream(nats.nc).publish(`infer.req.normal.${TENANT}.echo`, enc.encode(JSON.stringify({ prompt: "x" })), { headers: h });
    await waitFor("the dead letter", async () => (await deadLetteredSeqs(jsm)).has(ack.seq), 10_000, 200).catch(withLog);
  });

  // The same for a request without a usable id whose body and headers are just under the 1 MiB
  // message limit: the letter carries the body and more headers than the request had.
  it("a request without an id near the 1 MiB message limit is still dead-lettered", async () => {
    const jsm = await jetstreamManager(nats.nc);
    const h = natsHeaders();
    h.set("X-Padding", "p".repeat(1_000));
    const size = 1024 * 1024 - "NATS/1.0\r\nX-Padding: \r\n\r\n".length - 1_000 - 64;
    const ack = await jetstream(nats.nc).publish(`infer.req.normal.${TENANT}.echo`, new Uint8Array(size).fill(0x41), { headers: h });
    await waitFor("the dead letter", async () => (await deadLetteredSeqs(jsm)).has(ack.seq), 10_000, 200).catch(withLog);
  });

  // INFER_REQ stores exactly the subjects its consumers read (infer.req.{high,normal,low}.*.*):
  // a request on any other request subject is refused at publish, never stored unanswered.
  it("refuses, at publish, a request on a request subject that no consumer reads", async () => {
    const js = jetstream(nats.nc);
    for (const subject of [`infer.req.bogus.${TENANT}.echo`, `infer.req.normal.${TENANT}.echo.extra`, "infer.req.normal"]) {
      const err = await js.publish(subject, enc.encode(JSON.stringify({ prompt: "x" })), { msgID: `unread-${subject}` }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err, subject).to.be.instanceOf(Error);
    }
  });

  it("a request with a large traceparent and tracestate (within the header limit) is answered", async () => {
    const h = natsHeaders();
    h.set("Nats-Msg-Id", "big-trace");
    h.set("traceparent", "t".repeat(30_000));
    h.set("tracestate", "s".repeat(30_000));
    await jetstream(nats.nc).publish(`infer.req.normal.${TENANT}.echo`, enc.encode(JSON.stringify({ prompt: "x" })), { headers: h });
    await waitFor("its result", () => results.has("big-trace"), 10_000, 100);
    expect(results.get("big-trace")).to.have.length(1);
  });

  // Deep nesting within the size limit (see decode.fuzz.test.ts): accepted by decode, refused
  // by the worker client when it builds the batch (proto/json.ts, MAX_JSON_DEPTH), which fails
  // the whole batch: every request batched with it is answered INVALID_ARGUMENT too (docs/protocol.md:
  // "one bad item never fails the batch").
  it("a request with deeply nested inputs gets INVALID_ARGUMENT, and the requests batched with it are still served", async () => {
    const depth = 20_000;
    const js = jetstream(nats.nc);
    const deep = natsHeaders();
    deep.set("Nats-Msg-Id", "deep-inputs");
    const mates = Array.from({ length: 8 }, (_, i) => `deep-mate-${i}`);
    await Promise.all([
      js.publish(`infer.req.normal.${TENANT}.echo`, enc.encode(`{"inputs":${'{"a":'.repeat(depth)}1${"}".repeat(depth)}}`), { headers: deep }),
      ...mates.map((id) => {
        const h = natsHeaders();
        h.set("Nats-Msg-Id", id);
        return js.publish(`infer.req.normal.${TENANT}.echo`, enc.encode(JSON.stringify({ prompt: id })), { headers: h });
      }),
    ]);
    await waitFor("all results", () => ["deep-inputs", ...mates].every((id) => results.has(id)), 10_000, 50);
    expect(results.get("deep-inputs")?.[0]?.code).to.equal("INVALID_ARGUMENT");
    for (const id of mates) expect(results.get(id)?.[0]?.status, id).to.equal("ok/ok");
    const client = new InferenceClient(nats.nc, TENANT);
    expect((await client.infer("echo", { prompt: "after deep" }, { timeoutMs: 10_000 })).output?.text).to.equal("after deep");
    await client.close();
  });
});
