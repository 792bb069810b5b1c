import { expect } from "chai";
import { TestScheduler } from "rxjs/testing";
import { infer, type google } from "../../proto/gen/inference.js";
import { decodeDelivery, decodeRequest, DEFAULT_MAX_TOKENS_LIMIT, type Decoded, type DecodeOptions } from "../../operators/decode-request.js";
import { DEFAULT_MAX_PAYLOAD_BYTES } from "../../proto/wire.js";
import type { Delivery, InferJob, Outcome } from "../../operators/types.js";

// ---- a fake delivery: plain data, no NATS --------------------------------------------------

interface FakeInit {
  subject?: string;
  data?: Uint8Array | string | object;
  headers?: Record<string, string | undefined>;
}

const SUBJECT = "infer.req.normal.acme.llama3-8b";
const ID = "req-0001";

function fakeDelivery(init: FakeInit = {}): Delivery {
  const headers: Array<[string, string]> = Object.entries(
    "headers" in init ? (init.headers ?? {}) : { "Nats-Msg-Id": ID },
  ).filter((e): e is [string, string] => e[1] !== undefined);
  const raw = "data" in init ? init.data : { prompt: "hello" };
  const data =
    raw instanceof Uint8Array ? raw : new TextEncoder().encode(typeof raw === "string" ? raw : JSON.stringify(raw));
  let settled = false;
  return {
    subject: init.subject ?? SUBJECT,
    data,
    header: (name) => headers.find(([k]) => k.toLowerCase() === name.toLowerCase())?.[1],
    headerEntries: () => headers.map(([k, v]): [string, string] => [k, v]),
    seq: 1,
    deliveryCount: 1,
    storedAtMs: 1_000,
    pulledAtMs: 1_001,
    get settled() {
      return settled;
    },
    ack: () => void (settled = true),
    nak: () => void (settled = true),
    term: () => void (settled = true),
    working: () => undefined,
  };
}

/** Headers with the id, plus the given ones. */
function h(extra: Record<string, string | undefined> = {}): Record<string, string | undefined> {
  return { "Nats-Msg-Id": ID, ...extra };
}

function expectJob(d: Decoded): InferJob {
  if (!d.ok) expect.fail(`expected a job, got ${JSON.stringify(outcomeSummary(d.outcome))}`);
  return d.job;
}

function expectRejected(d: Decoded): Extract<Outcome, { kind: "result" }> {
  if (d.ok) expect.fail(`expected an INVALID_ARGUMENT result, got a job`);
  if (d.outcome.kind !== "result") expect.fail(`expected a result outcome, got ${JSON.stringify(outcomeSummary(d.outcome))}`);
  expect(d.outcome.result.status).to.equal("error");
  expect(d.outcome.result.error?.code).to.equal("INVALID_ARGUMENT");
  expect(d.outcome.result.id).to.equal(d.outcome.job.id);
  return d.outcome;
}

function expectDead(d: Decoded): Extract<Outcome, { kind: "dead" }> {
  if (d.ok) expect.fail(`expected a dead outcome, got a job`);
  if (d.outcome.kind !== "dead") expect.fail(`expected a dead outcome, got ${JSON.stringify(outcomeSummary(d.outcome))}`);
  expect(d.outcome.error.code).to.equal("INVALID_ARGUMENT");
  return d.outcome;
}

function outcomeSummary(o: Outcome): unknown {
  return o.kind === "dead" ? { kind: o.kind, error: o.error } : { kind: o.kind, job: o.job.id };
}

// (`infer` is a TypeScript keyword in type position, so the message type is taken from encode.)
type ProtoRequest = Parameters<typeof infer.v1.InferRequest.encode>[0];

function protobuf(req: ProtoRequest): Uint8Array {
  return infer.v1.InferRequest.encode(req).finish();
}

const PROTO = "application/x-protobuf";

/** Deterministic pseudo-random numbers (mulberry32), so a failing fuzz case can be replayed. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// ---- tests ---------------------------------------------------------------------------------

describe("decodeDelivery", () => {
  describe("a valid request", () => {
    it("builds the whole job from subject, headers and JSON body", () => {
      const d = fakeDelivery({
        subject: "infer.req.high.acme.llama3-8b",
        headers: h({
          "Infer-Version": "v2.1_rc-1",
          "Infer-Deadline": "1700000000000",
          "Infer-Stream": "1",
          traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
          tracestate: "congo=t61rcWkgMzE",
        }),
        data: { prompt: "Write a haiku", inputs: { image: [1, 2] }, parameters: { max_tokens: 64, temperature: 0.7, top_p: 1 } },
      });
      const job = expectJob(decodeDelivery(d));
      expect(job).to.deep.equal({
        id: ID,
        tenant: "acme",
        model: "llama3-8b",
        priority: "high",
        prompt: "Write a haiku",
        inputs: { image: [1, 2] },
        parameters: { max_tokens: 64, temperature: 0.7, top_p: 1 },
        pinnedVersion: "v2.1_rc-1",
        deadlineMs: 1_700_000_000_000,
        stream: true,
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate: "congo=t61rcWkgMzE",
        delivery: d,
      });
      expect(job.delivery).to.equal(d);
    });

    it("leaves optional fields out when they are not given", () => {
      const d = fakeDelivery({ data: { prompt: "" } });
      const job = expectJob(decodeDelivery(d));
      expect(job).to.deep.equal({ id: ID, tenant: "acme", model: "llama3-8b", priority: "normal", prompt: "", stream: false, delivery: d });
    });

    it("accepts every priority", () => {
      for (const p of ["high", "normal", "low"]) {
        expect(expectJob(decodeDelivery(fakeDelivery({ subject: `infer.req.${p}.t.m` }))).priority).to.equal(p);
      }
    });

    it("accepts names at the edges of the allowed forms", () => {
      const long = "a".repeat(64);
      const id = "A".repeat(128);
      const job = expectJob(decodeDelivery(fakeDelivery({ subject: `infer.req.low.${long}.m_-9`, headers: { "Nats-Msg-Id": id } })));
      expect(job.tenant).to.equal(long);
      expect(job.model).to.equal("m_-9");
      expect(job.id).to.equal(id);
    });

    it("accepts inputs without a prompt, and any JSON value as inputs", () => {
      for (const inputs of [[1, 2], "text", 0, false, { a: { b: null } }]) {
        expect(expectJob(decodeDelivery(fakeDelivery({ data: { inputs } }))).inputs).to.deep.equal(inputs);
      }
    });

    it("looks headers up case-insensitively", () => {
      const job = expectJob(
        decodeDelivery(fakeDelivery({ headers: { "nats-msg-id": ID, "INFER-STREAM": "1", "content-type": "application/json" } })),
      );
      expect(job.id).to.equal(ID);
      expect(job.stream).to.equal(true);
    });

    it("reads Infer-Session onto the job, absent when not sent", () => {
      expect(expectJob(decodeDelivery(fakeDelivery({ headers: h({ "Infer-Session": "user-42:chat.7@acme" }) }))).session).to.equal("user-42:chat.7@acme");
      expect(expectJob(decodeDelivery(fakeDelivery({}))).session).to.equal(undefined);
    });

    it("reads Infer-Stream 0 as not streaming", () => {
      expect(expectJob(decodeDelivery(fakeDelivery({ headers: h({ "Infer-Stream": "0" }) }))).stream).to.equal(false);
    });

    it("accepts the JSON content types", () => {
      for (const ct of ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8", undefined]) {
        expectJob(decodeDelivery(fakeDelivery({ headers: h({ "Content-Type": ct }) })));
      }
    });

    it("accepts parameters at their limits", () => {
      const parameters = { max_tokens: DEFAULT_MAX_TOKENS_LIMIT, temperature: 0, top_p: 1, stop: ["\n"] };
      expect(expectJob(decodeDelivery(fakeDelivery({ data: { prompt: "x", parameters } }))).parameters).to.deep.equal(parameters);
      expectJob(decodeDelivery(fakeDelivery({ data: { prompt: "x", parameters: { max_tokens: 1, top_p: 1e-9 } } })));
    });

    it("accepts a body of exactly maxPayloadBytes", () => {
      const body = JSON.stringify({ prompt: "x".repeat(100) });
      expectJob(decodeDelivery(fakeDelivery({ data: body }), { maxPayloadBytes: body.length }));
    });

    it("accepts a prompt of exactly maxPromptChars code points", () => {
      expectJob(decodeDelivery(fakeDelivery({ data: { prompt: "é😀ab" } }), { maxPromptChars: 4 }));
    });

    it("decodes a protobuf body, Struct and Value included", () => {
      const inputs: google.protobuf.IValue = {
        structValue: {
          fields: {
            s: { stringValue: "x" },
            n: { numberValue: 1.5 },
            b: { boolValue: true },
            z: { nullValue: 0 },
            l: { listValue: { values: [{ numberValue: 1 }, { stringValue: "two" }, { listValue: { values: [] } }] } },
          },
        },
      };
      const d = fakeDelivery({
        headers: h({ "Content-Type": PROTO, "Infer-Deadline": "1700000000000" }),
        data: protobuf({ prompt: "hi", inputs, parameters: { fields: { max_tokens: { numberValue: 16 }, temperature: { numberValue: 0.5 } } } }),
      });
      const job = expectJob(decodeDelivery(d));
      expect(job.prompt).to.equal("hi");
      expect(job.inputs).to.deep.equal({ s: "x", n: 1.5, b: true, z: null, l: [1, "two", []] });
      expect(job.parameters).to.deep.equal({ max_tokens: 16, temperature: 0.5 });
      expect(job.deadlineMs).to.equal(1_700_000_000_000);
    });

    it("takes the deadline from a protobuf body when the header is absent", () => {
      const d = fakeDelivery({ headers: h({ "Content-Type": PROTO }), data: protobuf({ prompt: "hi", deadline_unix_ms: 1_700_000_000_123 }) });
      expect(expectJob(decodeDelivery(d)).deadlineMs).to.equal(1_700_000_000_123);
    });

    it("does not let a '__proto__' key of a protobuf Struct change the prototype of the result", () => {
      const fields: Record<string, google.protobuf.IValue> = { a: { numberValue: 1 } };
      Object.defineProperty(fields, "__proto__", {
        value: { structValue: { fields: { polluted: { boolValue: true } } } },
        enumerable: true,
      });
      const d = fakeDelivery({ headers: h({ "Content-Type": PROTO }), data: protobuf({ inputs: { structValue: { fields } } }) });
      const job = expectJob(decodeDelivery(d));
      expect(Object.getPrototypeOf(job.inputs)).to.equal(Object.prototype);
      expect((job.inputs as Record<string, unknown>)["polluted"]).to.equal(undefined);
      expect(({} as Record<string, unknown>)["polluted"]).to.equal(undefined);
      expect((job.inputs as Record<string, unknown>)["a"]).to.equal(1);
    });
  });

  describe("dead: no usable id or tenant, or a bad subject", () => {
    const cases: Array<{ name: string; init: FakeInit; message: RegExp; tenant?: string; model?: string; id?: string }> = [
      { name: "too few tokens", init: { subject: "infer.req.normal.acme" }, message: /not infer\.req\.<priority>/, id: ID },
      { name: "too many tokens", init: { subject: "infer.req.normal.acme.m.x" }, message: /not infer\.req\.<priority>/, id: ID },
      { name: "wrong prefix", init: { subject: "infer.res.normal.acme.m" }, message: /not infer\.req/, id: ID },
      { name: "empty subject", init: { subject: "" }, message: /not infer\.req/, id: ID },
      { name: "unknown priority", init: { subject: "infer.req.urgent.acme.m" }, message: /priority "urgent"/, tenant: "acme", model: "m", id: ID },
      { name: "upper-case tenant", init: { subject: "infer.req.low.Acme.m" }, message: /tenant "Acme"/, model: "m", id: ID },
      { name: "empty tenant", init: { subject: "infer.req.low..m" }, message: /tenant ""/, model: "m", id: ID },
      { name: "tenant too long", init: { subject: `infer.req.low.${"a".repeat(65)}.m` }, message: /tenant "a+"/, model: "m", id: ID },
      { name: "bad model", init: { subject: "infer.req.low.acme.llama*" }, message: /model "llama\*"/, tenant: "acme", id: ID },
      { name: "missing id", init: { headers: {} }, message: /Nats-Msg-Id is missing/, tenant: "acme", model: "llama3-8b" },
      { name: "empty id", init: { headers: { "Nats-Msg-Id": "" } }, message: /Nats-Msg-Id is ""/, tenant: "acme", model: "llama3-8b" },
      { name: "id with a dot", init: { headers: { "Nats-Msg-Id": "a.b" } }, message: /Nats-Msg-Id is "a\.b"/, tenant: "acme", model: "llama3-8b" },
      { name: "id too long", init: { headers: { "Nats-Msg-Id": "a".repeat(129) } }, message: /Nats-Msg-Id/, tenant: "acme", model: "llama3-8b" },
      { name: "bad subject and no id", init: { subject: "x", headers: {} }, message: /subject "x"/ },
    ];
    for (const c of cases) {
      it(c.name, () => {
        const d = fakeDelivery(c.init);
        const dead = expectDead(decodeDelivery(d));
        expect(dead.delivery).to.equal(d);
        expect(dead.error.message).to.match(c.message);
        expect(dead.tenant).to.equal(c.tenant);
        expect(dead.model).to.equal(c.model);
        expect(dead.id).to.equal(c.id);
      });
    }

    it("dead-letters a bad subject even when the body is also bad", () => {
      expectDead(decodeDelivery(fakeDelivery({ subject: "infer.req.x.acme.m", data: "{" })));
    });

    it("quotes a huge subject only in part", () => {
      const dead = expectDead(decodeDelivery(fakeDelivery({ subject: "s".repeat(100_000) })));
      expect(dead.error.message.length).to.be.below(200);
    });
  });

  describe("result INVALID_ARGUMENT: usable id and tenant, bad request", () => {
    const json = (data: FakeInit["data"], headers: Record<string, string | undefined> = {}): FakeInit => ({ data, headers: h(headers) });
    const cases: Array<{ name: string; init: FakeInit; opts?: DecodeOptions; message: RegExp }> = [
      { name: "body over maxPayloadBytes", init: json({ prompt: "x".repeat(100) }), opts: { maxPayloadBytes: 50 }, message: /body of \d+ bytes is over the limit of 50 bytes/ },
      {
        name: "body over the default limit",
        init: json(new Uint8Array(DEFAULT_MAX_PAYLOAD_BYTES + 1)),
        message: new RegExp(`over the limit of ${DEFAULT_MAX_PAYLOAD_BYTES} bytes`),
      },
      { name: "unsupported content type", init: json({ prompt: "x" }, { "Content-Type": "text/plain" }), message: /Content-Type "text\/plain"/ },
      { name: "JSON with another charset", init: json({ prompt: "x" }, { "Content-Type": "application/json; charset=latin1" }), message: /Content-Type/ },
      { name: "empty content type", init: json({ prompt: "x" }, { "Content-Type": "" }), message: /Content-Type ""/ },
      { name: "invalid UTF-8", init: json(new Uint8Array([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x7d])), message: /not valid UTF-8/ },
      { name: "lone surrogate bytes", init: json(new Uint8Array([0x22, 0xed, 0xa0, 0x80, 0x22])), message: /not valid UTF-8/ },
      { name: "malformed JSON", init: json('{"prompt": "x"'), message: /not valid JSON/ },
      { name: "empty body", init: json(""), message: /not valid JSON/ },
      { name: "body is an array", init: json([{ prompt: "x" }]), message: /must be a JSON object, got array/ },
      { name: "body is null", init: json("null"), message: /must be a JSON object, got null/ },
      { name: "body is a string", init: json('"hello"'), message: /must be a JSON object, got string/ },
      { name: "prompt is a number", init: json({ prompt: 42 }), message: /"prompt" must be a string, got number/ },
      { name: "prompt is null", init: json({ prompt: null, inputs: 1 }), message: /"prompt" must be a string, got null/ },
      { name: "parameters is an array", init: json({ prompt: "x", parameters: [1] }), message: /"parameters" must be an object, got array/ },
      { name: "parameters is a string", init: json({ prompt: "x", parameters: "hot" }), message: /"parameters" must be an object, got string/ },
      { name: "neither prompt nor inputs", init: json({ parameters: {} }), message: /neither "prompt" nor "inputs"/ },
      { name: "inputs null and no prompt", init: json({ inputs: null }), message: /neither "prompt" nor "inputs"/ },
      { name: "empty object", init: json({}), message: /neither "prompt" nor "inputs"/ },
      { name: "unknown field", init: json({ prompt: "x", temperature: 1 }), message: /unknown field\(s\) "temperature"/ },
      { name: "tenant in the body", init: json({ prompt: "x", tenant: "other" }), message: /"tenant".*comes from the subject/ },
      { name: "id in the body", init: json({ prompt: "x", id: "other" }), message: /"id".*Nats-Msg-Id/ },
      { name: "__proto__ in the body", init: json('{"prompt":"x","__proto__":{"a":1}}'), message: /"__proto__"/ },
      { name: "prompt over maxPromptChars", init: json({ prompt: "é😀abc" }), opts: { maxPromptChars: 4 }, message: /over the limit of 4 characters/ },
      { name: "bad Infer-Version", init: json({ prompt: "x" }, { "Infer-Version": "v1/../x" }), message: /Infer-Version "v1\/\.\.\/x"/ },
      { name: "empty Infer-Version", init: json({ prompt: "x" }, { "Infer-Version": "" }), message: /Infer-Version ""/ },
      { name: "long Infer-Version", init: json({ prompt: "x" }, { "Infer-Version": "v".repeat(65) }), message: /Infer-Version/ },
      { name: "Infer-Deadline not a number", init: json({ prompt: "x" }, { "Infer-Deadline": "soon" }), message: /Infer-Deadline "soon"/ },
      { name: "Infer-Deadline zero", init: json({ prompt: "x" }, { "Infer-Deadline": "0" }), message: /Infer-Deadline "0"/ },
      { name: "Infer-Deadline negative", init: json({ prompt: "x" }, { "Infer-Deadline": "-5" }), message: /Infer-Deadline/ },
      { name: "Infer-Deadline fractional", init: json({ prompt: "x" }, { "Infer-Deadline": "1700000000000.5" }), message: /Infer-Deadline/ },
      { name: "Infer-Deadline in exponent form", init: json({ prompt: "x" }, { "Infer-Deadline": "1e12" }), message: /Infer-Deadline/ },
      { name: "Infer-Deadline beyond safe integers", init: json({ prompt: "x" }, { "Infer-Deadline": "99999999999999999999" }), message: /Infer-Deadline/ },
      { name: "Infer-Session empty", init: json({ prompt: "x" }, { "Infer-Session": "" }), message: /Infer-Session ""/ },
      { name: "Infer-Session with a space", init: json({ prompt: "x" }, { "Infer-Session": "a b" }), message: /Infer-Session "a b" does not match/ },
      { name: "Infer-Session too long", init: json({ prompt: "x" }, { "Infer-Session": "s".repeat(129) }), message: /Infer-Session/ },
      { name: "Infer-Stream true", init: json({ prompt: "x" }, { "Infer-Stream": "true" }), message: /Infer-Stream "true"/ },
      { name: "Infer-Stream empty", init: json({ prompt: "x" }, { "Infer-Stream": "" }), message: /Infer-Stream ""/ },
      { name: "max_tokens zero", init: json({ prompt: "x", parameters: { max_tokens: 0 } }), message: /max_tokens" 0 is not an integer in 1\.\.1000000/ },
      { name: "max_tokens fractional", init: json({ prompt: "x", parameters: { max_tokens: 1.5 } }), message: /max_tokens" 1\.5/ },
      { name: "max_tokens a string", init: json({ prompt: "x", parameters: { max_tokens: "64" } }), message: /max_tokens" "64"/ },
      { name: "max_tokens null", init: json({ prompt: "x", parameters: { max_tokens: null } }), message: /max_tokens" null/ },
      { name: "max_tokens over the limit", init: json({ prompt: "x", parameters: { max_tokens: 65 } }), opts: { maxTokensLimit: 64 }, message: /max_tokens" 65 is not an integer in 1\.\.64/ },
      { name: "max_tokens over the default limit", init: json({ prompt: "x", parameters: { max_tokens: DEFAULT_MAX_TOKENS_LIMIT + 1 } }), message: /max_tokens/ },
      { name: "temperature negative", init: json({ prompt: "x", parameters: { temperature: -0.1 } }), message: /temperature" -0\.1 is not a finite number >= 0/ },
      { name: "temperature a string", init: json({ prompt: "x", parameters: { temperature: "hot" } }), message: /temperature" "hot"/ },
      { name: "temperature an object", init: json({ prompt: "x", parameters: { temperature: {} } }), message: /temperature" object/ },
      { name: "top_p zero", init: json({ prompt: "x", parameters: { top_p: 0 } }), message: /top_p" 0 is not a number in \(0, 1\]/ },
      { name: "top_p over one", init: json({ prompt: "x", parameters: { top_p: 1.01 } }), message: /top_p" 1\.01/ },
      { name: "top_p a boolean", init: json({ prompt: "x", parameters: { top_p: true } }), message: /top_p" true/ },
      { name: "protobuf that does not decode", init: json(new Uint8Array([0x12, 0x10, 0x41]), { "Content-Type": PROTO }), message: /not a valid protobuf InferRequest/ },
      { name: "protobuf with a tenant", init: json(protobuf({ prompt: "x", tenant: "other" }), { "Content-Type": PROTO }), message: /"tenant".*comes from the subject/ },
      { name: "protobuf with an id", init: json(protobuf({ prompt: "x", id: "other" }), { "Content-Type": PROTO }), message: /"id".*Nats-Msg-Id/ },
      { name: "protobuf with neither prompt nor inputs", init: json(protobuf({}), { "Content-Type": PROTO }), message: /neither "prompt" nor "inputs"/ },
      { name: "protobuf with a negative deadline", init: json(protobuf({ prompt: "x", deadline_unix_ms: -1 }), { "Content-Type": PROTO }), message: /deadline_unix_ms/ },
      {
        name: "protobuf with a bad max_tokens",
        init: json(protobuf({ prompt: "x", parameters: { fields: { max_tokens: { numberValue: 0.5 } } } }), { "Content-Type": PROTO }),
        message: /max_tokens" 0\.5/,
      },
      {
        name: "protobuf with NaN in inputs",
        init: json(protobuf({ inputs: { listValue: { values: [{ numberValue: Number.NaN }] } } }), { "Content-Type": PROTO }),
        message: /"inputs\[0\]" holds NaN/,
      },
      {
        name: "protobuf with an infinite temperature",
        init: json(protobuf({ prompt: "x", parameters: { fields: { temperature: { numberValue: Number.POSITIVE_INFINITY } } } }), { "Content-Type": PROTO }),
        message: /parameters\.temperature" holds Infinity/,
      },
      { name: "JSON sent as protobuf", init: json({ prompt: "x" }, { "Content-Type": PROTO }), message: /protobuf|neither/ },
    ];
    for (const c of cases) {
      it(c.name, () => {
        const d = fakeDelivery(c.init);
        const r = expectRejected(decodeDelivery(d, c.opts));
        expect(r.result.error?.message).to.match(c.message);
        expect(r.job.id).to.equal(ID);
        expect(r.job.tenant).to.equal("acme");
        expect(r.job.model).to.equal("llama3-8b");
        expect(r.job.priority).to.equal("normal");
        expect(r.job.delivery).to.equal(d);
        expect(r.result.model).to.equal("llama3-8b");
      });
    }

    it("builds the job as far as the request allows", () => {
      const d = fakeDelivery({
        headers: h({ "Infer-Stream": "1", "Infer-Version": "v2", traceparent: "tp", tracestate: "ts" }),
        data: { prompt: "x", parameters: { max_tokens: 0 } },
      });
      const r = expectRejected(decodeDelivery(d));
      expect(r.job).to.deep.include({ stream: true, pinnedVersion: "v2", traceparent: "tp", tracestate: "ts", prompt: "x" });
      expect(r.job.parameters).to.deep.equal({ max_tokens: 0 });
    });

    it("keeps the trace context on a rejected request", () => {
      const r = expectRejected(decodeDelivery(fakeDelivery({ headers: h({ traceparent: "tp", "Infer-Stream": "yes" }) })));
      expect(r.job.traceparent).to.equal("tp");
    });
  });

  describe("never throws", () => {
    const contentTypes = [undefined, "application/json", PROTO, "text/plain", ""];

    it("returns an outcome for random bytes under every content type", () => {
      const next = rng(0x5eed);
      for (let i = 0; i < 3000; i++) {
        const bytes = new Uint8Array(Math.floor(next() * 96));
        for (let j = 0; j < bytes.length; j++) bytes[j] = Math.floor(next() * 256);
        const ct = contentTypes[i % contentTypes.length];
        const d = fakeDelivery({ data: bytes, headers: h({ "Content-Type": ct }) });
        let out: Decoded | undefined;
        expect(() => (out = decodeDelivery(d)), `case ${i}`).not.to.throw();
        expectWellFormed(out, d);
      }
    });

    it("returns an outcome for random mutations of valid JSON and protobuf bodies", () => {
      const next = rng(42);
      const json = new TextEncoder().encode(JSON.stringify({ prompt: "hi", inputs: [1, { a: "b" }], parameters: { max_tokens: 8 } }));
      const pb = protobuf({
        prompt: "hi",
        inputs: { structValue: { fields: { a: { listValue: { values: [{ numberValue: 1 }, { boolValue: true }] } } } } },
        parameters: { fields: { temperature: { numberValue: 0.2 } } },
        deadline_unix_ms: 1_700_000_000_000,
      });
      let jobs = 0;
      for (let i = 0; i < 3000; i++) {
        const proto = i % 2 === 1;
        const bytes = Uint8Array.from(proto ? pb : json);
        const flips = 1 + Math.floor(next() * 3);
        for (let f = 0; f < flips; f++) bytes[Math.floor(next() * bytes.length)] = Math.floor(next() * 256);
        const d = fakeDelivery({ data: bytes, headers: h({ "Content-Type": proto ? PROTO : undefined }) });
        let out: Decoded | undefined;
        expect(() => (out = decodeDelivery(d)), `case ${i}`).not.to.throw();
        expectWellFormed(out, d);
        if (out?.ok === true) jobs++;
      }
      // Some mutations must survive, or the loop would only exercise the error paths.
      expect(jobs).to.be.above(0);
    });

    it("returns an outcome for random subjects and headers", () => {
      const next = rng(7);
      const alphabet = "infer.req.highnormallowacme-_AZ09*>. \u00e9";
      const pick = (n: number): string => Array.from({ length: Math.floor(next() * n) }, () => alphabet[Math.floor(next() * alphabet.length)]).join("");
      for (let i = 0; i < 2000; i++) {
        const subject = next() < 0.5 ? pick(40) : `infer.req.${pick(8)}.${pick(8)}.${pick(8)}`;
        const d = fakeDelivery({
          subject,
          headers: { "Nats-Msg-Id": next() < 0.8 ? pick(12) : undefined, "Infer-Deadline": pick(6), "Infer-Stream": pick(2), "Infer-Version": pick(8) },
        });
        let out: Decoded | undefined;
        expect(() => (out = decodeDelivery(d)), `case ${i}`).not.to.throw();
        expectWellFormed(out, d);
      }
    });

    it("turns an exception from the delivery itself into an outcome", () => {
      const d: Delivery = { ...fakeDelivery(), header: () => { throw new Error("boom"); } };
      const dead = expectDead(decodeDelivery(d));
      expect(dead.error.message).to.match(/boom/);
      expect(dead.tenant).to.equal("acme");
    });
  });
});

/** A decode either yields a job or an outcome with an error code that the settle step can act on. */
function expectWellFormed(out: Decoded | undefined, d: Delivery): void {
  expect(out).to.be.an("object");
  if (out === undefined) return;
  if (out.ok) {
    expect(out.job.delivery).to.equal(d);
    expect(out.job.prompt !== undefined || out.job.inputs !== undefined).to.equal(true);
    return;
  }
  const o = out.outcome;
  if (o.kind === "dead") {
    expect(o.delivery).to.equal(d);
    expect(o.error.code).to.equal("INVALID_ARGUMENT");
    expect(o.error.message).to.be.a("string").and.not.empty;
  } else if (o.kind === "result") {
    expect(o.job.delivery).to.equal(d);
    expect(o.result.error?.code).to.equal("INVALID_ARGUMENT");
    expect(o.result.error?.message).to.be.a("string").and.not.empty;
  } else {
    expect.fail(`unexpected outcome kind ${o.kind}`);
  }
}

describe("decodeRequest", () => {
  let scheduler: TestScheduler;
  beforeEach(() => {
    scheduler = new TestScheduler((actual, expected) => {
      expect(actual).to.deep.equal(expected);
    });
  });

  const good = fakeDelivery();
  const badBody = fakeDelivery({ data: "{" });
  const noId = fakeDelivery({ headers: {} });

  it("maps each delivery to its decode, in order, and completes", () => {
    scheduler.run(({ cold, expectObservable, expectSubscriptions }) => {
      const source = cold("-a-b--c-|", { a: good, b: badBody, c: noId });
      expectObservable(source.pipe(decodeRequest())).toBe("-a-b--c-|", {
        a: decodeDelivery(good, {}),
        b: decodeDelivery(badBody, {}),
        c: decodeDelivery(noId, {}),
      });
      expectSubscriptions(source.subscriptions).toBe("^-------!");
    });
  });

  it("passes its options to every decode", () => {
    scheduler.run(({ cold, expectObservable }) => {
      const source = cold("-a|", { a: good });
      const decoded = decodeDelivery(good, { maxPayloadBytes: 1 });
      expect(decoded.ok).to.equal(false);
      expectObservable(source.pipe(decodeRequest({ maxPayloadBytes: 1 }))).toBe("-a|", { a: decoded });
    });
  });

  it("emits jobs and outcomes with the right shape", () => {
    scheduler.run(({ cold, expectObservable }) => {
      const source = cold("ab|", { a: good, b: noId });
      const kinds = source.pipe(decodeRequest());
      expectObservable(kinds).toBe("ab|", {
        a: { ok: true, job: { id: ID, tenant: "acme", model: "llama3-8b", priority: "normal", prompt: "hello", stream: false, delivery: good } },
        b: { ok: false, outcome: { kind: "dead", delivery: noId, tenant: "acme", model: "llama3-8b", error: { code: "INVALID_ARGUMENT", message: "header Nats-Msg-Id is missing" } } },
      });
    });
  });

  it("forwards the source's error after the values before it", () => {
    scheduler.run(({ cold, expectObservable }) => {
      const failure = new Error("source failed");
      const source = cold("-a--#", { a: good }, failure);
      expectObservable(source.pipe(decodeRequest())).toBe("-a--#", { a: decodeDelivery(good, {}) }, failure);
    });
  });

  it("unsubscribes from the source when unsubscribed", () => {
    scheduler.run(({ hot, expectObservable, expectSubscriptions }) => {
      const source = hot("-a--b--c--|", { a: good, b: good, c: good });
      expectObservable(source.pipe(decodeRequest()), "^---!").toBe("-a---", { a: decodeDelivery(good, {}) });
      expectSubscriptions(source.subscriptions).toBe("^---!");
    });
  });
});
