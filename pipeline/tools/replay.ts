/**
 * Replay: re-runs recorded requests from `INFER_REQ` through the same pipeline code as live
 * traffic ({@link inferencePipeline}) and compares each new result with the recorded one.
 *
 * ```
 * INFER_REQ ─ ordered consumer (selection) ─ pace ─ credits ─▶ inferencePipeline ─▶ infer.replay.<session>.res.<tenant>.<id>
 *                                                                    │ route: --version, else the recorded version, else the registry
 *                                   INFER_RES (last_by_subj) ────────┴─▶ compare: equal | different | missing | error
 * ```
 *
 * - **Never live.** Requests are read with an ephemeral ordered consumer (the durable
 *   consumers of the live pipeline are not touched), results (and the chunks of streamed
 *   requests) go to `infer.replay.<session>.>` on core NATS, never to `infer.res` or
 *   `infer.tok`; live cancels and shadow copies do not apply. Deliveries are wrappers whose
 *   ack/nak/term do nothing to the stream: a nak with a delay re-runs the request after the
 *   delay, at most `maxReruns` times (there is no redelivery to count on).
 * - **Counted first.** A headers-only pass counts the selection (and lists it for a dry run)
 *   before anything runs; the replay pass reads the same range again.
 * - **Bounded.** At most `maxInFlight` requests are in the pipeline at once; the backlog waits
 *   in the stream, as it does live.
 * - **Traced apart.** Each replayed request runs under a new `traceparent` (a new trace); the
 *   original travels in the result header `Infer-Replay-Of-Traceparent` as the link.
 *
 * ```ts
 * const report = await replay(nc, {
 *   selection: { since: new Date(Date.now() - 15 * 60_000), models: ["llama3-8b"] },
 *   version: "v2",
 *   onResult: (item) => console.log(item.verdict, item.id),
 * });
 * console.log(report.counts, report.different);
 * ```
 */
import { randomBytes } from "node:crypto";
import { headers as natsHeaders, nuid, type NatsConnection } from "@nats-io/transport-node";
import {
  DeliverPolicy,
  jetstream,
  jetstreamManager,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
  type OrderedConsumerOptions,
} from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { Subject } from "rxjs";
import type { RouteDecision } from "../../operators/route-to-version.js";
import type { DeadLetter, ResultSink, Settled } from "../../operators/settle-outcome.js";
import type { Delivery, ErrorInfo, InferJob, InferResult } from "../../operators/types.js";
import { PRIORITIES, type Priority, STREAM_REQUESTS, H, ID_RE, TOKEN_RE, WORKERS_BUCKET, VERSION_RE, DEADLINE_RE, replaySubjects, REPLAY_HEADERS, SESSION_RE } from "../../proto/wire.js";
import { inferencePipeline } from "../request-path.js";
import { defaultConfig, type SluiceConfig } from "../config.js";
import { getStoredResult } from "../settle/stored-result.js";
import type { ModelTable } from "../routing/registry.js";
import { silentLogger, type PipelineLogger } from "../support/logger.js";
import type { WorkerDirectory } from "../workers/directory.js";
import { openFleet } from "../workers/fleet.js";
import type { WorkerConnection } from "../workers/pool.js";
import { headerValue, sanitizeHeader } from "../support/headers.js";
import { deadLetterHeaders, deadLetterTokens } from "../settle/dead-letter.js";
import { textSimilarity, lineDiff, type Similarity } from "./text-compare.js";
import { ByteGate } from "../payloads/byte-gate.js";
import { DEFAULT_MAX_OBJECT_BYTES } from "../payloads/names.js";
import { originalDelivery, resolveRequestBodies } from "../payloads/resolve-requests.js";
import { resolveResult } from "../payloads/results.js";
import { PayloadStore } from "../payloads/store.js";

// ---- names and tunables -------------------------------------------------------------------

const TRACE_ID_RE = /^[0-9a-f]{32}$/;
const TRACEPARENT_RE = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})/;

/** Re-runs of one request after naks, by default. */
export const DEFAULT_MAX_RERUNS = 10;
/** Messages asked for per pull of the ordered consumer. */
const FETCH_BATCH = 256;
/** How long a pull waits on a selection with nothing (more) in it. */
const FETCH_EXPIRES_MS = 1_000;
/** The server drops a replay's consumer idle this long (a paced replay may wait long between pulls). */
const CONSUMER_INACTIVE_MS = 60 * 60_000;
/** Failed pulls of one read before it gives up. */
const MAX_PULL_FAILURES = 3;
/** Recorded results looked up ahead of the request being injected (lookups overlap the pipeline). */
const LOOKAHEAD = 256;
/** How long to wait for the worker directory to load the registered workers. */
const DIRECTORY_WARMUP_MS = 2_000;
export const DEFAULT_PROGRESS_INTERVAL_MS = 1_000;

/** A replay that cannot start (bad selection, missing stream): `code` is PROTOCOL.md's. */
export class ReplayError extends Error {
  override readonly name = "ReplayError";
  constructor(
    readonly code: "INVALID_ARGUMENT" | "NOT_FOUND" | "UNAVAILABLE",
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

// ---- selection ----------------------------------------------------------------------------

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
function subjectParts(subject: string): { priority?: string; tenant?: string; model?: string } {
  const tk = subject.split(".");
  if (tk.length !== 5 || tk[0] !== "infer" || tk[1] !== "req") return {};
  return { priority: tk[2]!, tenant: tk[3]!, model: tk[4]! };
}

/** The trace id of a `traceparent`, lower case, or undefined. */
export function traceIdOf(traceparent: string | undefined): string | undefined {
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
function matcher(s: ReplaySelection): (m: JsMsg) => boolean {
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

interface ReadRange {
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
async function* readRequests(js: JetStreamClient, s: ReplaySelection, range: ReadRange, headersOnly: boolean): AsyncGenerator<JsMsg> {
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

// ---- time and pace ------------------------------------------------------------------------

const UNIT_MS: Record<string, number> = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 7 * 86_400_000 };

/** `2024-05-01T12:00:00Z` (any ISO 8601 time), `now`, or a duration ago: `90s`, `15m`, `2h`, `7d`, `1h30m`. */
export function parseTimeSpec(spec: string, now: number = Date.now()): Date {
  const s = spec.trim();
  if (s === "now") return new Date(now);
  if (/^(\d+(?:\.\d+)?(ms|s|m|h|d|w))+$/.test(s)) {
    let ms = 0;
    for (const [, n, unit] of s.matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h|d|w)/g)) ms += Number(n) * UNIT_MS[unit!]!;
    return new Date(now - ms);
  }
  const t = Date.parse(s);
  if (!/^\d{4}-\d{2}-\d{2}/.test(s) || !Number.isFinite(t)) {
    throw new ReplayError("INVALID_ARGUMENT", `time '${spec}' is neither ISO 8601 nor a duration like 30s, 15m, 2h, 7d`);
  }
  return new Date(t);
}

/** How fast requests are injected: as fast as credits allow, with the recorded spacing, or at a fixed rate. */
export type Pace = { kind: "max" } | { kind: "original" } | { kind: "rate"; perSecond: number };

/** `max`, `original` or `N/s` (requests per second, N > 0). */
export function parsePace(spec: string): Pace {
  const s = spec.trim();
  if (s === "max") return { kind: "max" };
  if (s === "original") return { kind: "original" };
  const m = /^(\d+(?:\.\d+)?)\/s$/.exec(s);
  if (m && Number(m[1]) > 0) return { kind: "rate", perSecond: Number(m[1]) };
  throw new ReplayError("INVALID_ARGUMENT", `pace '${spec}' must be max, original or N/s`);
}

export function formatPace(p: Pace): string {
  return p.kind === "rate" ? `${p.perSecond}/s` : p.kind;
}

// ---- comparison ---------------------------------------------------------------------------

export type Verdict = "equal" | "different" | "missing" | "error";

/** A result as the report shows it. */
export interface ResultView {
  status: "ok" | "error";
  output?: InferResult["output"];
  version?: string;
  error?: ErrorInfo;
}

export interface Comparison {
  verdict: Verdict;
  /** For `different` outputs. */
  similarity?: Similarity;
  /** Unified-style line diff of the outputs (original `-`, replayed `+`), for `different`. */
  diff?: string[];
}

function viewOf(r: InferResult): ResultView {
  const v: ResultView = { status: r.status };
  if (r.output !== undefined) v.output = r.output;
  if (r.version !== undefined) v.version = r.version;
  if (r.error !== undefined) v.error = r.error;
  return v;
}

/** JSON with object keys sorted, so equal values print equally. */
export function canonicalJson(v: unknown): string {
  return JSON.stringify(v, (_k, x: unknown) =>
    x !== null && typeof x === "object" && !Array.isArray(x)
      ? Object.fromEntries(Object.entries(x as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
      : x,
  );
}

/** The text compared: the output's text, or its canonical JSON when it carries other data. */
function comparableText(output: InferResult["output"]): string {
  if (output && typeof output.text === "string" && output.data === undefined) return output.text;
  return output === undefined ? "" : (canonicalJson(output) ?? "");
}

/**
 * The verdict for a replayed result against the recorded one:
 * - `error`: the replay produced no result, or an error result that the recorded one is not;
 * - `missing`: no recorded result to compare with (and the replay succeeded);
 * - `equal`: same status and output (or the same error code);
 * - `different`: otherwise, with a similarity figure and a line diff.
 * Versions, usage and timing are not compared.
 */
export function compareResults(original: ResultView | undefined, replayed: ResultView | undefined): Comparison {
  if (!replayed) return { verdict: "error" };
  if (!original) return { verdict: replayed.status === "ok" ? "missing" : "error" };
  if (original.status === replayed.status) {
    if (replayed.status === "error" ? original.error?.code === replayed.error?.code : canonicalJson(original.output) === canonicalJson(replayed.output)) {
      return { verdict: "equal" };
    }
  }
  if (replayed.status === "error") return { verdict: "error" };
  const a = original.status === "ok" ? comparableText(original.output) : `error ${original.error?.code ?? ""}: ${original.error?.message ?? ""}`;
  const b = comparableText(replayed.output);
  return { verdict: "different", similarity: textSimilarity(a, b), diff: lineDiff(a, b) };
}

// ---- deliveries and sink ------------------------------------------------------------------

/** One recorded request on its way through a replay (shared by its re-runs). */
export interface ReplayRecord {
  readonly seq: number;
  readonly subject: string;
  readonly data: Uint8Array;
  /** The request's headers as the replay presents them (new trace, shifted deadline, replay marks). */
  readonly headers: ReadonlyArray<readonly [string, string]>;
  readonly id: string | undefined;
  readonly tenant: string | undefined;
  readonly model: string | undefined;
  /** When the original was stored in `INFER_REQ` (epoch ms). */
  readonly originalStoredAtMs: number;
  readonly originalTraceparent: string | undefined;
  /** The new trace this replay runs under. */
  readonly traceparent: string;
  /** The recorded result (`INFER_RES`), when there is one. */
  recorded: InferResult | undefined;
  /** When the replay first put it into the pipeline (epoch ms): the replay's "stored at". */
  injectedAtMs: number;
  reruns: number;
  /** The result the replay published, once it has. */
  replayed: InferResult | undefined;
}

/**
 * A recorded request delivered to the pipeline by a replay. Settling it changes nothing in the
 * stream: it only records how it was settled, for the replay to act on (a nak's delay schedules
 * a re-run).
 */
export class ReplayDelivery implements Delivery {
  readonly pulledAtMs = Date.now();
  private how: { action: "ack" | "nak" | "term"; delayMs?: number } | undefined;
  constructor(
    readonly record: ReplayRecord,
    readonly deliveryCount: number,
  ) {}
  get subject(): string {
    return this.record.subject;
  }
  get data(): Uint8Array {
    return this.record.data;
  }
  get seq(): number {
    return this.record.seq;
  }
  get storedAtMs(): number {
    return this.record.injectedAtMs;
  }
  get settled(): boolean {
    return this.how !== undefined;
  }
  /** How it was settled; undefined while it is not. */
  get settlement(): { action: "ack" | "nak" | "term"; delayMs?: number } | undefined {
    return this.how;
  }
  header(name: string): string | undefined {
    return headerValue(this.record.headers, name);
  }
  headerEntries(): Array<[string, string]> {
    return this.record.headers.map(([k, v]): [string, string] => [k, v]);
  }
  ack(): void {
    this.how ??= { action: "ack" };
  }
  nak(delayMs?: number): void {
    this.how ??= delayMs !== undefined ? { action: "nak", delayMs } : { action: "nak" };
  }
  term(): void {
    this.how ??= { action: "term" };
  }
  working(): void {
    // nothing waits on an ack timer
  }
}

function recordOf(d: Delivery): ReplayRecord | undefined {
  const o = originalDelivery(d);
  return o instanceof ReplayDelivery ? o.record : undefined;
}

const encoder = new TextEncoder();
/** Room left for headers when a replay result is checked against max_payload. */
const REPLAY_HEADROOM_BYTES = 16 * 1024;

/**
 * The replay's {@link ResultSink}: results on `infer.replay.<session>.res.<tenant>.<id>`, dead
 * letters on `infer.replay.<session>.dlq.<tenant>.<model>`, both core NATS. Never the live
 * `infer.res` / `infer.dlq` subjects.
 */
export class ReplayResultSink implements ResultSink {
  constructor(
    private readonly nc: NatsConnection,
    readonly session: string,
  ) {
    if (!SESSION_RE.test(session)) throw new ReplayError("INVALID_ARGUMENT", `session '${session}' must be 1-64 of A-Z a-z 0-9 _ -`);
  }

  async publishResult(job: InferJob, result: InferResult): Promise<void> {
    const rec = recordOf(job.delivery);
    const h = natsHeaders();
    // No Nats-Msg-Id: a stream that keeps replay results would drop a second session's result
    // of the same request as a duplicate.
    h.set(H.status, result.status === "ok" ? "ok" : (result.error?.code ?? "INTERNAL"));
    if (job.traceparent) h.set(H.traceparent, job.traceparent);
    if (job.tracestate) h.set(H.tracestate, job.tracestate);
    h.set(H.contentType, "application/json");
    h.set(REPLAY_HEADERS.session, this.session);
    if (rec) {
      h.set(REPLAY_HEADERS.ofSeq, String(rec.seq));
      if (rec.originalTraceparent) h.set(REPLAY_HEADERS.ofTraceparent, sanitizeHeader(rec.originalTraceparent));
    }
    let data = encoder.encode(JSON.stringify(result));
    const limit = (this.nc.info?.max_payload ?? 1024 * 1024) - REPLAY_HEADROOM_BYTES;
    if (data.length > limit) {
      // Never written to the object store (that would replace the live result's object): the
      // message goes without the output; the report compares the whole result.
      const { output: _output, ...rest } = result;
      h.set(REPLAY_HEADERS.outputOmitted, `result of ${data.length} bytes is over the message size limit`);
      data = encoder.encode(JSON.stringify(rest));
    }
    this.nc.publish(replaySubjects.result(this.session, job.tenant, job.id), data, { headers: h });
    if (rec) rec.replayed = result;
  }

  /** True once this replay has published a result for the request (asked before a re-run publishes again). */
  async hasResult(job: InferJob): Promise<boolean> {
    return recordOf(job.delivery)?.replayed !== undefined;
  }

  async publishDeadLetter(letter: DeadLetter): Promise<void> {
    const { tenant, model } = deadLetterTokens(letter);
    // A body read from the object store is not copied: the letter keeps the reference.
    const d = letter.delivery;
    this.nc.publish(replaySubjects.dlq(this.session, tenant, model), d.wireData ?? d.data, { headers: deadLetterHeaders(letter) });
  }

}

// ---- the replay ---------------------------------------------------------------------------

/** One replayed request in the report (the `--json` line). */
export interface ReplayItem {
  /** The request id; `#<seq>` when the request has none. */
  id: string;
  seq: number;
  /** When the original was stored, ISO 8601. */
  time: string;
  tenant: string | null;
  model: string | null;
  original: ResultView | null;
  replayed: ResultView;
  verdict: Verdict;
  similarity?: Similarity;
  diff?: string[];
  /** The original request's `traceparent` (the link to its trace); null when it had none. */
  original_traceparent: string | null;
  traceparent: string;
  reruns: number;
}

export interface ReplayCounts {
  equal: number;
  different: number;
  missing: number;
  error: number;
}

export interface ReplayProgress {
  session: string;
  /** Requests selected (counted before the start). */
  selected: number;
  /** Requests with a verdict. */
  done: number;
  inFlight: number;
  counts: ReplayCounts;
  reruns: number;
  elapsedMs: number;
  /** Verdicts per second so far. */
  perSecond: number;
  /** The last report of the run. */
  finished: boolean;
}

export interface ReplayReport {
  session: string;
  selected: number;
  firstSeq: number | undefined;
  lastSeq: number | undefined;
  done: number;
  counts: ReplayCounts;
  reruns: number;
  /** Ids of the requests whose outputs changed, in completion order. */
  different: string[];
  /** Ids of the requests whose replay failed. */
  errors: string[];
  /** Target version; undefined: each request's original. */
  version: string | undefined;
  pace: Pace;
  elapsedMs: number;
  dryRun: boolean;
  /** Stopped by the signal before the selection was through. */
  aborted: boolean;
}

export interface ReplayOptions {
  selection: ReplaySelection;
  /** Run every request against this version; by default, the version of its recorded result, else the registry's routing. */
  version?: string;
  pace?: Pace;
  /** Names the result subjects; a new unique one by default. */
  session?: string;
  /** Count (and list through `onMatch`) only; run nothing. */
  dryRun?: boolean;
  /** Pipeline settings and static workers (default: the defaults, no static workers). */
  config?: SluiceConfig;
  /**
   * Route with this table (a running pipeline's `registry.table`) instead of opening and
   * watching the registry for the replay.
   */
  table?: ModelTable;
  /** Requests in the pipeline at once (default `config.pipeline.maxInFlight`). */
  maxInFlight?: number;
  /** Re-runs of a request whose attempt was naked (default {@link DEFAULT_MAX_RERUNS}). */
  maxReruns?: number;
  /** Opens worker connections; the gRPC client by default. */
  connectWorker?: (endpoint: string) => WorkerConnection;
  logger?: PipelineLogger;
  /** Each selected request, during the count (in stream order). */
  onMatch?: (r: SelectedRequest) => void;
  /** The count, before the replay starts. */
  onSelected?: (count: SelectionCount) => void;
  /** Each replayed request's verdict, as it completes. Must not throw. */
  onResult?: (item: ReplayItem) => void;
  /** Progress every `progressIntervalMs` and once at the end. Must not throw. */
  onProgress?: (p: ReplayProgress) => void;
  progressIntervalMs?: number;
  /** Stops taking new requests; what is in flight finishes and is reported. */
  signal?: AbortSignal;
}

/** Waits `ms`, or less when the signal aborts. */
function pause(ms: number, signal?: AbortSignal): Promise<void> {
  if (ms <= 0 || signal?.aborted) return Promise.resolve();
  return new Promise<void>((resolve) => {
    const done = (): void => {
      clearTimeout(t);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const t = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}

/** The request's headers as a replay presents them, for an injection at `nowMs`. */
function replayHeaders(m: JsMsg, session: string, traceparent: string, nowMs: number): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  const storedAt = m.info.timestampNanos / 1e6;
  for (const [k, vs] of m.headers ?? []) {
    const key = k.toLowerCase();
    // A new trace: the original's trace state belongs to the original trace.
    if (key === "traceparent" || key === "tracestate") continue;
    for (const v of vs) {
      // The deadline keeps its budget, counted from the injection instead of the original
      // store: an original that expired before it was served expires again.
      if (key === "infer-deadline" && DEADLINE_RE.test(v) && Number.isSafeInteger(Number(v))) {
        out.push([k, String(Math.max(1, Math.round(nowMs + Number(v) - storedAt)))]);
      } else out.push([k, v]);
    }
  }
  out.push([H.traceparent, traceparent]);
  out.push([REPLAY_HEADERS.session, session]);
  out.push([REPLAY_HEADERS.ofSeq, String(m.seq)]);
  const original = headerValue(m.headers, H.traceparent);
  if (original !== undefined) out.push([REPLAY_HEADERS.ofTraceparent, sanitizeHeader(original)]);
  return out;
}

async function recordedResult(jsm: JetStreamManager, store: PayloadStore, tenant: string | undefined, id: string | undefined): Promise<InferResult | undefined> {
  if (tenant === undefined || id === undefined || !TOKEN_RE.test(tenant) || !ID_RE.test(id)) return undefined;
  for (let attempt = 0; ; attempt++) {
    try {
      const m = await getStoredResult(jsm, tenant, id);
      // A large result is read whole from the object store (its message holds a reference).
      return m ? await resolveResult(store, tenant, id, (n) => m.header.get(n) || undefined, m.data, DEFAULT_MAX_OBJECT_BYTES) : undefined;
    } catch (err) {
      if (attempt >= 2) throw err;
    }
  }
}

/** Waits (briefly) until the directory has loaded the workers registered now, so the first requests find them. */
async function warmUp(nc: NatsConnection, directory: WorkerDirectory, ttlMs: number): Promise<void> {
  let expected = 0;
  try {
    const kv = await new Kvm(nc).open(WORKERS_BUCKET);
    for await (const k of await kv.keys()) {
      const e = await kv.get(k);
      if (e && e.operation === "PUT" && Date.now() - e.created.getTime() <= ttlMs) expected++;
    }
  } catch {
    return;
  }
  const deadline = Date.now() + DIRECTORY_WARMUP_MS;
  while (directory.list().length < expected && Date.now() < deadline) await pause(10);
}

/** A selected request read from the stream, its recorded result being looked up. */
interface Prepared {
  readonly msg: JsMsg;
  readonly tenant: string | undefined;
  readonly model: string | undefined;
  readonly id: string | undefined;
  recorded: InferResult | undefined;
  readonly ready: Promise<void>;
}

/**
 * Replays a selection of recorded requests (see the module comment). Resolves with the report
 * once every selected request has a verdict; rejects with a ReplayError when it cannot start.
 * Uses `nc` and leaves it open.
 */
export async function replay(nc: NatsConnection, options: ReplayOptions): Promise<ReplayReport> {
  const s = options.selection;
  validateSelection(s);
  if (options.version !== undefined && !VERSION_RE.test(options.version)) {
    throw new ReplayError("INVALID_ARGUMENT", `version '${options.version}' must be 1-64 of A-Z a-z 0-9 . _ -`);
  }
  const session = options.session ?? nuid.next();
  const sink = new ReplayResultSink(nc, session);
  const config = options.config ?? defaultConfig();
  const pace = options.pace ?? { kind: "max" };
  if (pace.kind === "rate" && !(pace.perSecond > 0)) throw new ReplayError("INVALID_ARGUMENT", "pace must be above 0 per second");
  const maxReruns = Math.max(0, Math.floor(options.maxReruns ?? DEFAULT_MAX_RERUNS));
  const maxInFlight = Math.max(1, Math.floor(options.maxInFlight ?? config.pipeline.maxInFlight));
  const log = options.logger ?? silentLogger;
  const signal = options.signal;
  const started = Date.now();

  const counted = await countSelection(nc, s, options.onMatch);
  const report: ReplayReport = {
    session,
    selected: counted.count,
    firstSeq: counted.firstSeq,
    lastSeq: counted.lastSeq,
    done: 0,
    counts: { equal: 0, different: 0, missing: 0, error: 0 },
    reruns: 0,
    different: [],
    errors: [],
    version: options.version,
    pace,
    elapsedMs: 0,
    dryRun: options.dryRun === true,
    aborted: false,
  };
  try {
    options.onSelected?.(counted);
  } catch {
    // a listener's failure is its own
  }
  if (options.dryRun || counted.firstSeq === undefined || counted.lastSeq === undefined) {
    report.elapsedMs = Date.now() - started;
    return report;
  }
  const range: ReadRange = { fromSeq: counted.firstSeq, toSeq: counted.lastSeq };

  const js = jetstream(nc);
  const jsm = await jetstreamManager(nc);
  const payloadStore = new PayloadStore(js);
  // The same registry and worker directory as live, with a pool of its own: the replay reaches
  // the same workers, but its batches and breakers do not mix with live traffic.
  const fleet = await openFleet(nc, {
    config,
    log,
    logPrefix: "replay ",
    ...(options.table ? { table: options.table } : {}),
    ...(options.connectWorker ? { connectWorker: options.connectWorker } : {}),
  });
  const { table, pool, directory } = fleet;
  let progressTimer: NodeJS.Timeout | undefined;
  /** Requests waiting out a nak's delay before their re-run. */
  const reruns = new Map<NodeJS.Timeout, ReplayRecord>();
  let onAbort: (() => void) | undefined;
  try {
    await warmUp(nc, directory, config.pipeline.workerTtlMs);

    // Credits: a request holds one from its injection to its verdict, re-runs included.
    let inFlight = 0;
    let firstInjectedAt: number | undefined;
    let failure: { error: unknown } | undefined;
    const waiters = new Set<{ ready: () => boolean; resolve: () => void }>();
    const wake = (): void => {
      for (const w of waiters)
        if (w.ready()) {
          waiters.delete(w);
          w.resolve();
        }
    };
    const until = (ready: () => boolean): Promise<void> =>
      ready() ? Promise.resolve() : new Promise<void>((resolve) => waiters.add({ ready, resolve }));

    const progress = (finished: boolean): void => {
      const elapsedMs = Date.now() - started;
      // The rate counts from the first injection, not from the count and the start-up.
      const runningMs = firstInjectedAt !== undefined ? Date.now() - firstInjectedAt : 0;
      try {
        options.onProgress?.({
          session,
          selected: report.selected,
          done: report.done,
          inFlight,
          counts: { ...report.counts },
          reruns: report.reruns,
          elapsedMs,
          perSecond: runningMs > 0 ? Math.round((report.done / runningMs) * 10_000) / 10 : 0,
          finished,
        });
      } catch {
        // a listener's failure is its own
      }
    };
    if (options.onProgress) {
      progressTimer = setInterval(() => progress(false), options.progressIntervalMs ?? DEFAULT_PROGRESS_INTERVAL_MS);
      progressTimer.unref();
    }

    const idOf = (rec: ReplayRecord): string => rec.id ?? `#${rec.seq}`;
    const failed = (rec: ReplayRecord, code: ErrorInfo["code"], message: string, more: Partial<InferResult> = {}): InferResult => ({
      id: idOf(rec),
      ...(rec.model !== undefined ? { model: rec.model } : {}),
      ...more,
      status: "error",
      error: { code, message },
    });

    const finalize = (rec: ReplayRecord, replayed: InferResult): void => {
      const original = rec.recorded ? viewOf(rec.recorded) : undefined;
      const mine = viewOf(replayed);
      const cmp = compareResults(original, mine);
      const item: ReplayItem = {
        id: idOf(rec),
        seq: rec.seq,
        time: new Date(rec.originalStoredAtMs).toISOString(),
        tenant: rec.tenant ?? null,
        model: rec.model ?? null,
        original: original ?? null,
        replayed: mine,
        verdict: cmp.verdict,
        ...(cmp.similarity ? { similarity: cmp.similarity } : {}),
        ...(cmp.diff ? { diff: cmp.diff } : {}),
        original_traceparent: rec.originalTraceparent ?? null,
        traceparent: rec.traceparent,
        reruns: rec.reruns,
      };
      report.done++;
      report.counts[cmp.verdict]++;
      if (cmp.verdict === "different") report.different.push(item.id);
      if (cmp.verdict === "error") report.errors.push(item.id);
      try {
        options.onResult?.(item);
      } catch {
        // a listener's failure is its own
      }
      inFlight--;
      wake();
    };

    /** Re-runs still waiting for their delay when the replay is stopped end as errors. */
    const dropReruns = (): void => {
      for (const [t, rec] of reruns) {
        clearTimeout(t);
        finalize(rec, failed(rec, "CANCELLED", `the replay stopped before re-run ${rec.reruns}`));
      }
      reruns.clear();
    };
    if (signal) {
      onAbort = () => {
        dropReruns();
        wake();
      };
      signal.addEventListener("abort", onAbort, { once: true });
    }

    const deliveries = new Subject<Delivery>();

    /** What became of one settled attempt: a verdict, or a re-run after the nak's delay. */
    const onSettled = (st: Settled): void => {
      const o = st.outcome;
      const d = originalDelivery(o.kind === "dead" ? o.delivery : o.job.delivery);
      if (!(d instanceof ReplayDelivery)) return;
      const rec = d.record;
      if (st.action !== "nak") {
        if (st.result) return finalize(rec, st.result);
        if (rec.replayed) return finalize(rec, rec.replayed);
        const why: ErrorInfo = o.kind === "dead" ? o.error : { code: "INTERNAL", message: "settled without a result" };
        return finalize(rec, failed(rec, why.code, `dead-lettered: ${why.message}`));
      }
      if (rec.reruns < maxReruns && !signal?.aborted) {
        rec.reruns++;
        report.reruns++;
        const t = setTimeout(() => {
          reruns.delete(t);
          deliveries.next(new ReplayDelivery(rec, rec.reruns + 1));
        }, d.settlement?.delayMs ?? 0);
        reruns.set(t, rec);
        return;
      }
      const last: ErrorInfo =
        o.kind === "retry" && o.lastResort.error
          ? o.lastResort.error
          : { code: "UNAVAILABLE", message: st.error !== undefined ? `publishing the result failed: ${(st.error as Error)?.message ?? st.error}` : "retry asked" };
      const version = o.kind !== "dead" ? o.job.version : undefined;
      finalize(rec, failed(rec, last.code, `${last.message} (gave up after ${rec.reruns} re-run${rec.reruns === 1 ? "" : "s"})`, version ? { version } : {}));
    };

    const route = (job: InferJob): RouteDecision => {
      if (options.version !== undefined) return { ok: true, version: options.version };
      const v = recordOf(job.delivery)?.recorded?.version;
      if (v !== undefined && VERSION_RE.test(v)) return { ok: true, version: v };
      return table.resolve(job.model, job.pinnedVersion, job.id);
    };

    const pipelineDone = new Promise<void>((resolve) => {
      deliveries
        .pipe(
          inferencePipeline({
            table,
            dispatcher: pool,
            sink,
            route,
            // Streamed requests and generative models take the Generate path, as live; their
            // chunks go to the session's subjects.
            generator: pool,
            publishChunk: (job, c) => {
              nc.publish(replaySubjects.tokens(session, job.tenant, job.id), JSON.stringify({ id: job.id, seq: c.seq, text: c.text }));
            },
            maxPayloadBytes: config.pipeline.maxPayloadBytes,
            // Bodies held in the object store are read as live (never noted or written: read only).
            resolveBodies: resolveRequestBodies({
              read: (tenant, key, digest) => payloadStore.read(tenant, key, { maxBytes: config.payloads.maxObjectBytes, digest }),
              gate: new ByteGate(config.payloads.memoryBytes),
              maxDeliver: maxReruns + 1,
              retryDelayMs: () => config.pipeline.retryBaseMs,
            }),
            // The last allowed re-run ends in the pipeline's own last-resort answer.
            maxDeliver: maxReruns + 1,
            publishConcurrency: config.pipeline.publishConcurrency,
            retryBaseMs: config.pipeline.retryBaseMs,
            retryMaxMs: config.pipeline.retryMaxMs,
          }),
        )
        .subscribe({
          next: onSettled,
          error: (error: unknown) => {
            failure = { error };
            wake();
            resolve();
          },
          complete: () => resolve(),
        });
    });

    // Pacing: when each request may go, relative to the first one.
    let firstStoredAt: number | undefined;
    let pacedFrom = 0;
    let index = 0;
    const paceFor = async (storedAtMs: number): Promise<void> => {
      if (firstStoredAt === undefined) {
        firstStoredAt = storedAtMs;
        pacedFrom = Date.now();
      }
      const at =
        pace.kind === "original"
          ? pacedFrom + (storedAtMs - firstStoredAt)
          : pace.kind === "rate"
            ? pacedFrom + (index * 1000) / pace.perSecond
            : 0;
      index++;
      await pause(at - Date.now(), signal);
    };

    const stopped = (): boolean => signal?.aborted === true || failure !== undefined;
    const matches = matcher(s);
    const queue: Prepared[] = [];
    const prepare = (msg: JsMsg): void => {
      const parts = subjectParts(msg.subject);
      const p: Prepared = {
        msg,
        tenant: parts.tenant,
        model: parts.model,
        id: headerValue(msg.headers, H.msgId),
        recorded: undefined,
        ready: Promise.resolve(),
      };
      (p as { ready: Promise<void> }).ready = recordedResult(jsm, payloadStore, p.tenant, p.id).then(
        (r) => void (p.recorded = r),
        (err: unknown) => log.warn(`replay: cannot look up the recorded result of '${p.id}': ${(err as Error)?.message ?? err}`),
      );
      queue.push(p);
    };
    const injectNext = async (): Promise<void> => {
      const p = queue.shift()!;
      await p.ready;
      await paceFor(p.msg.info.timestampNanos / 1e6);
      await until(() => inFlight < maxInFlight || stopped());
      if (stopped()) return;
      const now = Date.now();
      const originalTraceparent = headerValue(p.msg.headers, H.traceparent);
      const traceparent = newTraceparent(originalTraceparent);
      const rec: ReplayRecord = {
        seq: p.msg.seq,
        subject: p.msg.subject,
        data: p.msg.data,
        headers: replayHeaders(p.msg, session, traceparent, now),
        id: p.id,
        tenant: p.tenant,
        model: p.model,
        originalStoredAtMs: p.msg.info.timestampNanos / 1e6,
        originalTraceparent,
        traceparent,
        recorded: p.recorded,
        injectedAtMs: now,
        reruns: 0,
        replayed: undefined,
      };
      inFlight++;
      firstInjectedAt ??= now;
      deliveries.next(new ReplayDelivery(rec, 1));
    };

    try {
      for await (const m of readRequests(js, s, range, false)) {
        if (stopped()) break;
        if (!matches(m)) continue;
        prepare(m);
        if (queue.length >= LOOKAHEAD) await injectNext();
      }
      while (queue.length > 0 && !stopped()) await injectNext();
    } finally {
      // Lookups still running are let finish (they only log), so nothing runs after the return.
      await Promise.all(queue.map((p) => p.ready));
      queue.length = 0;
    }
    if (signal?.aborted) dropReruns();
    await until(() => inFlight === 0 || failure !== undefined);
    deliveries.complete();
    await pipelineDone;
    if (failure !== undefined) throw failure.error;
    await nc.flush();
    report.aborted = signal?.aborted === true && report.done < report.selected;
    report.elapsedMs = Date.now() - started;
    progress(true);
    return report;
  } finally {
    if (onAbort) signal?.removeEventListener("abort", onAbort);
    if (progressTimer) clearInterval(progressTimer);
    for (const t of reruns.keys()) clearTimeout(t);
    await fleet.stop();
  }
}
