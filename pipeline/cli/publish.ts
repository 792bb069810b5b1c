/** `sluice publish`: send requests and print their results as JSON lines. */
import { createReadStream } from "node:fs";
import { createInterface } from "node:readline";
import { Option, type Command } from "commander";
import { PRIORITIES, type Priority } from "../../proto/wire.js";
import { InferenceClient } from "../client/client.js";
import { InferenceError } from "../client/errors.js";
import type { InferBody, InferOptions, PublishReceipt } from "../client/options.js";
import { TOKEN_RE } from "../../proto/wire.js";
import { SERVICE_CLIENT, type Tracing } from "../telemetry/types.js";
import { startTracing } from "../telemetry/export.js";
import { connectCli, json, positive, serverOption, serversOf, UsageError } from "./common.js";
import type { CliContext } from "./program.js";

/** Requests of a `--file` in flight at once, by default. */
const DEFAULT_FILE_CONCURRENCY = 64;

interface PublishOptions {
  server?: string;
  tenant?: string;
  model?: string;
  prompt?: string;
  inputs?: unknown;
  parameters?: unknown;
  file?: string;
  id?: string;
  priority?: Priority;
  version?: string;
  deadlineMs?: number;
  timeoutMs?: number;
  concurrency?: number;
  stream?: boolean;
}

export function addPublishCommand(program: Command, ctx: CliContext): void {
  program
    .command("publish")
    .description("send requests and print their results (one JSON line each)")
    .addOption(serverOption())
    .option("-t, --tenant <tenant>", "the tenant the requests belong to (required; 1-64 of a-z 0-9 _ -)")
    .option("-m, --model <model>", "the model (required unless each line of --file names one)")
    .option("-p, --prompt <text>", "the prompt")
    .option("--inputs <json>", "other model inputs, a JSON value", json)
    .option("--parameters <json>", 'parameters, a JSON object, e.g. \'{"max_tokens":64}\'', json)
    .option("-f, --file <requests.jsonl>", 'many requests, one JSON object a line: {"model"?, "prompt"?, "inputs"?, "parameters"?, "id"?, "priority"?, "version"?}')
    .option("--id <id>", "request id (the idempotency key; default: a new unique one)")
    .addOption(new Option("--priority <priority>", "priority (default normal)").choices(PRIORITIES))
    .option("--version <version>", "pin a model version")
    .option("--deadline-ms <n>", "deadline RELATIVE to now, in ms (sent as the absolute Infer-Deadline)", positive)
    .option("--timeout-ms <n>", "how long to wait for each result, ms (default 60000)", positive)
    .option("--concurrency <n>", `--file: requests in flight at once (default ${DEFAULT_FILE_CONCURRENCY})`, positive)
    .option("--stream", "print tokens as they are generated, then the result")
    .addHelpText(
      "after",
      "\nThe request's trace id goes to stderr (`trace <id>`). A reused --id is reported at once on stderr\n" +
        "and answered with the first request's result. Exit status: 0 every result ok, 1 some failed, 2 bad usage.",
    )
    .action(async (o: PublishOptions) => {
      ctx.exitCode = await runPublish(o);
    });
}

async function runPublish(o: PublishOptions): Promise<number> {
  const tracing = startTracing({ serviceName: SERVICE_CLIENT });
  try {
    return await publishWith(o, tracing);
  } finally {
    await tracing.shutdown();
  }
}

async function publishWith(o: PublishOptions, tracing: Tracing): Promise<number> {
  // Checked here, not by the parser, so that a mistyped option is the one reported.
  if (o.tenant === undefined) throw new UsageError("--tenant is required: the tenant the requests belong to");
  const tenant = o.tenant;
  if (!o.file && !o.model) throw new UsageError("--model is required (or --file with a model in each line)");
  if (o.file && (o.prompt !== undefined || o.inputs !== undefined || o.stream)) {
    throw new UsageError("--file takes its requests from the file: drop --prompt, --inputs and --stream");
  }
  if (!o.file && o.prompt === undefined && o.inputs === undefined) throw new UsageError("give --prompt TEXT or --inputs JSON (or --file)");
  if (o.parameters !== undefined && (typeof o.parameters !== "object" || o.parameters === null || Array.isArray(o.parameters))) {
    throw new UsageError("--parameters must be a JSON object");
  }
  if (!TOKEN_RE.test(tenant)) throw new UsageError(`--tenant '${tenant}' must be 1-64 of a-z 0-9 _ -`);
  const nc = await connectCli(serversOf(o), `sluice-client-${tenant}`);
  const client = new InferenceClient(nc, tenant, true, tracing);
  try {
    return o.file ? await publishFile(client, o) : await publishOne(client, o, tracing.enabled);
  } finally {
    await client.close();
  }
}

/** What a receipt tells the user at once, on stderr. */
function announce(r: PublishReceipt): void {
  const traceId = r.traceparent?.split("-")[1];
  if (r.duplicate) {
    console.error(
      `sluice publish: request id '${r.id}' was used before (a duplicate within the duplicate window): nothing new was queued; printing the first request's result`,
    );
  }
  // A duplicate's trace is the first request's, which this process does not know.
  else if (traceId) console.error(`trace ${traceId}`);
}

function optionsOf(o: PublishOptions, line: Record<string, unknown> = {}): InferOptions {
  const out: InferOptions = {};
  const id = (line["id"] as string | undefined) ?? o.id;
  if (id !== undefined) out.id = id;
  const priority = (line["priority"] as Priority | undefined) ?? o.priority;
  if (priority !== undefined) out.priority = priority;
  const version = (line["version"] as string | undefined) ?? o.version;
  if (version !== undefined) out.version = version;
  if (o.timeoutMs !== undefined) out.timeoutMs = o.timeoutMs;
  // The CLI takes a relative deadline; the protocol and the library take an absolute one.
  if (o.deadlineMs !== undefined) out.deadlineMs = Date.now() + o.deadlineMs;
  return out;
}

/** A trace id for the request even when this process does not export spans. */
function newTraceparent(): string {
  const hex = (n: number): string => Array.from(crypto.getRandomValues(new Uint8Array(n)), (b) => b.toString(16).padStart(2, "0")).join("");
  return `00-${hex(16)}-${hex(8)}-01`;
}

async function publishOne(client: InferenceClient, o: PublishOptions, tracing: boolean): Promise<number> {
  const body: InferBody = {};
  if (o.prompt !== undefined) body.prompt = o.prompt;
  if (o.inputs !== undefined) body.inputs = o.inputs;
  if (o.parameters !== undefined) body.parameters = o.parameters as Record<string, unknown>;
  const opts: InferOptions = { ...optionsOf(o), onPublished: announce };
  // Without an exporter there is no span to take a trace id from: start the trace here, so the
  // pipeline's and the worker's spans (when they export) join one trace the user can look up.
  if (!tracing) opts.traceparent = newTraceparent();
  const model = o.model!;
  try {
    if (o.stream) {
      let failed = false;
      for await (const ev of client.stream(model, body, opts)) {
        if ("text" in ev) process.stdout.write(ev.text);
        else {
          process.stdout.write("\n");
          console.log(JSON.stringify(ev.result));
          failed = ev.result.status !== "ok";
        }
      }
      return failed ? 1 : 0;
    }
    const r = await client.request(model, body, opts);
    console.log(JSON.stringify(r));
    return r.status === "ok" ? 0 : 1;
  } catch (err) {
    if (!(err instanceof InferenceError)) throw err;
    // Refused before it was sent: a usage mistake.
    if (err.code === "INVALID_ARGUMENT" && err.result === undefined) throw new UsageError(err.message);
    console.log(JSON.stringify({ id: opts.id ?? null, status: "error", error: { code: err.code, message: err.message } }));
    return 1;
  }
}

async function publishFile(client: InferenceClient, o: PublishOptions): Promise<number> {
  let failed = 0;
  const one = async (model: string, body: InferBody, opts: InferOptions): Promise<void> => {
    try {
      const r = await client.request(model, body, opts);
      if (r.status !== "ok") failed++;
      console.log(JSON.stringify(r));
    } catch (err) {
      failed++;
      const e = err instanceof InferenceError ? err : new InferenceError("INTERNAL", (err as Error).message);
      console.log(JSON.stringify({ id: opts.id ?? null, status: "error", error: { code: e.code, message: e.message } }));
    }
  };
  const concurrency = o.concurrency ?? DEFAULT_FILE_CONCURRENCY;
  const inflight = new Set<Promise<void>>();
  const input = createReadStream(o.file!);
  const opened = new Promise<void>((resolve, reject) => {
    input.once("open", () => resolve());
    input.once("error", reject);
  });
  try {
    await opened;
  } catch (err) {
    throw new UsageError(`cannot read --file ${o.file}: ${(err as Error).message}`);
  }
  const rl = createInterface({ input, crlfDelay: Infinity });
  for await (const line of rl) {
    if (!line.trim()) continue;
    let fields: Record<string, unknown>;
    try {
      fields = JSON.parse(line) as Record<string, unknown>;
    } catch {
      failed++;
      console.log(JSON.stringify({ status: "error", error: { code: "INVALID_ARGUMENT", message: `not JSON: ${line.slice(0, 80)}` } }));
      continue;
    }
    const model = (fields["model"] as string | undefined) ?? o.model;
    if (!model) {
      failed++;
      console.log(JSON.stringify({ status: "error", error: { code: "INVALID_ARGUMENT", message: "no model (give --model or a model field)" } }));
      continue;
    }
    const body: InferBody = {};
    if (fields["prompt"] !== undefined) body.prompt = fields["prompt"] as string;
    if (fields["inputs"] !== undefined) body.inputs = fields["inputs"];
    if (fields["parameters"] !== undefined) body.parameters = fields["parameters"] as Record<string, unknown>;
    const p = one(model, body, optionsOf(o, fields)).finally(() => inflight.delete(p));
    inflight.add(p);
    if (inflight.size >= concurrency) await Promise.race(inflight);
  }
  await Promise.all(inflight);
  return failed > 0 ? 1 : 0;
}
