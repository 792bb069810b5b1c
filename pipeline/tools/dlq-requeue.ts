/**
 * Requeueing dead letters: each entry the selector takes is published back to `INFER_REQ` under
 * its own request id, then removed from `INFER_DLQ` (see dlq.ts for when that works and when
 * it waits for a duplicate window).
 */
import { headers as natsHeaders } from "@nats-io/transport-node";
import type { JetStreamManager, PubAck } from "@nats-io/jetstream";
import { STREAM_DLQ, STREAM_REQUESTS, STREAM_RESULTS, H, ID_RE, REQUEST_SUBJECT_RE } from "../../proto/wire.js";
import { findStoredResult } from "../settle/stored-result.js";
import { headerValue } from "../support/headers.js";
import { isJsApiError, JsApiCode } from "../support/jetstream-errors.js";
import { DlqError, filterSubject, getStored, handlesOf, headerEntries, readEntries, validateFilter, DLQ_HEADER_SET, type DeadLetterEntry, type DlqTarget } from "./dlq.js";

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
