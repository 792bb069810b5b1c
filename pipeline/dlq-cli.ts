/**
 * `sluice dlq`: list, show and requeue dead letters (see `dlq.ts`). Results go to stdout (a
 * table, or JSON lines with `--json`); errors to stderr.
 */
import { parseArgs } from "node:util";
import type { NatsConnection } from "@nats-io/transport-node";
import { DEFAULT_NATS_URL } from "./config.js";
import { DlqError, listDeadLetters, requeueDeadLetters, showDeadLetter, type DeadLetterEntry, type RequeueItem, type RequeueSelector } from "./tools/dlq.js";
import { connectNats } from "./connection.js";

const DEFAULT_LIST_LIMIT = 100;

export const DLQ_USAGE = `usage: sluice dlq <command> [options]

Dead letters: requests that could not be served (stream INFER_DLQ, subjects infer.dlq.<tenant>.<model>).

commands:
  list [--tenant T] [--model M] [--code C] [--limit N] [--json]
        the oldest first; --limit defaults to ${DEFAULT_LIST_LIMIT}
  show <seq> [--json]
        one entry: its headers and body (text, or base64 when not UTF-8)
  requeue (--id ID[,ID...] | --seq N[,N...] | --tenant T | --model M | --all) [--dry-run] [--json]
        publish each selected request again on its original subject, with its own request id
        (the client's answer arrives where it waits), then remove it from the DLQ. An entry whose
        id is still inside a duplicate window (INFER_REQ, INFER_RES; 2 min by default) is not
        requeued yet: it is reported with the time from which a requeue works. Entries without a
        usable request id, or already answered ok, are skipped.
        --id, --seq, --tenant and --model combine (every one must hold).

options:
  --server URL   NATS server (default: $NATS_URL or ${DEFAULT_NATS_URL})
  --json         JSON lines instead of a table

exit status: 0 done; 1 show: no such entry, requeue: some entries failed or are not requeued
yet; 2 bad usage
`;

class UsageError extends Error {
  override readonly name = "UsageError";
}

function serverOf(v: { server?: string | undefined }): string[] {
  const s = v.server ?? process.env["NATS_URL"] ?? DEFAULT_NATS_URL;
  return s.split(",").map((x) => x.trim());
}

function list(v: string | undefined): string[] | undefined {
  if (v === undefined) return undefined;
  const xs = v
    .split(",")
    .map((x) => x.trim())
    .filter(Boolean);
  return xs.length > 0 ? xs : undefined;
}

function count(v: string | undefined, name: string): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!/^\d+$/.test(v.trim()) || !Number.isSafeInteger(n) || n < 1) throw new UsageError(`${name} must be an integer >= 1, got '${v}'`);
  return n;
}

/** Runs `sluice dlq`; resolves with the exit status. */
export async function cmdDlq(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      strict: true,
      options: {
        server: { type: "string" },
        help: { type: "boolean", short: "h" },
        tenant: { type: "string", short: "t" },
        model: { type: "string", short: "m" },
        code: { type: "string" },
        limit: { type: "string" },
        id: { type: "string" },
        seq: { type: "string" },
        all: { type: "boolean" },
        "dry-run": { type: "boolean" },
        json: { type: "boolean" },
      },
    });
  } catch (err) {
    console.error(`sluice dlq: ${(err as Error).message}\n\n${DLQ_USAGE}`);
    return 2;
  }
  const v = parsed.values;
  const [sub, ...rest] = parsed.positionals;
  if (v.help || sub === undefined || sub === "help") {
    console.log(DLQ_USAGE);
    return sub === undefined && !v.help ? 2 : 0;
  }
  const json = v.json === true;

  let run: (nc: NatsConnection) => Promise<number>;
  try {
    const extra = sub === "show" ? rest.slice(1) : rest;
    if (extra.length > 0) throw new UsageError(`unexpected argument '${extra[0]}'`);
    const requeueOnly = (["id", "seq", "all", "dry-run"] as const).filter((k) => v[k] !== undefined);
    switch (sub) {
      case "list": {
        if (requeueOnly.length > 0) throw new UsageError(`--${requeueOnly[0]} belongs to 'dlq requeue'`);
        const limit = count(v.limit, "--limit") ?? DEFAULT_LIST_LIMIT;
        const filter = { ...(v.tenant ? { tenant: v.tenant } : {}), ...(v.model ? { model: v.model } : {}), ...(v.code ? { code: v.code } : {}) };
        run = async (nc) => {
          // One more than shown, to say whether more follow.
          const entries = await listDeadLetters(nc, { ...filter, limit: limit + 1 });
          const shown = entries.slice(0, limit);
          if (json) for (const e of shown) console.log(JSON.stringify(e));
          else {
            console.log(["seq", "time", "tenant", "model", "request_id", "code", "deliveries", "reason"].join("\t"));
            for (const e of shown) console.log(entryLine(e));
            if (entries.length > limit) console.log(`(the first ${limit}; more follow: --limit N)`);
            else console.log(`${shown.length} dead letter${shown.length === 1 ? "" : "s"}`);
          }
          return 0;
        };
        break;
      }
      case "show": {
        const seqArg = rest[0];
        if (seqArg === undefined) throw new UsageError("dlq show needs a sequence number (from dlq list)");
        const seq = count(seqArg, "seq")!;
        run = async (nc) => {
          const d = await showDeadLetter(nc, seq);
          if (!d) {
            console.error(`sluice dlq: no dead letter at seq ${seq}`);
            return 1;
          }
          if (json) {
            console.log(JSON.stringify(d));
            return 0;
          }
          const row = (k: string, x: string | number | undefined): void => console.log(`${k.padEnd(18)}${x ?? "-"}`);
          row("seq", d.seq);
          row("time", d.time.toISOString());
          row("subject", d.subject);
          row("request id", d.requestId);
          row("code", d.code);
          row("reason", d.reason);
          row("deliveries", d.deliveries);
          row("original subject", d.originalSubject);
          row("original seq", d.originalSeq);
          console.log("headers:");
          for (const [k, x] of d.headers) console.log(`  ${k}: ${x}`);
          console.log(`body (${d.size} bytes${d.bodyEncoding === "base64" ? ", not UTF-8: base64" : ""}):`);
          console.log(d.body);
          return 0;
        };
        break;
      }
      case "requeue": {
        if (v.code !== undefined || v.limit !== undefined) throw new UsageError(`--${v.code !== undefined ? "code" : "limit"} belongs to 'dlq list'`);
        const selector: RequeueSelector = {};
        const ids = list(v.id);
        if (ids) selector.ids = ids;
        const seqs = list(v.seq)?.map((s) => count(s, "--seq")!);
        if (seqs) selector.seqs = seqs;
        if (v.tenant) selector.tenant = v.tenant;
        if (v.model) selector.model = v.model;
        if (v.all) selector.all = true;
        const dryRun = v["dry-run"] === true;
        run = async (nc) => {
          const report = await requeueDeadLetters(nc, selector, {
            dryRun,
            onItem: (item) => console.log(json ? JSON.stringify(item) : itemLine(item)),
          });
          const { selected, requeued, wouldRequeue, duplicates, skipped, failed } = report;
          if (json) console.log(JSON.stringify({ summary: { selected, requeued, wouldRequeue, duplicates, skipped, failed, dryRun } }));
          else {
            const done = dryRun ? `would requeue ${wouldRequeue}` : `requeued ${requeued}`;
            console.log(`${selected} selected: ${done}, not yet (duplicate window) ${duplicates}, skipped ${skipped}, failed ${failed}${dryRun ? " (dry run: nothing changed)" : ""}`);
          }
          return failed + duplicates > 0 ? 1 : 0;
        };
        break;
      }
      default:
        throw new UsageError(`unknown dlq command '${sub}'`);
    }
  } catch (err) {
    if (err instanceof UsageError) {
      console.error(`sluice dlq: ${err.message}\n\n${DLQ_USAGE}`);
      return 2;
    }
    throw err;
  }

  const nc = await connectNats(serverOf(v), "sluice-dlq");
  try {
    return await run(nc);
  } catch (err) {
    if (err instanceof DlqError) {
      console.error(`sluice dlq: ${err.message}`);
      return err.code === "INVALID_ARGUMENT" ? 2 : 1;
    }
    throw err;
  } finally {
    await nc.close().catch(() => undefined);
  }
}

function entryLine(e: DeadLetterEntry): string {
  return [e.seq, e.time.toISOString(), e.tenant, e.model, e.requestId ?? "-", e.code ?? "-", e.deliveries ?? "-", e.reason ?? "-"].join("\t");
}

function itemLine(i: RequeueItem): string {
  const what = i.action === "duplicate" ? "not yet" : i.action;
  const head = `${what.padEnd(14)}seq ${i.seq}  id ${i.requestId ?? "-"}${i.subject ? `  → ${i.subject}` : ""}`;
  return i.reason ? `${head}\n  ${i.reason}` : head;
}
