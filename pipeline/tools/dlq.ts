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
import { headers as natsHeaders, type MsgHdrs, type NatsConnection } from "@nats-io/transport-node";
import { DeliverPolicy, jetstream, jetstreamManager, type JetStreamClient, type JetStreamManager, type PubAck, type StoredMsg } from "@nats-io/jetstream";
import { ERROR_CODES, STREAM_DLQ, STREAM_REQUESTS, STREAM_RESULTS, H, ID_RE, subjects, TOKEN_RE, REQUEST_SUBJECT_RE } from "../../proto/wire.js";
import { findStoredResult } from "../settle/stored-result.js";
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

const DLQ_HEADER_SET = new Set(Object.values(DLQ_HEADERS).map((h) => h.toLowerCase()));
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

/** Which dead letters to requeue: every criterion given must hold; `all` alone takes every one. */
export interface RequeueSelector {
  /** Request ids (`Infer-Request-Id`). */
  ids?: readonly string[];
  /** `INFER_DLQ` sequences. */
  seqs?: readonly number[];
  tenant?: string;
  model?: string;
  all?: boolean;
}

export interface RequeueOptions {
  /** Decide and report for every entry, publish and delete nothing. */
  dryRun?: boolean;
  /** Hears of each entry as it is decided. */
  onItem?: (item: RequeueItem) => void;
  now?: () => number;
}

export type RequeueAction = "requeued" | "would-requeue" | "duplicate" | "skipped" | "failed";

export interface RequeueItem {
  /** Sequence in `INFER_DLQ`. */
  seq: number;
  requestId: string | undefined;
  /** The request subject it goes (or would go) back to. */
  subject: string | undefined;
  action: RequeueAction;
  /** Why, for anything but a plain `requeued` / `would-requeue`. */
  reason?: string;
  /** `duplicate`: from when a requeue can work. */
  retryAfter?: Date;
  /** `requeued`: sequence of the new copy in `INFER_REQ`. */
  requeuedSeq?: number;
}

export interface RequeueReport {
  /** Entries the selector matched. */
  selected: number;
  requeued: number;
  /** Dry run: entries that would be requeued. */
  wouldRequeue: number;
  /** Not requeued yet: inside a duplicate window (see the module comment); try again later. */
  duplicates: number;
  /** Not requeued, and requeueing would not help (no usable id or subject, already answered). */
  skipped: number;
  /** Publishing failed; the entry stays in the DLQ. */
  failed: number;
  items: RequeueItem[];
}

// ---- reading ------------------------------------------------------------------------------

async function handlesOf(t: DlqTarget): Promise<{ js: JetStreamClient; jsm: JetStreamManager }> {
  if ("js" in t && "jsm" in t) return t;
  return { js: jetstream(t), jsm: await jetstreamManager(t) };
}

function headerEntries(h: MsgHdrs | undefined): Array<[string, string]> {
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

function validateFilter(f: { tenant?: string | undefined; model?: string | undefined; code?: string | undefined; limit?: number | undefined }): void {
  const bad = (msg: string): never => {
    throw new DlqError("INVALID_ARGUMENT", msg);
  };
  if (f.tenant !== undefined && !TOKEN_RE.test(f.tenant)) bad(`tenant '${f.tenant}' must be 1-64 of a-z 0-9 _ -`);
  if (f.model !== undefined && !TOKEN_RE.test(f.model)) bad(`model '${f.model}' must be 1-64 of a-z 0-9 _ -`);
  if (f.code !== undefined && !(ERROR_CODES as readonly string[]).includes(f.code.toUpperCase())) bad(`code '${f.code}' is not one of ${ERROR_CODES.join(", ")}`);
  if (f.limit !== undefined && (!Number.isSafeInteger(f.limit) || f.limit < 1)) bad("limit must be an integer >= 1");
}

/** The one filter subject (nats-server 2.9 takes one per consumer). */
function filterSubject(tenant: string | undefined, model: string | undefined): string {
  return tenant === undefined && model === undefined ? subjects.dlqAll : subjects.dlq(tenant ?? "*", model ?? "*");
}

/**
 * Reads the DLQ in order, headers only, with an ephemeral ordered consumer, up to the last
 * entry there when it started; deletes the consumer when done or abandoned.
 */
async function* readEntries(h: { js: JetStreamClient; jsm: JetStreamManager }, subject: string): AsyncGenerator<DeadLetterEntry> {
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

async function getStored(jsm: JetStreamManager, stream: string, query: { seq: number } | { last_by_subj: string }): Promise<StoredMsg | null> {
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

// ---- requeueing ---------------------------------------------------------------------------

function validateSelector(s: RequeueSelector): void {
  const bad = (msg: string): never => {
    throw new DlqError("INVALID_ARGUMENT", msg);
  };
  const narrowed = (s.ids?.length ?? 0) > 0 || (s.seqs?.length ?? 0) > 0 || s.tenant !== undefined || s.model !== undefined;
  if (s.all === true && narrowed) bad("'all' takes every dead letter: give it alone, or narrow by ids, seqs, tenant or model instead");
  if (s.all !== true && !narrowed) bad("say which dead letters to requeue: ids, seqs, tenant, model, or all");
  validateFilter({ tenant: s.tenant, model: s.model });
  for (const id of s.ids ?? []) if (!ID_RE.test(id)) bad(`request id '${id}' must be 1-128 of A-Z a-z 0-9 _ -`);
  for (const n of s.seqs ?? []) if (!Number.isSafeInteger(n) || n < 1) bad(`seq ${n} must be an integer >= 1`);
}

async function duplicateWindowMs(jsm: JetStreamManager, stream: string): Promise<number> {
  try {
    return ((await jsm.streams.info(stream)).config.duplicate_window ?? 0) / 1e6;
  } catch (err) {
    if (isJsApiError(err, JsApiCode.StreamNotFound)) return 0;
    throw err;
  }
}

function seconds(ms: number): string {
  return `${Math.round(ms / 100) / 10} s`;
}

/**
 * Puts the selected dead letters back on their original request subject, with their body and
 * original headers and their own request id (see the module comment for when that is held
 * back), and deletes each from the DLQ once `INFER_REQ` acknowledged it. Entries are handled
 * one at a time, the oldest first.
 */
export async function requeueDeadLetters(target: DlqTarget, selector: RequeueSelector, opts: RequeueOptions = {}): Promise<RequeueReport> {
  validateSelector(selector);
  const now = opts.now ?? Date.now;
  const h = await handlesOf(target);
  const { js, jsm } = h;
  const ids = selector.ids && selector.ids.length > 0 ? new Set(selector.ids) : undefined;
  const seqs = selector.seqs && selector.seqs.length > 0 ? new Set(selector.seqs) : undefined;
  const entries: DeadLetterEntry[] = [];
  for await (const e of readEntries(h, filterSubject(selector.tenant, selector.model))) {
    if (ids && (e.requestId === undefined || !ids.has(e.requestId))) continue;
    if (seqs && !seqs.has(e.seq)) continue;
    entries.push(e);
  }
  const report: RequeueReport = { selected: entries.length, requeued: 0, wouldRequeue: 0, duplicates: 0, skipped: 0, failed: 0, items: [] };
  if (entries.length === 0) return report;
  const requestWindowMs = await duplicateWindowMs(jsm, STREAM_REQUESTS);
  const resultWindowMs = await duplicateWindowMs(jsm, STREAM_RESULTS);
  const done = new Set<string>();

  const decide = async (e: DeadLetterEntry): Promise<RequeueItem> => {
    const item: RequeueItem = { seq: e.seq, requestId: e.requestId, subject: e.originalSubject, action: "skipped" };
    const skip = (reason: string): RequeueItem => ({ ...item, action: "skipped", reason });
    const notYet = (reason: string, at: number): RequeueItem => ({ ...item, action: "duplicate", reason, retryAfter: new Date(at) });

    const m = await getStored(jsm, STREAM_DLQ, { seq: e.seq });
    if (!m) return skip(`no longer in ${STREAM_DLQ} (requeued or removed meanwhile)`);
    const id = e.requestId;
    if (id === undefined) {
      return skip("the request has no usable id (its Nats-Msg-Id was missing or invalid): requeued, it would be dead-lettered again; fix it and publish it anew");
    }
    const target = REQUEST_SUBJECT_RE.exec(e.originalSubject ?? "");
    if (!target) return skip(`its original subject '${e.originalSubject ?? ""}' is not a request subject: requeued, it would be dead-lettered again`);
    const tenant = target[2]!;
    const key = `${tenant}/${id}`;
    if (done.has(key)) return skip(`another dead letter of request ${id} was requeued in this run`);

    const res = await findStoredResult((q) => getStored(jsm, STREAM_RESULTS, q), tenant, id);
    if (res) {
      if (headerValue(res.header, H.status) === "ok") return skip(`request ${id} was answered ok at ${res.time.toISOString()}: nothing to requeue`);
      const until = res.time.getTime() + resultWindowMs;
      if (now() < until) {
        return notYet(
          `not requeued yet: its final result (stored ${res.time.toISOString()}) is inside ${STREAM_RESULTS}'s duplicate window of ${seconds(resultWindowMs)}, ` +
            `which would drop a new result for id ${id}; try again after ${new Date(until).toISOString()}`,
          until,
        );
      }
    }
    const original = e.originalSeq !== undefined ? await getStored(jsm, STREAM_REQUESTS, { seq: e.originalSeq }) : null;
    const firstPublish = original && headerValue(original.header, H.msgId) === id ? original.time.getTime() : undefined;
    /** `first`: when the id was first published, when known (else the window is counted from now). */
    const requestNotYet = (first: number | undefined): RequeueItem => {
      const at = (first ?? now()) + requestWindowMs;
      const since = first !== undefined ? ` (first published ${new Date(first).toISOString()})` : "";
      const after = `${new Date(at).toISOString()}${first !== undefined ? "" : " at the latest"}`;
      return notYet(
        `not requeued yet: ${STREAM_REQUESTS} still remembers request id ${id}${since} within its duplicate window of ${seconds(requestWindowMs)} ` +
          `and would drop the copy; try again after ${after}`,
        at,
      );
    };
    if (firstPublish !== undefined && now() < firstPublish + requestWindowMs) return requestNotYet(firstPublish);

    if (opts.dryRun) {
      done.add(key);
      return { ...item, action: "would-requeue" };
    }
    const hdrs = natsHeaders();
    for (const [k, v] of headerEntries(m.header)) {
      const lower = k.toLowerCase();
      if (DLQ_HEADER_SET.has(lower) || lower.startsWith("nats-")) continue;
      hdrs.append(k, v);
    }
    let ack: PubAck;
    try {
      ack = await js.publish(target[0], m.data, { msgID: id, headers: hdrs, expect: { streamName: STREAM_REQUESTS } });
    } catch (err) {
      return { ...item, action: "failed", reason: `publishing to ${target[0]} failed: ${(err as Error)?.message ?? err}` };
    }
    // Past the window of the first publish, yet a duplicate: the id was published again since.
    if (ack.duplicate) return requestNotYet(undefined);
    done.add(key);
    const requeued: RequeueItem = { ...item, action: "requeued", requeuedSeq: ack.seq };
    try {
      await jsm.streams.deleteMessage(STREAM_DLQ, e.seq, false);
    } catch (err) {
      requeued.reason = `requeued, but the dead letter could not be removed (${(err as Error)?.message ?? err}); a later requeue of it will find the request answered or a duplicate`;
    }
    return requeued;
  };

  for (const e of entries) {
    let item: RequeueItem;
    try {
      item = await decide(e);
    } catch (err) {
      item = { seq: e.seq, requestId: e.requestId, subject: e.originalSubject, action: "failed", reason: (err as Error)?.message ?? String(err) };
    }
    report.items.push(item);
    if (item.action === "requeued") report.requeued++;
    else if (item.action === "would-requeue") report.wouldRequeue++;
    else if (item.action === "duplicate") report.duplicates++;
    else if (item.action === "skipped") report.skipped++;
    else report.failed++;
    try {
      opts.onItem?.(item);
    } catch {
      // the listener's failure is its own
    }
  }
  return report;
}
