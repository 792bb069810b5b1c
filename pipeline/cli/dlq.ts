/**
 * `sluice dlq`: list, show and requeue dead letters (see `dlq.ts`). Results go to stdout (a
 * table, or JSON lines with `--json`); errors to stderr.
 */
import type { Command } from "commander";
import { DlqError, listDeadLetters, showDeadLetter, type DeadLetterEntry } from "../tools/dlq.js";
import { requeueDeadLetters, type RequeueItem, type RequeueSelector } from "../tools/dlq-requeue.js";
import { CliError, EXIT_USAGE, positive, serverOption, UsageError, withNats, type ServerOpts } from "./common.js";
import { main, type CliContext } from "./program.js";

const DEFAULT_LIST_LIMIT = 100;

const DLQ_HELP = `
Dead letters: requests that could not be served (stream INFER_DLQ, subjects infer.dlq.<tenant>.<model>).

exit status: 0 done; 1 show: no such entry, requeue: some entries failed or are not requeued
yet; 2 bad usage`;

const REQUEUE_HELP = `
Publishes each selected request again on its original subject, with its own request id (the
client's answer arrives where it waits), then removes it from the DLQ. An entry whose id is still
inside a duplicate window (INFER_REQ, INFER_RES; 2 min by default) is not requeued yet: it is
reported with the time from which a requeue works. Entries without a usable request id, or
already answered ok, are skipped. --id, --seq, --tenant and --model combine (every one must hold).`;

/** Runs `sluice dlq ARGS` in this process; resolves with the exit status. */
export function cmdDlq(args: string[]): Promise<number> {
  return main(["dlq", ...args]);
}

function list(v: string | undefined): string[] | undefined {
  const xs = v
    ?.split(",")
    .map((x) => x.trim())
    .filter(Boolean);
  return xs && xs.length > 0 ? xs : undefined;
}

/** DLQ tool errors: a bad selector is a usage mistake. */
function dlqFailure(err: unknown): unknown {
  if (err instanceof DlqError) return new CliError(err.message, err.code === "INVALID_ARGUMENT" ? EXIT_USAGE : 1, { cause: err });
  return err;
}

export function addDlqCommand(program: Command, ctx: CliContext): void {
  const dlq = program.command("dlq").description("dead letters: list | show <seq> | requeue (--id|--seq|--tenant|--model|--all)").addHelpText("after", DLQ_HELP);

  dlq
    .command("list")
    .description("dead letters, the oldest first")
    .option("-t, --tenant <tenant>", "only this tenant's")
    .option("-m, --model <model>", "only this model's")
    .option("--code <code>", "only those with this error code")
    .option("--limit <n>", `at most this many (default ${DEFAULT_LIST_LIMIT})`, positive)
    .option("--json", "JSON lines instead of a table")
    .addOption(serverOption())
    .action(async (o: ServerOpts & { tenant?: string; model?: string; code?: string; limit?: number; json?: boolean }) => {
      const limit = o.limit ?? DEFAULT_LIST_LIMIT;
      const filter = { ...(o.tenant ? { tenant: o.tenant } : {}), ...(o.model ? { model: o.model } : {}), ...(o.code ? { code: o.code } : {}) };
      await withNats(o, async (nc) => {
        // One more than shown, to say whether more follow.
        const entries = await listDeadLetters(nc, { ...filter, limit: limit + 1 }).catch((err: unknown) => {
          throw dlqFailure(err);
        });
        const shown = entries.slice(0, limit);
        if (o.json) for (const e of shown) console.log(JSON.stringify(e));
        else {
          console.log(["seq", "time", "tenant", "model", "request_id", "code", "deliveries", "reason"].join("\t"));
          for (const e of shown) console.log(entryLine(e));
          if (entries.length > limit) console.log(`(the first ${limit}; more follow: --limit N)`);
          else console.log(`${shown.length} dead letter${shown.length === 1 ? "" : "s"}`);
        }
      });
      ctx.exitCode = 0;
    });

  dlq
    .command("show")
    .description("one entry: its headers and body (text, or base64 when not UTF-8)")
    .argument("<seq>", "its sequence number (from dlq list)", positive)
    .option("--json", "one JSON object instead of text")
    .addOption(serverOption())
    .action(async (seq: number, o: ServerOpts & { json?: boolean }) => {
      await withNats(o, async (nc) => {
        const d = await showDeadLetter(nc, seq).catch((err: unknown) => {
          throw dlqFailure(err);
        });
        if (!d) throw new CliError(`no dead letter at seq ${seq}`);
        if (o.json) {
          console.log(JSON.stringify(d));
          return;
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
      });
      ctx.exitCode = 0;
    });

  dlq
    .command("requeue")
    .description("publish selected requests again under their own ids, then remove them from the DLQ")
    .option("--id <ids>", "request ids, comma-separated")
    .option("--seq <seqs>", "DLQ sequence numbers, comma-separated")
    .option("-t, --tenant <tenant>", "every entry of this tenant")
    .option("-m, --model <model>", "every entry of this model")
    .option("--all", "every entry")
    .option("--dry-run", "report what would be requeued; change nothing")
    .option("--json", "JSON lines instead of text")
    .addOption(serverOption())
    .addHelpText("after", REQUEUE_HELP)
    .action(async (o: ServerOpts & { id?: string; seq?: string; tenant?: string; model?: string; all?: boolean; dryRun?: boolean; json?: boolean }) => {
      const selector: RequeueSelector = {};
      const ids = list(o.id);
      if (ids) selector.ids = ids;
      const seqs = list(o.seq)?.map((s) => {
        if (!/^\d+$/.test(s) || Number(s) < 1) throw new UsageError(`--seq must be integers >= 1, got '${s}'`);
        return Number(s);
      });
      if (seqs) selector.seqs = seqs;
      if (o.tenant) selector.tenant = o.tenant;
      if (o.model) selector.model = o.model;
      if (o.all) selector.all = true;
      const dryRun = o.dryRun === true;
      const json = o.json === true;
      ctx.exitCode = await withNats(o, async (nc) => {
        const report = await requeueDeadLetters(nc, selector, {
          dryRun,
          onItem: (item) => console.log(json ? JSON.stringify(item) : itemLine(item)),
        }).catch((err: unknown) => {
          throw dlqFailure(err);
        });
        const { selected, requeued, wouldRequeue, duplicates, skipped, failed } = report;
        if (json) console.log(JSON.stringify({ summary: { selected, requeued, wouldRequeue, duplicates, skipped, failed, dryRun } }));
        else {
          const done = dryRun ? `would requeue ${wouldRequeue}` : `requeued ${requeued}`;
          console.log(`${selected} selected: ${done}, not yet (duplicate window) ${duplicates}, skipped ${skipped}, failed ${failed}${dryRun ? " (dry run: nothing changed)" : ""}`);
        }
        return failed + duplicates > 0 ? 1 : 0;
      });
    });
}

function entryLine(e: DeadLetterEntry): string {
  return [e.seq, e.time.toISOString(), e.tenant, e.model, e.requestId ?? "-", e.code ?? "-", e.deliveries ?? "-", e.reason ?? "-"].join("\t");
}

function itemLine(i: RequeueItem): string {
  const what = i.action === "duplicate" ? "not yet" : i.action;
  const head = `${what.padEnd(14)}seq ${i.seq}  id ${i.requestId ?? "-"}${i.subject ? `  → ${i.subject}` : ""}`;
  return i.reason ? `${head}\n  ${i.reason}` : head;
}
