/**
 * Property-based fuzzing of decodeDelivery (operators/decode-request.ts): for any subject,
 * headers and body bytes, it never throws and yields exactly one of a job, an INVALID_ARGUMENT
 * result for the request, or a dead letter; which one follows from the subject and the id
 * alone; and nothing a client sends can make the answer large. Fixed seeds, bounded runs.
 */
import { expect } from "chai";
import fc from "fast-check";
import { MsgHdrsImpl } from "@nats-io/transport-node";
import type { JsMsg } from "@nats-io/jetstream";
import { decodeDelivery, type Decoded, type DecodeOptions } from "../../operators/decode-request.js";
import type { Delivery } from "../../operators/types.js";
import { JsDelivery } from "../../pipeline/intake/jetstream.js";
import { infer } from "../../proto/gen/inference.js";
import { MAX_JSON_DEPTH } from "../../proto/json.js";
import { checkProperty } from "./property.js";

const SEED = 20_261_121;
const ID_RE = /^[A-Za-z0-9_-]{1,128}$/;
const NAME_RE = /^[a-z0-9_-]{1,64}$/;
const PRIORITIES = ["high", "normal", "low"];
/** No answer to a hostile request may be longer than this (quoted values are capped). */
const MAX_MESSAGE_CHARS = 2_048;

const enc = new TextEncoder();

// ---- a plain delivery over arbitrary parts ------------------------------------------------------

interface Parts {
  subject: string;
  headers: Array<[string, string]>;
  data: Uint8Array;
}

function delivery(p: Parts): Delivery & { settlements: number } {
  let settled = false;
  const d = {
    settlements: 0,
    subject: p.subject,
    data: p.data,
    // First value wins, case-insensitively (as JsDelivery.header does).
    header: (name: string) => p.headers.find(([k]) => k.toLowerCase() === name.toLowerCase())?.[1],
    headerEntries: () => p.headers.map(([k, v]): [string, string] => [k, v]),
    seq: 1,
    deliveryCount: 1,
    storedAtMs: 1,
    pulledAtMs: 2,
    get settled() {
      return settled;
    },
    ack: () => settle(),
    nak: () => settle(),
    term: () => settle(),
    working: () => undefined,
  };
  const settle = (): void => {
    settled = true;
    d.settlements++;
  };
  return d;
}

// ---- arbitraries ------------------------------------------------------------------------------

const hostileString = fc.oneof(
  fc.string({ maxLength: 40 }),
  fc.string({ unit: "grapheme", maxLength: 40 }),
  fc.string({ unit: "binary", maxLength: 40 }),
  fc.constantFrom("", " ", "\r\n", "a\r\nNats-Msg-Id: evil", "x\ny", "\u0000", "\u2028", "..", ".", "*", ">", "ａ", "😀", "%00", "'\"`;"),
  fc.nat({ max: 300_000 }).map((n) => "y".repeat(n)),
);

const validId = fc.stringMatching(/^[A-Za-z0-9_-]{1,128}$/);
const token = fc.stringMatching(/^[a-z0-9_-]{1,64}$/);

const subject = fc.oneof(
  { weight: 4, arbitrary: fc.tuple(fc.constantFrom(...PRIORITIES), token, token).map(([p, t, m]) => `infer.req.${p}.${t}.${m}`) },
  { weight: 1, arbitrary: fc.tuple(hostileString, hostileString, hostileString).map(([p, t, m]) => `infer.req.${p}.${t}.${m}`) },
  { weight: 1, arbitrary: fc.array(hostileString, { maxLength: 8 }).map((ts) => ts.join(".")) },
  { weight: 1, arbitrary: fc.constantFrom("infer.req.normal.acme", "infer.req.normal.acme.echo.extra", "infer.res.acme.x", "infer.req..acme.echo", "infer.req.NORMAL.acme.echo", "infer.req.normal.ACME.echo") },
);

const idHeader = fc.oneof({ weight: 4, arbitrary: validId }, { weight: 2, arbitrary: hostileString });

const deadline = fc.oneof(
  fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }).map(String),
  fc.constantFrom("0", "-1", "1e3", "9007199254740993", "1".repeat(400), "NaN", "Infinity", "0x10", " 5", "5 ", "١٢٣"),
  hostileString,
);

const contentType = fc.oneof(
  fc.constantFrom("application/json", "application/x-protobuf", "APPLICATION/JSON; charset=utf-8", 'application/json;charset="utf-8"', "text/plain", "application/json; charset=latin1", "application/x-protobuf; proto=x"),
  hostileString,
);

/** Header name: mostly the protocol's, in any case, sometimes anything. */
const headerName = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom("Nats-Msg-Id", "nats-msg-id", "Content-Type", "Infer-Version", "Infer-Deadline", "Infer-Stream", "traceparent", "tracestate", "Infer-Status") },
  { weight: 1, arbitrary: hostileString },
);

const headerList = fc
  .tuple(
    fc.option(idHeader, { nil: undefined }),
    fc.option(contentType, { nil: undefined }),
    fc.option(fc.oneof(fc.constantFrom("v1", "v2.1-rc_3"), hostileString), { nil: undefined }),
    fc.option(deadline, { nil: undefined }),
    fc.option(fc.oneof(fc.constantFrom("0", "1", "true", "01"), hostileString), { nil: undefined }),
    fc.array(fc.tuple(headerName, hostileString), { maxLength: 6 }),
  )
  .map(([id, ct, version, dl, stream, more]) => {
    const h: Array<[string, string]> = [];
    if (id !== undefined) h.push(["Nats-Msg-Id", id]);
    if (ct !== undefined) h.push(["Content-Type", ct]);
    if (version !== undefined) h.push(["Infer-Version", version]);
    if (dl !== undefined) h.push(["Infer-Deadline", dl]);
    if (stream !== undefined) h.push(["Infer-Stream", stream]);
    return [...h, ...more];
  });

const absurdNumber = fc.oneof(
  fc.double(),
  fc.integer(),
  fc.constantFrom(0, -0, 1, -1, 1e308, -1e308, Number.MAX_SAFE_INTEGER + 2, 2 ** 53, 1e-320, 0.5, 1_000_001),
);
const absurdValue = fc.oneof(absurdNumber, fc.string({ maxLength: 20 }), fc.boolean(), fc.constant(null), fc.array(fc.integer(), { maxLength: 3 }), fc.object({ maxDepth: 1 }));

const parameters = fc.oneof(
  fc.record(
    { max_tokens: absurdValue, temperature: absurdValue, top_p: absurdValue, simulate_error: fc.constantFrom("INTERNAL", "nope"), __proto__: absurdValue, constructor: absurdValue },
    { requiredKeys: [] },
  ),
  absurdValue,
  fc.dictionary(hostileString, fc.jsonValue({ maxDepth: 2 }), { maxKeys: 5 }),
);

/** JSON bodies: right shape with wrong types, extra fields, arbitrary JSON, deep nesting. */
const jsonBody = fc.oneof(
  fc.record(
    { prompt: fc.oneof(hostileString, absurdValue), inputs: fc.oneof(fc.jsonValue({ maxDepth: 3 }), fc.constant(null)), parameters, id: hostileString, tenant: hostileString, extra: absurdValue },
    { requiredKeys: [] },
  ).map((o) => enc.encode(JSON.stringify(o))),
  fc.jsonValue({ maxDepth: 4 }).map((v) => enc.encode(JSON.stringify(v) ?? "null")),
  fc.nat({ max: 20_000 }).map((n) => enc.encode(`${"[".repeat(n)}${"]".repeat(n)}`)),
  fc.nat({ max: 20_000 }).map((n) => enc.encode(`{"inputs":${'{"a":'.repeat(n)}1${"}".repeat(n)}}`)),
  // Nesting within the limit the workers carry (a job), and plain valid bodies.
  fc.nat({ max: 60 }).map((n) => enc.encode(`{"inputs":${'{"a":'.repeat(n)}1${"}".repeat(n)}}`)),
  fc.record({ prompt: fc.string({ maxLength: 40 }) }).map((o) => enc.encode(JSON.stringify(o))),
  fc.constantFrom('{"prompt":"a","prompt":5}', '{"__proto__":{"prompt":"x"}}', '{"prompt":"\\ud800"}', "{", "", "null", "[]", '"prompt"', "1e999", '{"inputs":1e999}').map((s) => enc.encode(s)),
);

/** Bytes that are not UTF-8 (lone continuation bytes, overlongs, surrogates, truncated sequences). */
const invalidUtf8 = fc
  .tuple(fc.uint8Array({ maxLength: 64 }), fc.constantFrom([0x80], [0xc0, 0xaf], [0xed, 0xa0, 0x80], [0xf4, 0x90, 0x80, 0x80], [0xe2, 0x82], [0xff, 0xfe]))
  .map(([prefix, bad]) => Uint8Array.from([...enc.encode('{"prompt":"'), ...prefix, ...bad, ...enc.encode('"}')]));

// (`infer` is a TypeScript keyword in type position, so the message type is taken from encode.)
type ProtoRequest = Parameters<typeof infer.v1.InferRequest.encode>[0];

const protobufBody = fc
  .record(
    {
      id: fc.string({ maxLength: 10 }),
      prompt: fc.string({ maxLength: 40 }),
      tenant: fc.string({ maxLength: 10 }),
      deadline_unix_ms: fc.oneof(fc.integer(), fc.constantFrom(-1, 0, Number.MAX_SAFE_INTEGER)),
      inputs: fc.oneof(fc.constant({ numberValue: Number.NaN }), fc.constant({ numberValue: Number.POSITIVE_INFINITY }), fc.constant({ stringValue: "in" }), fc.constant({})),
      parameters: fc.constant({ fields: { max_tokens: { numberValue: 1e12 }, temperature: { stringValue: "hot" } } }),
    },
    { requiredKeys: [] },
  )
  .map((r) => infer.v1.InferRequest.encode(r as ProtoRequest).finish());

const body = fc.oneof(
  { weight: 4, arbitrary: jsonBody },
  { weight: 1, arbitrary: invalidUtf8 },
  { weight: 2, arbitrary: fc.uint8Array({ maxLength: 2_048 }) },
  { weight: 1, arbitrary: protobufBody },
  // Huge: just over and far over the default limit (256 KiB).
  { weight: 1, arbitrary: fc.constantFrom(262_145, 1_048_576).map((n) => new Uint8Array(n).fill(0x20)) },
);

const parts: fc.Arbitrary<Parts> = fc.record({ subject, headers: headerList, data: body });

const options: fc.Arbitrary<DecodeOptions> = fc.record(
  { maxPayloadBytes: fc.integer({ min: 1, max: 1_048_576 }), maxPromptChars: fc.integer({ min: 0, max: 100 }), maxTokensLimit: fc.integer({ min: 1, max: 10 }) },
  { requiredKeys: [] },
);

// ---- what every answer must satisfy -------------------------------------------------------------

interface SubjectParts {
  priority: string;
  tenant: string;
  model: string;
}

function validSubject(s: string): SubjectParts | undefined {
  const t = s.split(".");
  if (t.length !== 5 || t[0] !== "infer" || t[1] !== "req") return undefined;
  const [, , priority = "", tenant = "", model = ""] = t;
  if (!PRIORITIES.includes(priority) || !NAME_RE.test(tenant) || !NAME_RE.test(model)) return undefined;
  return { priority, tenant, model };
}

function firstHeader(p: Parts, name: string): string | undefined {
  return p.headers.find(([k]) => k.toLowerCase() === name.toLowerCase())?.[1];
}

/** Checks one answer against the contract; returns its kind. */
function checkDecoded(p: Parts, d: Delivery, out: Decoded): "job" | "result" | "dead" {
  expect(out).to.be.an("object");
  const subj = validSubject(p.subject);
  const id = firstHeader(p, "Nats-Msg-Id");
  const usable = subj !== undefined && id !== undefined && ID_RE.test(id);
  if (out.ok) {
    expect(out).to.not.have.property("outcome");
    const job = out.job;
    expect(usable, "a job only for a usable subject and id").to.equal(true);
    expect(job.id).to.equal(id);
    expect(job.tenant).to.equal(subj!.tenant);
    expect(job.model).to.equal(subj!.model);
    expect(job.priority).to.equal(subj!.priority);
    expect(job.delivery).to.equal(d);
    expect(job.prompt !== undefined || job.inputs !== undefined, "a job has a prompt or inputs").to.equal(true);
    if (job.prompt !== undefined) expect(job.prompt).to.be.a("string");
    if (job.parameters !== undefined) expect(job.parameters).to.be.an("object").and.not.be.an("array");
    if (job.deadlineMs !== undefined) expect(Number.isSafeInteger(job.deadlineMs) && job.deadlineMs > 0).to.equal(true);
    return "job";
  }
  expect(out).to.not.have.property("job");
  const o = out.outcome;
  if (o.kind === "result") {
    expect(usable, "an error result only for a usable subject and id").to.equal(true);
    expect(o.job.id).to.equal(id);
    expect(o.job.tenant).to.equal(subj!.tenant);
    expect(o.result.id).to.equal(id);
    expect(o.result.status).to.equal("error");
    expect(o.result.error?.code).to.equal("INVALID_ARGUMENT");
    expect(o.result.error!.message.length).to.be.at.most(MAX_MESSAGE_CHARS);
    // The result is publishable: it serialises.
    expect(JSON.stringify(o.result).length).to.be.at.most(MAX_MESSAGE_CHARS * 2);
    return "result";
  }
  expect(o.kind).to.equal("dead");
  if (o.kind !== "dead") throw new Error("unreachable");
  expect(usable, "a dead letter only without a usable subject or id").to.equal(false);
  expect(o.delivery).to.equal(d);
  expect(o.error.code).to.equal("INVALID_ARGUMENT");
  expect(o.error.message.length).to.be.at.most(MAX_MESSAGE_CHARS);
  if (o.tenant !== undefined) expect(o.tenant).to.match(NAME_RE);
  if (o.model !== undefined) expect(o.model).to.match(NAME_RE);
  if (o.id !== undefined) expect(o.id).to.match(ID_RE);
  return "dead";
}

describe("fuzz: decodeDelivery", function () {
  this.timeout(30_000);

  it("never throws, yields exactly one job, error result or dead letter, and the kind follows from subject and id", () => {
    const kinds = { job: 0, result: 0, dead: 0 };
    checkProperty(
      fc.property(parts, options, (p, opts) => {
        const d = delivery(p);
        const out = decodeDelivery(d, opts);
        kinds[checkDecoded(p, d, out)]++;
        // Decoding is pure: it settles nothing and gives the same answer twice.
        expect(d.settlements).to.equal(0);
        const again = decodeDelivery(d, opts);
        expect(again.ok).to.equal(out.ok);
        if (!again.ok && !out.ok) expect(again.outcome.kind).to.equal(out.outcome.kind);
      }),
      { seed: SEED, numRuns: 1_500 },
    );
    // The generators reach every kind of answer.
    expect(kinds.job, JSON.stringify(kinds)).to.be.greaterThan(0);
    expect(kinds.result, JSON.stringify(kinds)).to.be.greaterThan(0);
    expect(kinds.dead, JSON.stringify(kinds)).to.be.greaterThan(0);
  });

  it("accepts every well-formed request, whatever its prompt and valid parameters", () => {
    checkProperty(
      fc.property(
        fc.constantFrom(...PRIORITIES),
        token,
        token,
        validId,
        fc.string({ unit: "grapheme", maxLength: 200 }).filter((s) => s.length > 0),
        fc.record({ max_tokens: fc.integer({ min: 1, max: 1_000_000 }), temperature: fc.double({ min: 0, max: 2, noNaN: true }), top_p: fc.double({ min: 0.001, max: 1, noNaN: true }) }, { requiredKeys: [] }),
        (pr, tenant, model, id, prompt, params) => {
          const p: Parts = {
            subject: `infer.req.${pr}.${tenant}.${model}`,
            headers: [["Nats-Msg-Id", id], ["Content-Type", "application/json"]],
            data: enc.encode(JSON.stringify({ prompt, parameters: params })),
          };
          const out = decodeDelivery(delivery(p));
          if (!out.ok) expect.fail(`rejected a valid request: ${JSON.stringify(out.outcome.kind === "dead" ? out.outcome.error : out.outcome.kind === "result" ? out.outcome.result.error : out.outcome.kind)}`);
          expect(out.job.prompt).to.equal(prompt);
          expect(out.job.parameters).to.deep.equal(params);
        },
      ),
      { seed: SEED + 1, numRuns: 400 },
    );
  });

  it("a header value with CR/LF never becomes a header of the job: ids, versions and deadlines with line breaks are refused", () => {
    checkProperty(
      fc.property(fc.constantFrom("Nats-Msg-Id", "Infer-Version", "Infer-Deadline", "Infer-Stream"), fc.constantFrom("\r\n", "\n", "\r"), validId, (name, br, id) => {
        const injected = `${name === "Infer-Deadline" ? "1" : "v1"}${br}Nats-Msg-Id: evil`;
        const headers: Array<[string, string]> = name === "Nats-Msg-Id" ? [[name, `${id}${br}X: y`]] : [["Nats-Msg-Id", id], [name, injected]];
        const p: Parts = { subject: "infer.req.normal.acme.echo", headers, data: enc.encode('{"prompt":"x"}') };
        const out = decodeDelivery(delivery(p));
        expect(out.ok).to.equal(false);
        if (!out.ok && out.outcome.kind === "result") expect(out.outcome.result.error?.code).to.equal("INVALID_ARGUMENT");
        if (!out.ok && out.outcome.kind === "dead") expect(name).to.equal("Nats-Msg-Id");
      }),
      { seed: SEED + 2, numRuns: 100 },
    );
  });

  // A body within the size limit can nest `inputs` or `parameters` thousands of levels deep
  // (5 bytes a level: 50,000 levels fit in 256 KiB). decodeDelivery accepts it as a job; what
  // comes after cannot carry it: proto/json.ts refuses more than MAX_JSON_DEPTH levels and
  // JSON.stringify overflows the stack at about 5,000. It should be an INVALID_ARGUMENT result.
  it("refuses inputs and parameters nested deeper than the worker protocol carries", () => {
    checkProperty(
      fc.property(fc.integer({ min: MAX_JSON_DEPTH + 1, max: 20_000 }), fc.constantFrom("inputs", "parameters"), (depth, field) => {
        const nested = `${'{"a":'.repeat(depth)}1${"}".repeat(depth)}`;
        const p: Parts = {
          subject: "infer.req.normal.acme.echo",
          headers: [["Nats-Msg-Id", "deep-1"]],
          data: enc.encode(field === "inputs" ? `{"inputs":${nested}}` : `{"prompt":"x","parameters":${nested}}`),
        };
        const out = decodeDelivery(delivery(p));
        expect(out.ok, `a ${depth}-level ${field} was accepted as a job`).to.equal(false);
      }),
      { seed: SEED + 4, numRuns: 50 },
    );
  });

  it("decodes through the real JsDelivery over raw header bytes without throwing (malformed header blocks included)", () => {
    const rawHeaderBlock = fc.oneof(
      fc.array(fc.tuple(headerName, hostileString), { maxLength: 5 }).map((hs) => `NATS/1.0\r\n${hs.map(([k, v]) => `${k}: ${v}`).join("\r\n")}\r\n\r\n`),
      fc.constantFrom(
        "NATS/1.0\r\nNats-Msg-Id: ok-1\r\n\r\n",
        "NATS/1.0\r\nBad Key: v\r\nNats-Msg-Id: ok-2\r\n\r\n",
        "NATS/1.0\r\nNats-Msg-Id: a\nb\r\n\r\n",
        "NATS/1.0 503\r\n\r\n",
        "garbage",
        "NATS/1.0\r\nNats-Msg-Id: ok-3\r\nKey\u00e9: v\r\n\r\n",
      ),
    );
    checkProperty(
      fc.property(subject, rawHeaderBlock, body, (subj, raw, data) => {
        let decodedHeaders: MsgHdrsImpl | undefined;
        const msg = {
          subject: subj,
          data,
          seq: 1,
          get headers() {
            decodedHeaders ??= MsgHdrsImpl.decode(enc.encode(raw));
            return decodedHeaders;
          },
          info: { deliveryCount: 1, timestampNanos: 1_000_000 },
          ack: () => undefined,
          nak: () => undefined,
          term: () => undefined,
          working: () => undefined,
        };
        const out = decodeDelivery(new JsDelivery(msg as unknown as JsMsg));
        expect(typeof out.ok).to.equal("boolean");
        if (out.ok) expect(out.job.id).to.match(ID_RE);
      }),
      { seed: SEED + 3, numRuns: 400 },
    );
  });
});
