/**
 * `sluice replay`: re-run recorded requests through the pipeline and compare the results with
 * the recorded ones (see `../replay.ts`). The report goes to stdout (a table, or JSON lines with
 * `--json`); progress goes to stderr, as a bar on a terminal, otherwise as periodic lines.
 */
import type { Command } from "commander";
import type { Priority } from "../../proto/wire.js";
import { SESSION_RE } from "../../proto/wire.js";
import { ConfigError, loadConfig, parseWorkerList } from "../config.js";
import {
  DEFAULT_MAX_RERUNS,
  formatPace,
  parsePace,
  parseTimeSpec,
  replay,
  ReplayError,
  type ReplayItem,
  type ReplayProgress,
  type ReplayReport,
  type ReplaySelection,
  type SelectedRequest,
} from "../tools/replay/mod.js";
import { CliError, connectCli, EXIT_USAGE, serverOption, serversOf, UsageError } from "./common.js";
import { main, type CliContext } from "./program.js";

const REPLAY_HELP = `Re-runs recorded requests from INFER_REQ through the pipeline and compares each new result
with the recorded one (INFER_RES): equal, different, missing (nothing recorded) or error.
Results go to infer.replay.<session>.res.<tenant>.<id>, never to the live infer.res subjects.
Every selection criterion given must hold.
`;

const DEFAULT_MAX_DIFFS = 20;
const DEFAULT_PROGRESS_EVERY_MS = 5_000;
const TTY_REDRAW_MS = 200;
const BAR_WIDTH = 24;

function list(v: unknown): string[] | undefined {
  if (typeof v !== "string") return undefined;
  const xs = v
    .split(",")
    .map((x) => x.trim())
    .filter(Boolean);
  return xs.length > 0 ? xs : undefined;
}

function count(v: unknown, name: string, min = 0): number | undefined {
  if (typeof v !== "string") return undefined;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < min) throw new ConfigError(`--${name} must be an integer >= ${min}, got '${v}'`);
  return n;
}

function durationMs(v: unknown, name: string): number | undefined {
  if (typeof v !== "string") return undefined;
  const m = /^(\d+(?:\.\d+)?)(ms|s|m)?$/.exec(v.trim());
  if (!m || Number(m[1]) <= 0) throw new ConfigError(`--${name} must be a duration like 500ms, 5s or 1m, got '${v}'`);
  return Number(m[1]) * (m[2] === "m" ? 60_000 : m[2] === "ms" ? 1 : 1_000);
}

/** Runs `sluice replay ARGS` in this process; resolves with the exit status. */
export function cmdReplay(args: string[]): Promise<number> {
  return main(["replay", ...args]);
}

interface ReplayCliOptions {
  server?: string;
  since?: string;
  until?: string;
  fromSeq?: string;
  toSeq?: string;
  tenant?: string;
  model?: string;
  priority?: string;
  id?: string;
  traceId?: string;
  dryRun?: boolean;
  version?: string;
  pace?: string;
  json?: boolean;
  session?: string;
  maxDiffs?: string;
  maxInFlight?: string;
  maxReruns?: string;
  progressEvery?: string;
  config?: string;
  workers?: string;
}

export function addReplayCommand(program: Command, ctx: CliContext): void {
  program
    .command("replay")
    .description("re-run recorded requests against a model version and compare the results")
    .summary("re-run recorded requests and compare (--help)")
    .usage("[selection] [options]")
    .option("--since <time>", "stored at or after TIME: ISO 8601, or a duration ago (30s, 15m, 2h, 7d, 1h30m)")
    .option("--until <time>", "stored at or before TIME (same forms)")
    .option("--from-seq <n>", "INFER_REQ stream sequence >= N")
    .option("--to-seq <n>", "INFER_REQ stream sequence <= N")
    .option("-t, --tenant <tenants>", "tenants, comma-separated")
    .option("-m, --model <models>", "models, comma-separated")
    .option("--priority <priorities>", "high|normal|low, comma-separated")
    .option("--id <ids>", "request ids, comma-separated")
    .option("--trace-id <hex>", "the trace id (32 hex digits) of the request's traceparent")
    .option("--dry-run", "count and list the selection (id, seq, time, tenant, model); run nothing")
    .option("--version <v>", "run against version V (default: the version of each recorded result, else the registry's routing)")
    .option("--pace <pace>", "max (default) | original (the recorded spacing) | N/s")
    .option("--json", 'one JSON object per replayed request per line, then {"summary": {...}}')
    .option("--session <name>", "names the result subjects (default: a new unique name)")
    .option("--max-diffs <n>", `differing or failed requests shown in the report (default ${DEFAULT_MAX_DIFFS})`)
    .option("--max-in-flight <n>", "requests replayed at once (default: pipeline.maxInFlight)")
    .option("--max-reruns <n>", `re-runs of a request whose attempt asked to be retried (default ${DEFAULT_MAX_RERUNS})`)
    .option("--progress-every <d>", "period of progress lines when stderr is not a terminal (default 5s)")
    .option("-c, --config <file>", "sluice configuration (pipeline settings, static workers)")
    .option("--workers <list>", "model@version=host:port[*capacity],... besides the registered workers")
    .addOption(serverOption())
    .addHelpText("before", REPLAY_HELP)
    .addHelpText("after", "\nexit status: 0 every request equal or missing, 1 some different or failed, 2 bad usage")
    .action(async (o: ReplayCliOptions) => {
      ctx.exitCode = await runReplay(o);
    });
}

async function runReplay(v: ReplayCliOptions): Promise<number> {
  let selection: ReplaySelection;
  let options: {
    pace: ReturnType<typeof parsePace>;
    maxDiffs: number;
    maxInFlight: number | undefined;
    maxReruns: number | undefined;
    progressEveryMs: number;
  };
  try {
    const now = Date.now();
    selection = {};
    if (v.since !== undefined) selection.since = parseTimeSpec(v.since, now);
    if (v.until !== undefined) selection.until = parseTimeSpec(v.until, now);
    const fromSeq = count(v.fromSeq, "from-seq", 1);
    if (fromSeq !== undefined) selection.fromSeq = fromSeq;
    const toSeq = count(v.toSeq, "to-seq", 1);
    if (toSeq !== undefined) selection.toSeq = toSeq;
    const tenants = list(v.tenant);
    if (tenants) selection.tenants = tenants;
    const models = list(v.model);
    if (models) selection.models = models;
    const priorities = list(v.priority);
    if (priorities) selection.priorities = priorities as Priority[];
    const ids = list(v.id);
    if (ids) selection.ids = ids;
    if (v.traceId !== undefined) selection.traceId = v.traceId;
    if (v.session !== undefined && !SESSION_RE.test(v.session)) throw new ConfigError(`--session must be 1-64 of A-Z a-z 0-9 _ -`);
    options = {
      pace: parsePace(v.pace ?? "max"),
      maxDiffs: count(v.maxDiffs, "max-diffs") ?? DEFAULT_MAX_DIFFS,
      maxInFlight: count(v.maxInFlight, "max-in-flight", 1),
      maxReruns: count(v.maxReruns, "max-reruns"),
      progressEveryMs: durationMs(v.progressEvery, "progress-every") ?? DEFAULT_PROGRESS_EVERY_MS,
    };
  } catch (err) {
    if (err instanceof ConfigError || err instanceof ReplayError) throw new UsageError(err.message);
    throw err;
  }

  const servers = serversOf(v);
  const config = loadConfig({ ...(v.config ? { file: v.config } : {}), overrides: { servers } });
  if (v.workers) config.workers.push(...parseWorkerList(v.workers));

  const json = v.json === true;
  const dryRun = v.dryRun === true;
  const out = (line: string): boolean => process.stdout.write(`${line}\n`);
  const err = (line: string): boolean => process.stderr.write(`${line}\n`);
  const progress = new ProgressView(process.stderr, options.progressEveryMs);
  const shown: ReplayItem[] = [];
  let hidden = 0;

  const stop = new AbortController();
  const onSignal = (sig: NodeJS.Signals): void => {
    err(`sluice replay: ${sig}: finishing the requests in flight (again to quit at once)`);
    stop.abort();
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);

  if (dryRun && !json) out(["id", "seq", "time", "tenant", "model"].join("\t"));
  const nc = await connectCli(config.servers, "sluice-replay");
  let report: ReplayReport;
  try {
    report = await replay(nc, {
      selection,
      ...(v.version !== undefined ? { version: v.version } : {}),
      pace: options.pace,
      ...(v.session !== undefined ? { session: v.session } : {}),
      dryRun,
      config,
      ...(options.maxInFlight !== undefined ? { maxInFlight: options.maxInFlight } : {}),
      ...(options.maxReruns !== undefined ? { maxReruns: options.maxReruns } : {}),
      logger: { info: () => undefined, warn: (m) => progress.print(() => err(`sluice replay: ${m}`)), error: (m) => progress.print(() => err(`sluice replay: ${m}`)) },
      signal: stop.signal,
      onMatch: dryRun ? (r) => out(json ? JSON.stringify(selectedJson(r)) : selectedLine(r)) : undefined,
      onSelected: (c) => {
        if (dryRun) return;
        const target = v.version !== undefined ? `version ${v.version}` : "the original versions";
        const seqs = c.firstSeq !== undefined ? ` (INFER_REQ seq ${c.firstSeq}-${c.lastSeq})` : "";
        err(`sluice replay: ${c.count} request${c.count === 1 ? "" : "s"} selected${seqs}; replaying against ${target}, pace ${formatPace(options.pace)}`);
      },
      onResult: (item) => {
        if (json) progress.print(() => out(JSON.stringify(item)), true);
        else if (item.verdict === "different" || item.verdict === "error") {
          if (shown.length < options.maxDiffs) shown.push(item);
          else hidden++;
        }
      },
      onProgress: (p) => progress.update(p),
      progressIntervalMs: progress.intervalMs,
    });
  } catch (e) {
    if (!(e instanceof ReplayError)) throw e;
    progress.end();
    throw new CliError(e.message, e.code === "INVALID_ARGUMENT" ? EXIT_USAGE : 1, { cause: e });
  } finally {
    progress.end();
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    await nc.drain().catch(() => undefined);
  }

  if (dryRun) {
    if (json) out(JSON.stringify({ summary: { selected: report.selected, first_seq: report.firstSeq ?? null, last_seq: report.lastSeq ?? null } }));
    else out(`${report.selected} request${report.selected === 1 ? "" : "s"} selected`);
    return 0;
  }
  if (json) out(JSON.stringify({ summary: summaryJson(report) }));
  else {
    for (const item of shown) out(itemText(item));
    if (hidden > 0) out(`... and ${hidden} more (--max-diffs, or --json for all)\n`);
    out(summaryTable(report));
  }
  return report.counts.different + report.counts.error > 0 ? 1 : 0;
}

function selectedJson(r: SelectedRequest): Record<string, unknown> {
  return { id: r.id ?? null, seq: r.seq, time: r.time.toISOString(), tenant: r.tenant ?? null, model: r.model ?? null, priority: r.priority ?? null };
}

function selectedLine(r: SelectedRequest): string {
  return [r.id ?? "-", r.seq, r.time.toISOString(), r.tenant ?? "-", r.model ?? "-"].join("\t");
}

function summaryJson(r: ReplayReport): Record<string, unknown> {
  return {
    session: r.session,
    selected: r.selected,
    replayed: r.done,
    ...r.counts,
    reruns: r.reruns,
    version: r.version ?? "original",
    pace: formatPace(r.pace),
    elapsed_ms: r.elapsedMs,
    aborted: r.aborted,
  };
}

function itemText(item: ReplayItem): string {
  const where = `seq ${item.seq}  ${item.tenant ?? "-"}/${item.model ?? "-"}@${item.replayed.version ?? "?"}`;
  if (item.verdict === "error") {
    const e = item.replayed.error;
    return `error      ${item.id}  ${where}\n  ${e ? `${e.code}: ${e.message}` : "failed"}\n`;
  }
  const sim = item.similarity ? `  similarity ${item.similarity.value.toFixed(3)} (${item.similarity.metric})` : "";
  return `different  ${item.id}  ${where}${sim}\n${(item.diff ?? []).map((l) => `  ${l}`).join("\n")}\n`;
}

function summaryTable(r: ReplayReport): string {
  const pct = (n: number): string => (r.done > 0 ? ((100 * n) / r.done).toFixed(1) : "0.0");
  const row = (name: string, n: number, p: string): string => `${name.padEnd(10)}${String(n).padStart(10)}${p.padStart(8)}`;
  const lines = [
    `replay ${r.session}: ${r.done} of ${r.selected} requests against ${r.version ?? "their original versions"}, pace ${formatPace(r.pace)}, ${(r.elapsedMs / 1000).toFixed(1)} s${r.aborted ? " (stopped early)" : ""}`,
    `${"verdict".padEnd(10)}${"count".padStart(10)}${"%".padStart(8)}`,
    row("equal", r.counts.equal, pct(r.counts.equal)),
    row("different", r.counts.different, pct(r.counts.different)),
    row("missing", r.counts.missing, pct(r.counts.missing)),
    row("error", r.counts.error, pct(r.counts.error)),
    row("total", r.done, r.done > 0 ? "100.0" : "0.0"),
  ];
  if (r.reruns > 0) lines.push(`(${r.reruns} re-run${r.reruns === 1 ? "" : "s"} after naks)`);
  return lines.join("\n");
}

/** Progress on stderr: a bar redrawn in place on a terminal, periodic lines otherwise. */
class ProgressView {
  readonly intervalMs: number;
  private drawn = false;
  private last: ReplayProgress | undefined;

  constructor(
    private readonly stream: NodeJS.WriteStream,
    everyMs: number,
  ) {
    this.intervalMs = stream.isTTY ? TTY_REDRAW_MS : everyMs;
  }

  update(p: ReplayProgress): void {
    this.last = p;
    const c = p.counts;
    const pct = p.selected > 0 ? Math.floor((100 * p.done) / p.selected) : 100;
    const tail = `${p.done}/${p.selected} ${pct}% ${p.perSecond}/s  equal ${c.equal} different ${c.different} missing ${c.missing} error ${c.error}`;
    if (this.stream.isTTY) {
      const filled = p.selected > 0 ? Math.round((BAR_WIDTH * p.done) / p.selected) : BAR_WIDTH;
      const line = `replay [${"#".repeat(filled)}${"-".repeat(BAR_WIDTH - filled)}] ${tail}`;
      const width = this.stream.columns > 0 ? this.stream.columns - 1 : line.length;
      this.stream.write(`\r${line.slice(0, width)}\x1b[K`);
      this.drawn = true;
      if (p.finished) this.end();
    } else {
      this.stream.write(`sluice replay: ${p.finished ? "done " : ""}${tail}\n`);
    }
  }

  /** Prints something else without tearing the bar (`toStdout`: only when stdout is the same terminal). */
  print(f: () => void, toStdout = false): void {
    if (this.drawn && this.stream.isTTY && (!toStdout || process.stdout.isTTY)) {
      this.stream.write("\r\x1b[K");
      f();
      if (this.last && !this.last.finished) this.update(this.last);
    } else f();
  }

  end(): void {
    if (this.drawn && this.stream.isTTY) this.stream.write("\n");
    this.drawn = false;
  }
}
