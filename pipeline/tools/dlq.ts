/**
 * The dead-letter queue `INFER_DLQ` (docs/protocol.md: `infer.dlq.<tenant>.<model>`): list what is
 * in it, show one entry, and put entries back into `INFER_REQ` once what failed them is fixed.
 *
 * A dead letter is the request as it came (body and headers) plus the DLQ's own headers:
 * `Infer-Error-Code`, `Infer-Error-Reason`, `Infer-Original-Subject`, `Infer-Request-Id`,
 * `Infer-Deliveries`, `Infer-Original-Seq` (see `result-sink.ts`).
 *
 * **Requeueing keeps the request id.** The id is the idempotency key and the client waits for
 * its answer on `infer.res.<tenant>.<id>` (docs/protocol.md), so a requeued request is published
 * again with its own id as `Nats-Msg-Id` (a fresh id would be a different request, answered
 * where nobody looks). Two duplicate windows decide when that works:
 * - `INFER_REQ` drops a publish whose id it saw within its duplicate window (2 min by default)
 *   of the first publish; JetStream acknowledges it as a duplicate and stores nothing.
 * - `INFER_RES` drops a result whose id it saw within its own window: a request that was
 *   answered with its final error moments ago would run again, and its new result be dropped.
 * An entry inside either window is therefore not requeued yet: it stays in the DLQ, is counted
 * under `duplicates` and its item says why and from when a requeue will work. Outside both,
 * the new result replaces the stored error (`INFER_RES` keeps one result per id). An entry
 * leaves the DLQ only after `INFER_REQ` acknowledged the new copy.
 *
 * Not requeued at all (`skipped`): entries without a usable request id or request subject
 * (they would be dead-lettered again: fix and publish such a request anew), and requests whose
 * stored result is already `ok`.
 *
 * ```ts
 * const entries = await listDeadLetters(nc, { model: "llama3-8b", code: "UNAVAILABLE" });
 * const report = await requeueDeadLetters(nc, { model: "llama3-8b" });
 * console.log(report.requeued, report.duplicates, report.items.filter((i) => i.action !== "requeued"));
 * ```
 */
import { type MsgHdrs, type NatsConnection } from "@nats-io/transport-node";
import { DeliverPolicy, jetstream, jetstreamManager, type JetStreamClient, type JetStreamManager, type StoredMsg } from "@nats-io/jetstream";
import { ERROR_CODES, STREAM_DLQ, H, ID_RE, subjects, TOKEN_RE } from "../../proto/wire.js";
import { headerValue } from "../support/headers.js";
import { isJsApiError, JsApiCode } from "../support/jetstream-errors.js";
import { CodedError } from "../../proto/coded-error.js";


/** Headers the DLQ adds to a request; never copied back when requeueing. */
const DLQ_HEADERS = {
  errorCode: H.errorCode,
  errorReason: H.errorReason,
  originalSubject: H.originalSubject,
  deliveries: H.deliveries,
  requestId: H.requestId,
  originalSeq: H.originalSeq,
} as const;

export const DLQ_HEADER_SET = new Set(Object.values(DLQ_HEADERS).map((h) => h.toLowerCase()));
/** Messages asked for per pull of the ordered consumer. */
const FETCH_BATCH = 256;
/** How long a pull waits when nothing (more) matches. */
const FETCH_EXPIRES_MS = 1_000;
/** The server drops a listing's consumer idle this long (one the process abandoned). */
const CONSUMER_INACTIVE_MS = 60_000;

/** A DLQ operation that cannot run: `code` is docs/protocol.md's. */
export class DlqError extends CodedError<"INVALID_ARGUMENT" | "NOT_FOUND"> {
  override readonly name = "DlqError";
}

/** A connection, or JetStream handles made from one. */
export type DlqTarget = NatsConnection | { readonly js: JetStreamClient; readonly jsm: JetStreamManager };

export interface DeadLetterFilter {
  tenant?: string;
  model?: string;
  /** Error code, e.g. `UNAVAILABLE`. */
  code?: string;
  /** At most this many entries (the oldest first). */
  limit?: number;
}

/** One dead letter, as listed. */
export interface DeadLetterEntry {
  /** Sequence in `INFER_DLQ` (what `show` and `requeue --seq` take). */
  seq: number;
  /** When it was dead-lettered. */
  time: Date;
  /** `infer.dlq.<tenant>.<model>` */
  subject: string;
  /** From the subject; `_unknown` when the request's was unusable. */
  tenant: string;
  model: string;
  /** The request id, when the request had a usable one. */
  requestId: string | undefined;
  code: string | undefined;
  reason: string | undefined;
  /** Deliveries of the request before it was dead-lettered. */
  deliveries: number | undefined;
  /** Where the request was published; where a requeue publishes it again. */
  originalSubject: string | undefined;
  /** Sequence of the request in `INFER_REQ`. */
  originalSeq: number | undefined;
  /** Body size in bytes. */
  size: number;
}

/** One dead letter in full. */
export interface DeadLetterDetail extends DeadLetterEntry {
  /** Every header, names as stored, in order. */
  headers: Array<[string, string]>;
  /** The body: text when it is valid UTF-8, else base64. */
  body: string;
  bodyEncoding: "utf8" | "base64";
}

// ---- reading ------------------------------------------------------------------------------

export async function handlesOf(t: DlqTarget): Promise<{ js: JetStreamClient; jsm: JetStreamManager }> {
  if ("js" in t && "jsm" in t) return t;
  return { js: jetstream(t), jsm: await jetstreamManager(t) };
}

export function headerEntries(h: MsgHdrs | undefined): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  if (h) for (const [k, vs] of h) for (const v of vs) out.push([k, v]);
  return out;
}

function intOf(s: string | undefined): number | undefined {
  if (s === undefined || !/^\d+$/.test(s)) return undefined;
  const n = Number(s);
  return Number.isSafeInteger(n) ? n : undefined;
}

function entryOf(seq: number, subject: string, time: Date, h: MsgHdrs | undefined, size: number): DeadLetterEntry {
  const [, , tenant = "", model = ""] = subject.split(".");
  const id = headerValue(h, DLQ_HEADERS.requestId);
  return {
    seq,
    time,
    subject,
    tenant,
    model,
    requestId: id !== undefined && ID_RE.test(id) ? id : undefined,
    code: headerValue(h, DLQ_HEADERS.errorCode),
    reason: headerValue(h, DLQ_HEADERS.errorReason),
    deliveries: intOf(headerValue(h, DLQ_HEADERS.deliveries)),
    originalSubject: headerValue(h, DLQ_HEADERS.originalSubject),
    originalSeq: intOf(headerValue(h, DLQ_HEADERS.originalSeq)),
    size,
  };
}

export function validateFilter(f: { tenant?: string | undefined; model?: string | undefined; code?: string | undefined; limit?: number | undefined }): void {
  const bad = (msg: string): never => {
    throw new DlqError("INVALID_ARGUMENT", msg);
  };
  if (f.tenant !== undefined && !TOKEN_RE.test(f.tenant)) bad(`tenant '${f.tenant}' must be 1-64 of a-z 0-9 _ -`);
  if (f.model !== undefined && !TOKEN_RE.test(f.model)) bad(`model '${f.model}' must be 1-64 of a-z 0-9 _ -`);
  if (f.code !== undefined && !(ERROR_CODES as readonly string[]).includes(f.code.toUpperCase())) bad(`code '${f.code}' is not one of ${ERROR_CODES.join(", ")}`);
  if (f.limit !== undefined && (!Number.isSafeInteger(f.limit) || f.limit < 1)) bad("limit must be an integer >= 1");
}

/** The one filter subject (nats-server 2.9 takes one per consumer). */
export function filterSubject(tenant: string | undefined, model: string | undefined): string {
  return tenant === undefined && model === undefined ? subjects.dlqAll : subjects.dlq(tenant ?? "*", model ?? "*");
}

/**
 * Reads the DLQ in order, headers only, with an ephemeral ordered consumer, up to the last
 * entry there when it started; deletes the consumer when done or abandoned.
 */
export async function* readEntries(h: { js: JetStreamClient; jsm: JetStreamManager }, subject: string): AsyncGenerator<DeadLetterEntry> {
  let state: { messages: number; last_seq: number; subjects?: Record<string, number> };
  try {
    // Counts per matching subject (no `subjects` when nothing matches; nats-server 2.9 has it):
    // a filter that matches nothing ends here, not after a pull times out.
    state = (await h.jsm.streams.info(STREAM_DLQ, { subjects_filter: subject })).state;
  } catch (err) {
    throw new DlqError("NOT_FOUND", `cannot read stream ${STREAM_DLQ}: ${(err as Error)?.message ?? err}`, { cause: err });
  }
  if (state.messages === 0 || state.subjects === undefined || Object.values(state.subjects).every((n) => n === 0)) return;
  const toSeq = state.last_seq;
  const consumer = await h.js.consumers.get(STREAM_DLQ, {
    // A string (not an array) becomes `filter_subject`, which nats-server 2.9 understands.
    filter_subjects: subject,
    headers_only: true,
    deliver_policy: DeliverPolicy.All,
    inactive_threshold: CONSUMER_INACTIVE_MS,
  });
  try {
    for (;;) {
      let n = 0;
      const batch = await consumer.fetch({ max_messages: FETCH_BATCH, expires: FETCH_EXPIRES_MS });
      for await (const m of batch) {
        n++;
        if (m.seq > toSeq) return;
        const size = intOf(headerValue(m.headers, "Nats-Msg-Size")) ?? m.data.byteLength;
        yield entryOf(m.seq, m.subject, new Date(m.info.timestampNanos / 1e6), m.headers, size);
        if (m.seq >= toSeq || m.info.pending === 0) return;
      }
      if (n === 0) return;
    }
  } finally {
    await consumer.delete().catch(() => false);
  }
}

/** Lists dead letters, the oldest first. */
export async function listDeadLetters(target: DlqTarget, filter: DeadLetterFilter = {}): Promise<DeadLetterEntry[]> {
  validateFilter(filter);
  const h = await handlesOf(target);
  const code = filter.code?.toUpperCase();
  const out: DeadLetterEntry[] = [];
  for await (const e of readEntries(h, filterSubject(filter.tenant, filter.model))) {
    if (code !== undefined && e.code?.toUpperCase() !== code) continue;
    out.push(e);
    if (filter.limit !== undefined && out.length >= filter.limit) break;
  }
  return out;
}

export async function getStored(jsm: JetStreamManager, stream: string, query: { seq: number } | { last_by_subj: string }): Promise<StoredMsg | null> {
  try {
    return await jsm.streams.getMessage(stream, query);
  } catch (err) {
    // The stream itself is missing: nothing is stored there.
    if (isJsApiError(err, JsApiCode.StreamNotFound, JsApiCode.NoMessageFound)) return null;
    throw err;
  }
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** One dead letter with its headers and body; undefined when there is none at `seq`. */
export async function showDeadLetter(target: DlqTarget, seq: number): Promise<DeadLetterDetail | undefined> {
  if (!Number.isSafeInteger(seq) || seq < 1) throw new DlqError("INVALID_ARGUMENT", "seq must be an integer >= 1");
  const { jsm } = await handlesOf(target);
  const m = await getStored(jsm, STREAM_DLQ, { seq });
  if (!m) return undefined;
  let body: string;
  let bodyEncoding: "utf8" | "base64" = "utf8";
  try {
    body = utf8.decode(m.data);
  } catch {
    body = Buffer.from(m.data).toString("base64");
    bodyEncoding = "base64";
  }
  return { ...entryOf(m.seq, m.subject, m.time, m.header, m.data.byteLength), headers: headerEntries(m.header), body, bodyEncoding };
}
