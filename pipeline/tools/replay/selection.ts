/** Which recorded requests a replay takes: the selection, its check, and the ordered read of `INFER_REQ`. */
import { randomBytes } from "node:crypto";
import { type NatsConnection } from "@nats-io/transport-node";
import { DeliverPolicy, jetstream, jetstreamManager, type JetStreamClient, type JetStreamManager, type JsMsg, type OrderedConsumerOptions } from "@nats-io/jetstream";
import { PRIORITIES, type Priority, STREAM_REQUESTS, H, ID_RE, TOKEN_RE } from "../../../proto/wire.js";
import { headerValue } from "../../support/headers.js";
import { ReplayError } from "./options.js";

const TRACE_ID_RE = /^[0-9a-f]{32}$/;
const TRACEPARENT_RE = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})/;

/** Messages asked for per pull of the ordered consumer. */
const FETCH_BATCH = 256;
/** How long a pull waits on a selection with nothing (more) in it. */
const FETCH_EXPIRES_MS = 1_000;
/** The server drops a replay's consumer idle this long (a paced replay may wait long between pulls). */
const CONSUMER_INACTIVE_MS = 60 * 60_000;
/** Failed pulls of one read before it gives up. */
const MAX_PULL_FAILURES = 3;

/** Which recorded requests to replay; every criterion given must hold. */
export interface ReplaySelection {
  /** Stored at or after. */
  since?: Date;
  /** Stored at or before. */
  until?: Date;
  /** `INFER_REQ` stream sequence range, inclusive. */
  fromSeq?: number;
  toSeq?: number;
  tenants?: readonly string[];
  models?: readonly string[];
  priorities?: readonly Priority[];
  /** Request ids (`Nats-Msg-Id`). */
  ids?: readonly string[];
  /** The trace id (32 hex digits) of the request's `traceparent`. */
  traceId?: string;
}

/** One selected request, as listed by a dry run. */
export interface SelectedRequest {
  seq: number;
  /** `Nats-Msg-Id`; undefined when the request has none. */
  id: string | undefined;
  time: Date;
  subject: string;
  tenant: string | undefined;
  model: string | undefined;
  priority: string | undefined;
  traceparent: string | undefined;
}

export interface SelectionCount {
  count: number;
  /** Stream sequences of the first and last selected request (undefined when none). */
  firstSeq: number | undefined;
  lastSeq: number | undefined;
}

/** Checks a selection; throws a ReplayError saying what is wrong. */
export function validateSelection(s: ReplaySelection): void {
  const bad = (msg: string): never => {
    throw new ReplayError("INVALID_ARGUMENT", msg);
  };
  for (const [name, d] of [["since", s.since], ["until", s.until]] as const) {
    if (d !== undefined && !Number.isFinite(d.getTime())) bad(`${name} is not a valid time`);
  }
  if (s.since && s.until && s.since.getTime() > s.until.getTime()) bad("since is after until");
  for (const [name, n] of [["fromSeq", s.fromSeq], ["toSeq", s.toSeq]] as const) {
    if (n !== undefined && (!Number.isSafeInteger(n) || n < 1)) bad(`${name} must be an integer >= 1`);
  }
  if (s.fromSeq !== undefined && s.toSeq !== undefined && s.fromSeq > s.toSeq) bad("fromSeq is after toSeq");
  for (const t of s.tenants ?? []) if (!TOKEN_RE.test(t)) bad(`tenant '${t}' must be 1-64 of a-z 0-9 _ -`);
  for (const m of s.models ?? []) if (!TOKEN_RE.test(m)) bad(`model '${m}' must be 1-64 of a-z 0-9 _ -`);
  for (const p of s.priorities ?? []) if (!(PRIORITIES as readonly string[]).includes(p)) bad(`priority '${p}' is not one of ${PRIORITIES.join(", ")}`);
  for (const id of s.ids ?? []) if (!ID_RE.test(id)) bad(`request id '${id}' must be 1-128 of A-Z a-z 0-9 _ -`);
  if (s.traceId !== undefined && !TRACE_ID_RE.test(s.traceId.toLowerCase())) bad("trace id must be 32 hex digits");
}

/**
 * The one filter subject of the ordered consumer (nats-server 2.9 takes one), or undefined for
 * the whole stream. A filter must lie inside one of the stream's subjects
 * (`infer.req.<priority>.*.*`), so it is used only when the selection names exactly one priority;
 * tenant and model tokens are fixed when exactly one value is named. The rest is filtered here.
 */
export function filterSubjectOf(s: ReplaySelection): string | undefined {
  const one = (xs: readonly string[] | undefined): string => (xs && xs.length === 1 ? xs[0]! : "*");
  const [p, t, m] = [one(s.priorities), one(s.tenants), one(s.models)];
  return p === "*" ? undefined : `infer.req.${p}.${t}.${m}`;
}

/** The parts of a request subject; undefined tokens when it is not `infer.req.<p>.<t>.<m>`. */
export function subjectParts(subject: string): { priority?: string; tenant?: string; model?: string } {
  const tk = subject.split(".");
  if (tk.length !== 5 || tk[0] !== "infer" || tk[1] !== "req") return {};
  return { priority: tk[2]!, tenant: tk[3]!, model: tk[4]! };
}

/** The trace id of a `traceparent`, lower case, or undefined. */
function traceIdOf(traceparent: string | undefined): string | undefined {
  if (traceparent === undefined) return undefined;
  return TRACEPARENT_RE.exec(traceparent.trim().toLowerCase())?.[2];
}

/** A new `traceparent` (new trace and span ids), keeping the sampled flag of `like`. */
export function newTraceparent(like?: string): string {
  const flags = like !== undefined ? (TRACEPARENT_RE.exec(like.trim().toLowerCase())?.[4] ?? "01") : "01";
  return `00-${randomBytes(16).toString("hex")}-${randomBytes(8).toString("hex")}-${flags}`;
}

function selectedOf(m: JsMsg): SelectedRequest {
  const parts = subjectParts(m.subject);
  return {
    seq: m.seq,
    id: headerValue(m.headers, H.msgId),
    time: new Date(m.info.timestampNanos / 1e6),
    subject: m.subject,
    tenant: parts.tenant,
    model: parts.model,
    priority: parts.priority,
    traceparent: headerValue(m.headers, H.traceparent),
  };
}

/** A predicate over recorded messages for the criteria the server's filter cannot apply. */
export function matcher(s: ReplaySelection): (m: JsMsg) => boolean {
  const set = (xs: readonly string[] | undefined): Set<string> | undefined => (xs && xs.length > 0 ? new Set(xs) : undefined);
  const tenants = set(s.tenants);
  const models = set(s.models);
  const priorities = set(s.priorities);
  const ids = set(s.ids);
  const traceId = s.traceId?.toLowerCase();
  const since = s.since?.getTime();
  const until = s.until?.getTime();
  return (m) => {
    if (s.fromSeq !== undefined && m.seq < s.fromSeq) return false;
    if (s.toSeq !== undefined && m.seq > s.toSeq) return false;
    const ms = m.info.timestampNanos / 1e6;
    if (since !== undefined && ms < since) return false;
    if (until !== undefined && ms > until) return false;
    if (tenants || models || priorities) {
      const p = subjectParts(m.subject);
      if (tenants && (p.tenant === undefined || !tenants.has(p.tenant))) return false;
      if (models && (p.model === undefined || !models.has(p.model))) return false;
      if (priorities && (p.priority === undefined || !priorities.has(p.priority))) return false;
    }
    if (ids) {
      const id = headerValue(m.headers, H.msgId);
      if (id === undefined || !ids.has(id)) return false;
    }
    if (traceId !== undefined && traceIdOf(headerValue(m.headers, H.traceparent)) !== traceId) return false;
    return true;
  };
}

export interface ReadRange {
  fromSeq?: number;
  since?: Date;
  /** Last sequence to read (inclusive). */
  toSeq: number;
}

/**
 * Reads `INFER_REQ` in order with an ephemeral ordered consumer from the start of the range to
 * its end, yielding every message the server's filter lets through (the caller filters the
 * rest). Ends at `toSeq`, when nothing is pending, or when a pull finds nothing; deletes the
 * consumer when done or abandoned. A pull that fails (the server dropped an idle consumer
 * during a long paced gap, a reconnect) reopens the consumer after the last message read.
 */
export async function* readRequests(js: JetStreamClient, s: ReplaySelection, range: ReadRange, headersOnly: boolean): AsyncGenerator<JsMsg> {
  let lastSeq: number | undefined;
  for (let failures = 0; ; ) {
    const opts: Partial<OrderedConsumerOptions> = {
      headers_only: headersOnly,
      inactive_threshold: CONSUMER_INACTIVE_MS,
    };
    // A string (not an array) becomes `filter_subject`, which nats-server 2.9 understands.
    const filter = filterSubjectOf(s);
    if (filter !== undefined) opts.filter_subjects = filter;
    if (lastSeq !== undefined) opts.opt_start_seq = lastSeq + 1;
    else if (range.fromSeq !== undefined) opts.opt_start_seq = range.fromSeq;
    else if (range.since !== undefined) opts.opt_start_time = range.since.toISOString();
    else opts.deliver_policy = DeliverPolicy.All;
    const consumer = await js.consumers.get(STREAM_REQUESTS, opts);
    try {
      for (;;) {
        let n = 0;
        try {
          const batch = await consumer.fetch({ max_messages: FETCH_BATCH, expires: FETCH_EXPIRES_MS });
          for await (const m of batch) {
            n++;
            if (m.seq > range.toSeq) return;
            lastSeq = m.seq;
            yield m;
            if (m.seq >= range.toSeq || m.info.pending === 0) return;
          }
        } catch (err) {
          if (++failures > MAX_PULL_FAILURES) throw err;
          break;
        }
        if (n === 0) return;
      }
    } finally {
      await consumer.delete().catch(() => false);
    }
  }
}

/** Where reading starts and ends for a selection, from the stream's state now. */
async function rangeOf(jsm: JetStreamManager, s: ReplaySelection): Promise<ReadRange | undefined> {
  let state: { last_seq: number; first_seq: number; messages: number; last_ts: string };
  try {
    state = (await jsm.streams.info(STREAM_REQUESTS)).state;
  } catch (err) {
    throw new ReplayError("NOT_FOUND", `cannot read stream ${STREAM_REQUESTS}: ${(err as Error)?.message ?? err}`, { cause: err });
  }
  // Requests that arrive while the replay runs are not part of it.
  const toSeq = Math.min(s.toSeq ?? Number.MAX_SAFE_INTEGER, state.last_seq);
  if (state.messages === 0 || toSeq < Math.max(1, s.fromSeq ?? 1, state.first_seq)) return undefined;
  if (s.since !== undefined && s.since.getTime() > Date.parse(state.last_ts)) return undefined;
  const range: ReadRange = { toSeq };
  if (s.fromSeq !== undefined) range.fromSeq = s.fromSeq;
  if (s.since !== undefined) range.since = s.since;
  return range;
}

/**
 * Counts the recorded requests a selection holds (headers only: bodies are not read) and
 * hands each to `onMatch` in stream order: the dry run, and the count before a replay.
 */
export async function countSelection(nc: NatsConnection, s: ReplaySelection, onMatch?: (r: SelectedRequest) => void): Promise<SelectionCount> {
  validateSelection(s);
  const out: SelectionCount = { count: 0, firstSeq: undefined, lastSeq: undefined };
  const range = await rangeOf(await jetstreamManager(nc), s);
  if (!range) return out;
  const matches = matcher(s);
  const until = s.until?.getTime();
  for await (const m of readRequests(jetstream(nc), s, range, true)) {
    // Stored times only grow along the stream: past `until`, nothing more can match.
    if (until !== undefined && m.info.timestampNanos / 1e6 > until) break;
    if (!matches(m)) continue;
    out.count++;
    out.firstSeq ??= m.seq;
    out.lastSeq = m.seq;
    onMatch?.(selectedOf(m));
  }
  return out;
}
