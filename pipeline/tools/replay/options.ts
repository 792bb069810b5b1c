/** What a replay is asked to do and what it reports: options, pace and time specs (as the CLI takes them), the report's shapes. */
import { type SluiceConfig } from "../../config.js";
import type { ModelTable } from "../../routing/registry.js";
import { type PipelineLogger } from "../../support/logger.js";
import type { WorkerConnection } from "../../workers/mod.js";
import { type Similarity } from "../text-compare.js";
import type { ResultView, Verdict } from "./compare.js";
import type { ReplaySelection, SelectedRequest, SelectionCount } from "./selection.js";
import { CodedError } from "../../../proto/coded-error.js";

/** Re-runs of one request after naks, by default. */
export const DEFAULT_MAX_RERUNS = 10;

export const DEFAULT_PROGRESS_INTERVAL_MS = 1_000;

/** A replay that cannot start (bad selection, missing stream): `code` is PROTOCOL.md's. */
export class ReplayError extends CodedError<"INVALID_ARGUMENT" | "NOT_FOUND" | "UNAVAILABLE"> {
  override readonly name = "ReplayError";
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
