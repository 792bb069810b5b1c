import { map, type OperatorFunction } from "rxjs";
import { infer, type google } from "../proto/gen/inference.js";
import { errorResult, type Delivery, type ErrorInfo, type InferJob, type Outcome } from "./types.js";
import { PRIORITIES, type ErrorCode, type Priority, TOKEN_RE, ID_RE, VERSION_RE, DEADLINE_RE, DEFAULT_MAX_PAYLOAD_BYTES, INFER_SESSION_RE as SESSION_RE, H } from "../proto/wire.js";

/** Largest `parameters.max_tokens` accepted by default. */
export const DEFAULT_MAX_TOKENS_LIMIT = 1_000_000;

/** Limits applied while decoding; every one is optional. */
export interface DecodeOptions {
  /** Largest body in bytes (default {@link DEFAULT_MAX_PAYLOAD_BYTES}). */
  readonly maxPayloadBytes?: number;
  /** Longest `prompt` in characters (Unicode code points); no limit when absent. */
  readonly maxPromptChars?: number;
  /** Largest `parameters.max_tokens` (default {@link DEFAULT_MAX_TOKENS_LIMIT}). */
  readonly maxTokensLimit?: number;
}

/** A valid job, or what to do instead with a delivery that is not one. */
export type Decoded = { readonly ok: true; readonly job: InferJob } | { readonly ok: false; readonly outcome: Outcome };

const JSON_CONTENT_TYPE_RE = /^application\/json\s*(?:;\s*charset\s*=\s*(?:utf-8|"utf-8")\s*)?$/i;
const PROTOBUF_CONTENT_TYPE_RE = /^application\/x-protobuf\s*$/i;
const BODY_FIELDS: readonly string[] = ["prompt", "inputs", "parameters"];
/** Longest value quoted back in an error message, so a hostile value cannot bloat a result. */
const QUOTE_MAX = 80;

const INVALID = "INVALID_ARGUMENT";

/** Mutable draft of a job, filled in as far as the delivery allows. */
type Draft = { -readonly [K in keyof InferJob]: InferJob[K] };

/** A rejected request; thrown only inside this module and always caught. */
class RequestRejected extends Error {
  override readonly name = "RequestRejected";
  constructor(
    message: string,
    readonly code: ErrorCode = INVALID,
  ) {
    super(message);
  }
}

/**
 * Decodes and validates one delivery (docs/protocol.md, "A request"). Never throws: a delivery
 * without a usable id or tenant, or on a subject that is not a request subject, becomes a `dead`
 * outcome; any other problem becomes an INVALID_ARGUMENT `result` for the job as far as it could
 * be built.
 */
export function decodeDelivery(d: Delivery, opts: DecodeOptions = {}): Decoded {
  const partial: { tenant?: string; model?: string; id?: string } = {};
  let draft: Draft | undefined;
  try {
    const subject = parseSubject(d.subject, partial);
    const rawId = d.header("Nats-Msg-Id");
    if (rawId !== undefined && ID_RE.test(rawId)) partial.id = rawId;
    if (typeof subject === "string") return dead(d, partial, subject);
    if (partial.id === undefined) {
      const why = rawId === undefined ? "missing" : `${quote(rawId)} does not match ${ID_RE.source}`;
      return dead(d, partial, `header Nats-Msg-Id is ${why}`);
    }

    draft = { id: partial.id, tenant: subject.tenant, model: subject.model, priority: subject.priority, stream: false, delivery: d };
    const traceparent = d.header("traceparent");
    if (traceparent !== undefined) draft.traceparent = traceparent;
    const tracestate = d.header("tracestate");
    if (tracestate !== undefined) draft.tracestate = tracestate;

    readHeaders(d, draft);
    readBody(d, draft, opts);
    return { ok: true, job: draft };
  } catch (err) {
    if (draft !== undefined) {
      const message = err instanceof RequestRejected ? err.message : `request could not be decoded: ${describe(err)}`;
      const code = err instanceof RequestRejected ? err.code : INVALID;
      return { ok: false, outcome: { kind: "result", job: draft, result: errorResult(draft, code, message) } };
    }
    return dead(d, partial, `request could not be decoded: ${describe(err)}`);
  }
}

/**
 * Decodes each delivery into a job, or into the outcome that settles it when it is not a valid
 * request. Never errors on bad input; only the source's own error is forwarded.
 *
 * ```
 * source:          -a---b---c--|
 * decodeRequest(): -A---B---C--|   A = { ok: true, job }, B = { ok: false, outcome }, ...
 * ```
 *
 * @example
 * const decoded$ = deliveries$.pipe(decodeRequest({ maxPayloadBytes: 64 * 1024 }), share());
 * const jobs$ = decoded$.pipe(filter((d) => d.ok), map((d) => d.job));
 * const rejected$ = decoded$.pipe(filter((d) => !d.ok), map((d) => d.outcome));
 */
export function decodeRequest(opts: DecodeOptions = {}): OperatorFunction<Delivery, Decoded> {
  return map((d) => decodeDelivery(d, opts));
}

// ---- subject and headers ------------------------------------------------------------------

interface RequestSubject {
  readonly priority: Priority;
  readonly tenant: string;
  readonly model: string;
}

/** The parts of `infer.req.<priority>.<tenant>.<model>`, or why it is not one. */
function parseSubject(subject: string, partial: { tenant?: string; model?: string }): RequestSubject | string {
  const tokens = subject.split(".");
  if (tokens.length !== 5 || tokens[0] !== "infer" || tokens[1] !== "req") {
    return `subject ${quote(subject)} is not infer.req.<priority>.<tenant>.<model>`;
  }
  const [, , priority = "", tenant = "", model = ""] = tokens;
  if (TOKEN_RE.test(tenant)) partial.tenant = tenant;
  if (TOKEN_RE.test(model)) partial.model = model;
  if (!(PRIORITIES as readonly string[]).includes(priority)) {
    return `priority ${quote(priority)} in subject is not one of ${PRIORITIES.join(", ")}`;
  }
  if (partial.tenant === undefined) return `tenant ${quote(tenant)} in subject does not match ${TOKEN_RE.source}`;
  if (partial.model === undefined) return `model ${quote(model)} in subject does not match ${TOKEN_RE.source}`;
  return { priority: priority as Priority, tenant, model };
}

function readHeaders(d: Delivery, draft: Draft): void {
  const version = d.header("Infer-Version");
  if (version !== undefined) {
    if (!VERSION_RE.test(version)) reject(`header Infer-Version ${quote(version)} does not match ${VERSION_RE.source}`);
    draft.pinnedVersion = version;
  }
  const deadline = d.header("Infer-Deadline");
  if (deadline !== undefined) {
    const ms = Number(deadline);
    if (!DEADLINE_RE.test(deadline) || !Number.isSafeInteger(ms)) {
      reject(`header Infer-Deadline ${quote(deadline)} is not a positive integer of Unix epoch milliseconds`);
    }
    draft.deadlineMs = ms;
  }
  const session = d.header(H.inferSession);
  if (session !== undefined) {
    if (!SESSION_RE.test(session)) reject(`header Infer-Session ${quote(session)} does not match ${SESSION_RE.source}`);
    draft.session = session;
  }
  const stream = d.header("Infer-Stream");
  if (stream !== undefined) {
    if (stream !== "0" && stream !== "1") reject(`header Infer-Stream ${quote(stream)} is not "0" or "1"`);
    draft.stream = stream === "1";
  }
}

// ---- body ---------------------------------------------------------------------------------

function readBody(d: Delivery, draft: Draft, opts: DecodeOptions): void {
  if (d.bodyError !== undefined) throw new RequestRejected(d.bodyError.message, d.bodyError.code);
  const maxBytes = opts.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES;
  // A body read from the object store was checked against its own limit there.
  if (d.wireData === undefined && d.data.byteLength > maxBytes) reject(`body of ${d.data.byteLength} bytes is over the limit of ${maxBytes} bytes`);

  const contentType = d.header("Content-Type");
  let body: RequestBody;
  if (contentType === undefined || JSON_CONTENT_TYPE_RE.test(contentType)) {
    body = parseJsonBody(d.data);
  } else if (PROTOBUF_CONTENT_TYPE_RE.test(contentType)) {
    body = parseProtobufBody(d.data, draft);
  } else {
    reject(`header Content-Type ${quote(contentType)} is not application/json or application/x-protobuf`);
  }

  if (body.prompt !== undefined) draft.prompt = body.prompt;
  if (body.inputs !== undefined) draft.inputs = body.inputs;
  if (body.parameters !== undefined) draft.parameters = body.parameters;

  if (body.prompt === undefined && body.inputs === undefined) reject(`body has neither "prompt" nor "inputs"`);
  if (body.prompt !== undefined && opts.maxPromptChars !== undefined) {
    const chars = codePoints(body.prompt, opts.maxPromptChars);
    if (chars > opts.maxPromptChars) reject(`"prompt" is over the limit of ${opts.maxPromptChars} characters`);
  }
  if (body.parameters !== undefined) {
    checkParameters(body.parameters, opts.maxTokensLimit ?? DEFAULT_MAX_TOKENS_LIMIT);
  }
}

interface RequestBody {
  prompt?: string;
  inputs?: unknown;
  parameters?: Record<string, unknown>;
}

/** Deepest nesting of JSON values a request may carry (what the gRPC mapping of JSON allows). */
const MAX_BODY_DEPTH = 64;

/** True when `v` nests more than `limit` levels of arrays/objects (iterative: no stack overflow). */
function depthOver(v: unknown, limit: number): boolean {
  const stack: Array<[unknown, number]> = [[v, 1]];
  while (stack.length > 0) {
    const [x, d] = stack.pop()!;
    if (typeof x !== "object" || x === null) continue;
    if (d > limit) return true;
    for (const child of Array.isArray(x) ? x : Object.values(x as Record<string, unknown>)) {
      if (typeof child === "object" && child !== null) stack.push([child, d + 1]);
    }
  }
  return false;
}

function parseJsonBody(data: Uint8Array): RequestBody {
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(data);
  } catch {
    reject("body is not valid UTF-8");
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    reject(`body is not valid JSON: ${describe(err)}`);
  }
  if (!isPlainObject(parsed)) reject(`body must be a JSON object, got ${typeName(parsed)}`);
  // Workers take JSON values nested at most MAX_BODY_DEPTH deep; deeper would fail the batch.
  if (depthOver(parsed, MAX_BODY_DEPTH)) reject(`body is nested deeper than ${MAX_BODY_DEPTH} levels`);

  const unknown = Object.keys(parsed).filter((k) => !BODY_FIELDS.includes(k));
  if (unknown.length > 0) {
    const fromSubject = unknown.includes("tenant") ? "; the tenant comes from the subject" : "";
    const fromHeader = unknown.includes("id") ? "; the id comes from header Nats-Msg-Id" : "";
    reject(
      `unknown field(s) ${unknown.slice(0, 5).map(quote).join(", ")} in body (allowed: ${BODY_FIELDS.join(", ")})` +
        fromSubject +
        fromHeader,
    );
  }

  const body: RequestBody = {};
  if ("prompt" in parsed) {
    const prompt = parsed["prompt"];
    if (typeof prompt !== "string") reject(`"prompt" must be a string, got ${typeName(prompt)}`);
    body.prompt = prompt;
  }
  // A null `inputs` carries nothing, so it counts as absent.
  if (parsed["inputs"] !== undefined && parsed["inputs"] !== null) body.inputs = parsed["inputs"];
  if ("parameters" in parsed) {
    const parameters = parsed["parameters"];
    if (!isPlainObject(parameters)) reject(`"parameters" must be an object, got ${typeName(parameters)}`);
    body.parameters = parameters;
  }
  return body;
}

function parseProtobufBody(data: Uint8Array, draft: Draft): RequestBody {
  // (`infer` is a TypeScript keyword in type position, so the message type is inferred, not named.)
  const msg = decodeProtobuf(data);
  if (msg.tenant !== "") reject(`field "tenant" is not allowed in the body; the tenant comes from the subject`);
  if (msg.id !== "") reject(`field "id" is not allowed in the body; the id comes from header Nats-Msg-Id`);

  const deadline = int64ToNumber(msg.deadline_unix_ms);
  if (deadline !== 0) {
    if (!Number.isSafeInteger(deadline) || deadline < 0) {
      reject(`field "deadline_unix_ms" ${String(msg.deadline_unix_ms)} is not a positive integer of Unix epoch milliseconds`);
    }
    // The header is the protocol's way to set a deadline; the field only fills in when it is absent.
    if (draft.deadlineMs === undefined) draft.deadlineMs = deadline;
  }

  const body: RequestBody = {};
  // proto3 cannot tell an empty prompt from none; an empty one counts as absent.
  if (msg.prompt !== "") body.prompt = msg.prompt;
  if (msg.inputs != null) {
    const inputs = valueToJson(msg.inputs, "inputs");
    if (inputs !== null) body.inputs = inputs;
  }
  if (msg.parameters != null) body.parameters = structToJson(msg.parameters, "parameters");
  return body;
}

function decodeProtobuf(data: Uint8Array) {
  try {
    return infer.v1.InferRequest.decode(data);
  } catch (err) {
    reject(`body is not a valid protobuf InferRequest: ${describe(err)}`);
  }
}

function checkParameters(p: Record<string, unknown>, maxTokensLimit: number): void {
  if ("max_tokens" in p) {
    const v = p["max_tokens"];
    if (typeof v !== "number" || !Number.isInteger(v) || v < 1 || v > maxTokensLimit) {
      reject(`"parameters.max_tokens" ${show(v)} is not an integer in 1..${maxTokensLimit}`);
    }
  }
  if ("temperature" in p) {
    const v = p["temperature"];
    if (typeof v !== "number" || !Number.isFinite(v) || v < 0) {
      reject(`"parameters.temperature" ${show(v)} is not a finite number >= 0`);
    }
  }
  if ("top_p" in p) {
    const v = p["top_p"];
    if (typeof v !== "number" || !(v > 0 && v <= 1)) reject(`"parameters.top_p" ${show(v)} is not a number in (0, 1]`);
  }
}

// ---- google.protobuf.Struct/Value -> plain JSON --------------------------------------------

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

function valueToJson(v: google.protobuf.IValue, path: string): Json {
  if (v.nullValue != null) return null;
  if (v.numberValue != null) {
    if (!Number.isFinite(v.numberValue)) reject(`"${path}" holds ${v.numberValue}, which JSON cannot carry`);
    return v.numberValue;
  }
  if (v.stringValue != null) return v.stringValue;
  if (v.boolValue != null) return v.boolValue;
  if (v.structValue != null) return structToJson(v.structValue, path);
  if (v.listValue != null) return (v.listValue.values ?? []).map((item, i) => valueToJson(item, `${path}[${i}]`));
  // A Value with no kind set is the proto way to say nothing.
  return null;
}

function structToJson(s: google.protobuf.IStruct, path: string): { [key: string]: Json } {
  const fields = s.fields ?? {};
  // fromEntries defines own properties, so a "__proto__" key stays a plain key.
  return Object.fromEntries(Object.keys(fields).map((k) => [k, valueToJson(fields[k] ?? {}, `${path}.${k}`)]));
}

/** The generated code reads int64 as a number; a Long (protobufjs without --force-number) prints as its decimal. */
function int64ToNumber(v: unknown): number {
  if (typeof v === "number") return v;
  if (v == null) return 0;
  if (typeof v === "object" && "toString" in v && typeof v.toString === "function") return Number((v as { toString(): string }).toString());
  return Number.NaN;
}

// ---- helpers ------------------------------------------------------------------------------

function reject(message: string): never {
  throw new RequestRejected(message);
}

function dead(d: Delivery, partial: { tenant?: string; model?: string; id?: string }, message: string): Decoded {
  const error: ErrorInfo = { code: INVALID, message };
  return { ok: false, outcome: { kind: "dead", delivery: d, ...partial, error } };
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function typeName(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "array";
  return typeof v;
}

/** Counts code points, stopping early once past `limit`. */
function codePoints(s: string, limit: number): number {
  if (s.length <= limit) return s.length;
  let n = 0;
  for (const _ of s) {
    if (++n > limit) break;
  }
  return n;
}

function quote(s: string): string {
  return JSON.stringify(s.length > QUOTE_MAX ? `${s.slice(0, QUOTE_MAX)}…` : s);
}

function show(v: unknown): string {
  if (typeof v === "string") return quote(v);
  if (typeof v === "number" || typeof v === "boolean" || v === null || v === undefined) return String(v);
  return typeName(v);
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
