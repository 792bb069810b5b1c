/**
 * The `sluice` command line.
 *
 *   sluice dev [--port N]                      nats-server + simulated worker + pipeline, locally
 *   sluice serve [--config F] [--workers ...]  the pipeline
 *   sluice worker [--port N] [--base-ms N]     a gRPC worker with the simulated engine
 *   sluice publish --tenant T --model M --prompt P | --file F.jsonl
 *   sluice models list|get|set|rm
 *
 * Every command takes the NATS server from --server URL or NATS_URL.
 */
import { createReadStream } from "node:fs";
import { createInterface } from "node:readline";
import { parseArgs, type ParseArgsConfig } from "node:util";
import type { NatsConnection } from "@nats-io/transport-node";
import { createEngine, type EngineName } from "../worker/engines.js";
import { WorkerServer } from "../worker/server.js";
import { InferenceClient, InferenceError, type InferBody, type InferOptions } from "./client/client.js";
import { ConfigError, DEFAULT_NATS_URL, loadConfig, parseWorkerList } from "./config.js";
import { DevStack } from "./dev/dev.js";
import { cmdDlq } from "./dlq-cli.js";
import { cmdReplay } from "./replay-cli.js";
import { ModelRegistry, parseModelSpec } from "./routing/registry.js";
import { PipelineService } from "./service.js";
import { SERVICE_CLIENT, SERVICE_WORKER, startTracing, traceEngine } from "./telemetry/telemetry.js";
import { openWorkersBucket, parseWorkerKey, WorkerRegistration } from "./workers/directory.js";
import type { Priority } from "../proto/wire.js";
import { connectNats } from "./connection.js";

const USAGE = `usage: sluice <command> [options]

commands:
  dev       start a local nats-server, a simulated worker and the pipeline
  serve     run the pipeline
  worker    run a gRPC worker with the simulated engine
  publish   send requests and print their results (JSON lines)
  models    list | get <model> | set <model> <json> | rm <model>
  workers   list (registered workers)
  dlq       list | show <seq> | requeue (--id|--seq|--tenant|--model|--all) [--dry-run]
  replay    re-run recorded requests against a model version and compare (--help)

common options:
  --server URL   NATS server (default: $NATS_URL or ${DEFAULT_NATS_URL})
  --help         this text
`;

type Opts = ParseArgsConfig["options"];
const common: Opts = { server: { type: "string" }, help: { type: "boolean", short: "h" } };

function parse(args: string[], options: Opts) {
  return parseArgs({ args, options: { ...common, ...options }, allowPositionals: true, strict: true });
}

function serverOf(v: Record<string, unknown>): string[] {
  const s = (v["server"] as string | undefined) ?? process.env["NATS_URL"] ?? DEFAULT_NATS_URL;
  return s.split(",").map((x) => x.trim());
}

function intOpt(v: Record<string, unknown>, name: string): number | undefined {
  const s = v[name] as string | undefined;
  if (s === undefined) return undefined;
  const n = Number(s);
  if (!Number.isFinite(n) || n < 0) throw new ConfigError(`--${name} must be a non-negative number, got '${s}'`);
  return n;
}

/** A port option: a port number, 0 for any free port, -1 for none. */
function portOpt(v: Record<string, unknown>, name: string): number | undefined {
  const s = v[name] as string | undefined;
  if (s === undefined) return undefined;
  const n = Number(s);
  if (!Number.isInteger(n) || n < -1 || n > 65535) throw new ConfigError(`--${name} must be a port, 0 (any free port) or -1 (off); got '${s}'`);
  return n;
}

/** Resolves on SIGINT / SIGTERM. */
function untilSignal(): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    const on = (s: NodeJS.Signals): void => {
      process.off("SIGINT", on);
      process.off("SIGTERM", on);
      resolve(s);
    };
    process.on("SIGINT", on);
    process.on("SIGTERM", on);
  });
}

async function cmdDev(args: string[]): Promise<number> {
  const { values: v } = parse(args, {
    port: { type: "string" },
    "base-ms": { type: "string" },
    "per-item-ms": { type: "string" },
    "metrics-port": { type: "string" },
  });
  if (v.help) return usage("sluice dev [--port N] [--base-ms N] [--per-item-ms N] [--metrics-port N (default 9464; 0 = any free port, -1 = off)]");
  const devMetricsPort = portOpt(v, "metrics-port");
  const port = intOpt(v, "port");
  const baseMs = intOpt(v, "base-ms");
  const perItemMs = intOpt(v, "per-item-ms");
  const dev = await DevStack.start({
    ...(port !== undefined ? { port } : {}),
    ...(baseMs !== undefined ? { baseMs } : {}),
    ...(perItemMs !== undefined ? { perItemMs } : {}),
    // Local only: the dev stack's endpoint listens on loopback.
    config: { telemetry: { metricsPort: devMetricsPort ?? 9464, metricsHost: "127.0.0.1" } },
  });
  const metricsAt = dev.pipeline.metricsServer ? `, metrics http://127.0.0.1:${dev.pipeline.metricsServer.port}/metrics` : "";
  console.log(`sluice dev ready: NATS ${dev.url} (JetStream, temporary store), worker ${dev.worker.endpoint}${metricsAt}`);
  console.log(`models: echo, reverse, upper, llm-sim (version v1); any tenant; priorities high, normal, low`);
  console.log(`try:   npx sluice publish --server ${dev.url} --tenant demo --model echo --prompt "hello"`);
  console.log(`stop:  Ctrl-C`);
  const sig = await untilSignal();
  console.log(`sluice dev: ${sig}, stopping`);
  await dev.stop();
  return 0;
}

async function cmdServe(args: string[]): Promise<number> {
  const { values: v } = parse(args, {
    config: { type: "string", short: "c" },
    workers: { type: "string" },
    "max-in-flight": { type: "string" },
    "metrics-port": { type: "string" },
  });
  if (v.help)
    return usage("sluice serve [--config FILE] [--workers model@version=host:port,...] [--max-in-flight N] [--metrics-port N (default 9464)]");
  const maxInFlight = intOpt(v, "max-in-flight");
  const metricsPort = portOpt(v, "metrics-port");
  const config = loadConfig({
    ...(v.config ? { file: v.config as string } : {}),
    overrides: {
      ...(v.server || !process.env["NATS_URL"] ? { servers: serverOf(v) } : {}),
      ...(maxInFlight !== undefined ? { pipeline: { maxInFlight } } : {}),
      ...(metricsPort !== undefined ? { telemetry: { metricsPort } } : {}),
    },
  });
  if (v.workers) config.workers.push(...parseWorkerList(v.workers as string));
  const svc = await PipelineService.start(config);
  console.log(`sluice serve ready: NATS ${config.servers.join(",")}`);
  await untilSignal();
  await svc.stop();
  return 0;
}

async function cmdWorker(args: string[]): Promise<number> {
  const { values: v } = parse(args, {
    port: { type: "string" },
    host: { type: "string" },
    "base-ms": { type: "string" },
    "per-item-ms": { type: "string" },
    id: { type: "string" },
    register: { type: "string" },
    advertise: { type: "string" },
    capacity: { type: "string" },
    engine: { type: "string" },
    "engine-url": { type: "string" },
    "engine-model": { type: "string" },
    "engine-chat": { type: "boolean" },
  });
  if (v.help)
    return usage(
      "sluice worker [--host H] [--port N] [--id NAME]\n" +
        "              [--engine simulated|vllm|deepspeed-mii] [--engine-url URL] [--engine-model NAME] [--engine-chat]\n" +
        "              [--base-ms N] [--per-item-ms N]   (simulated engine)\n" +
        "              [--register model@version,... [--advertise host:port] [--capacity N] --server URL]\n" +
        "  --register: write this worker into the registry (bucket infer_workers) and keep it fresh",
    );
  const baseMs = intOpt(v, "base-ms");
  const perItemMs = intOpt(v, "per-item-ms");
  const port = intOpt(v, "port");
  const engineName = (v.engine as string | undefined) ?? process.env["SLUICE_ENGINE"] ?? "simulated";
  const engine = createEngine({
    engine: engineName as EngineName,
    ...(v["engine-url"] ?? process.env["SLUICE_ENGINE_URL"] ? { url: (v["engine-url"] as string | undefined) ?? process.env["SLUICE_ENGINE_URL"]! } : {}),
    ...(v["engine-model"] ?? process.env["SLUICE_ENGINE_MODEL"] ? { model: (v["engine-model"] as string | undefined) ?? process.env["SLUICE_ENGINE_MODEL"]! } : {}),
    ...(v["engine-chat"] ? { chat: true } : {}),
    ...(baseMs !== undefined ? { base_ms: baseMs } : {}),
    ...(perItemMs !== undefined ? { per_item_ms: perItemMs } : {}),
  });
  const tracing = startTracing({ serviceName: SERVICE_WORKER });
  const server = await WorkerServer.start({
    engine: traceEngine(engine, tracing, ...(v.id ? [{ workerId: v.id as string }] : [])),
    ...(v.host ? { host: v.host as string } : {}),
    ...(port !== undefined ? { port } : {}),
    ...(v.id ? { workerId: v.id as string } : {}),
  });
  let registration: WorkerRegistration | undefined;
  let nc: NatsConnection | undefined;
  if (v.register) {
    const serves = (v.register as string).split(",").map((s) => {
      const m = /^([^@\s]+)@([^@\s]+)$/.exec(s.trim());
      if (!m) throw new ConfigError(`--register takes model@version,...; got '${s}'`);
      return { model: m[1]!, version: m[2]! };
    });
    nc = await connectNats(serverOf(v), `sluice-worker-${server.workerId}`);
    registration = await WorkerRegistration.start(nc, {
      workerId: server.workerId,
      endpoint: (v.advertise as string | undefined) ?? server.endpoint,
      capacity: intOpt(v, "capacity") ?? engine.capacity,
      serves,
      onError: (err) => console.error(`sluice worker: registration refresh failed: ${(err as Error).message}`),
    });
  }
  console.log(`sluice worker ready: ${server.endpoint} (${engineName} engine)${registration ? ", registered" : ""}`);
  await untilSignal();
  await registration?.stop();
  await nc?.drain();
  await server.stop();
  await engine.close();
  await tracing.shutdown();
  return 0;
}

async function cmdPublish(args: string[]): Promise<number> {
  const { values: v } = parse(args, {
    tenant: { type: "string", short: "t" },
    model: { type: "string", short: "m" },
    prompt: { type: "string", short: "p" },
    inputs: { type: "string" },
    parameters: { type: "string" },
    file: { type: "string", short: "f" },
    id: { type: "string" },
    priority: { type: "string" },
    version: { type: "string" },
    "deadline-ms": { type: "string" },
    "timeout-ms": { type: "string" },
    concurrency: { type: "string" },
    stream: { type: "boolean" },
  });
  if (v.help)
    return usage(
      "sluice publish --tenant T --model M (--prompt TEXT | --inputs JSON | --file REQUESTS.jsonl) [--parameters JSON]\n" +
        "               [--id ID] [--priority high|normal|low] [--version V] [--deadline-ms N] [--timeout-ms N] [--concurrency N]\n" +
        "               [--stream]   print tokens as they are generated, then the result\n" +
        "  a line of REQUESTS.jsonl: {\"model\"?, \"prompt\"?, \"inputs\"?, \"parameters\"?, \"id\"?, \"priority\"?, \"version\"?}",
    );
  const tenant = (v.tenant as string | undefined) ?? "default";
  const tracing = startTracing({ serviceName: SERVICE_CLIENT });
  const client = await InferenceClient.connect({ servers: serverOf(v), tenant, tracing });
  const timeoutMs = intOpt(v, "timeout-ms");
  const deadlineIn = intOpt(v, "deadline-ms");
  let failed = 0;
  const one = async (model: string, body: InferBody, o: InferOptions): Promise<void> => {
    try {
      const r = await client.request(model, body, o);
      if (r.status !== "ok") failed++;
      console.log(JSON.stringify(r));
    } catch (err) {
      failed++;
      const e = err instanceof InferenceError ? err : new InferenceError("INTERNAL", (err as Error).message);
      console.log(JSON.stringify({ id: o.id ?? null, status: "error", error: { code: e.code, message: e.message } }));
    }
  };
  const baseOpts = (o: Record<string, unknown>): InferOptions => {
    const out: InferOptions = {};
    const id = (o["id"] as string | undefined) ?? (v.id as string | undefined);
    if (id) out.id = id;
    const pr = (o["priority"] as string | undefined) ?? (v.priority as string | undefined);
    if (pr) out.priority = pr as Priority;
    const ver = (o["version"] as string | undefined) ?? (v.version as string | undefined);
    if (ver) out.version = ver;
    if (timeoutMs !== undefined) out.timeoutMs = timeoutMs;
    if (deadlineIn !== undefined) out.deadlineMs = Date.now() + deadlineIn;
    return out;
  };
  try {
    if (v.file) {
      const concurrency = intOpt(v, "concurrency") ?? 64;
      const inflight = new Set<Promise<void>>();
      const rl = createInterface({ input: createReadStream(v.file as string), crlfDelay: Infinity });
      for await (const line of rl) {
        if (!line.trim()) continue;
        let o: Record<string, unknown>;
        try {
          o = JSON.parse(line) as Record<string, unknown>;
        } catch {
          failed++;
          console.log(JSON.stringify({ status: "error", error: { code: "INVALID_ARGUMENT", message: `not JSON: ${line.slice(0, 80)}` } }));
          continue;
        }
        const model = (o["model"] as string | undefined) ?? (v.model as string | undefined);
        if (!model) {
          failed++;
          console.log(JSON.stringify({ status: "error", error: { code: "INVALID_ARGUMENT", message: "no model (give --model or a model field)" } }));
          continue;
        }
        const body: InferBody = {};
        if (o["prompt"] !== undefined) body.prompt = o["prompt"] as string;
        if (o["inputs"] !== undefined) body.inputs = o["inputs"];
        if (o["parameters"] !== undefined) body.parameters = o["parameters"] as Record<string, unknown>;
        const p = one(model, body, baseOpts(o)).finally(() => inflight.delete(p));
        inflight.add(p);
        if (inflight.size >= concurrency) await Promise.race(inflight);
      }
      await Promise.all(inflight);
    } else {
      if (!v.model) throw new ConfigError("--model is required");
      const body: InferBody = {};
      if (v.prompt !== undefined) body.prompt = v.prompt as string;
      if (v.inputs !== undefined) body.inputs = JSON.parse(v.inputs as string);
      if (v.parameters !== undefined) body.parameters = JSON.parse(v.parameters as string) as Record<string, unknown>;
      if (v.stream) {
        for await (const ev of client.stream(v.model as string, body, baseOpts({}))) {
          if ("text" in ev) process.stdout.write(ev.text);
          else {
            process.stdout.write("\n");
            console.log(JSON.stringify(ev.result));
            if (ev.result.status !== "ok") failed++;
          }
        }
      } else await one(v.model as string, body, baseOpts({}));
    }
  } finally {
    await client.close();
    await tracing.shutdown();
  }
  return failed > 0 ? 1 : 0;
}

async function cmdModels(args: string[]): Promise<number> {
  const { values: v, positionals } = parse(args, {});
  const [sub, model, json] = positionals;
  if (v.help || !sub) return usage("sluice models list | get <model> | set <model> '<json>' | rm <model>");
  const nc = await connectNats(serverOf(v), "sluice-cli");
  try {
    const kv = await ModelRegistry.openBucket(nc);
    switch (sub) {
      case "list": {
        const keys = await kv.keys();
        for await (const k of keys) {
          const e = await kv.get(k);
          if (e && e.operation === "PUT") console.log(`${k}\t${e.string()}`);
        }
        return 0;
      }
      case "get": {
        if (!model) throw new ConfigError("models get needs a model name");
        const e = await kv.get(model);
        if (!e || e.operation !== "PUT") {
          console.error(`no model '${model}'`);
          return 1;
        }
        console.log(e.string());
        return 0;
      }
      case "set": {
        if (!model || !json) throw new ConfigError("models set needs a model name and a JSON value");
        const spec = parseModelSpec(model, JSON.parse(json));
        await kv.put(model, JSON.stringify(spec));
        console.log(`set ${model}`);
        return 0;
      }
      case "rm": {
        if (!model) throw new ConfigError("models rm needs a model name");
        await kv.delete(model);
        console.log(`removed ${model}`);
        return 0;
      }
      default:
        throw new ConfigError(`unknown models subcommand '${sub}'`);
    }
  } finally {
    await nc.close();
  }
}

async function cmdWorkers(args: string[]): Promise<number> {
  const { values: v, positionals } = parse(args, {});
  if (v.help || positionals[0] !== "list") return usage("sluice workers list");
  const nc = await connectNats(serverOf(v), "sluice-cli");
  try {
    const kv = await openWorkersBucket(nc);
    const keys = await kv.keys();
    console.log("model\tversion\tworker\tendpoint\tcapacity\tage_s");
    for await (const k of keys) {
      const e = await kv.get(k);
      const key = parseWorkerKey(k);
      if (!e || e.operation !== "PUT" || !key) continue;
      const val = e.json<{ endpoint?: string; capacity?: number }>();
      const age = ((Date.now() - e.created.getTime()) / 1000).toFixed(1);
      console.log(`${key.model}\t${key.version}\t${key.workerId}\t${val.endpoint ?? "?"}\t${val.capacity ?? "?"}\t${age}`);
    }
    return 0;
  } finally {
    await nc.close();
  }
}

function usage(text: string): number {
  console.log(text);
  return 0;
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case "dev":
      return cmdDev(rest);
    case "serve":
      return cmdServe(rest);
    case "worker":
      return cmdWorker(rest);
    case "publish":
      return cmdPublish(rest);
    case "models":
      return cmdModels(rest);
    case "workers":
      return cmdWorkers(rest);
    case "dlq":
      return cmdDlq(rest);
    case "replay":
      return cmdReplay(rest);
    case undefined:
    case "help":
    case "--help":
    case "-h":
      console.log(USAGE);
      return cmd === undefined ? 2 : 0;
    default:
      console.error(`unknown command '${cmd}'\n\n${USAGE}`);
      return 2;
  }
}

const isMain = process.argv[1] !== undefined && import.meta.url === new URL(`file://${process.argv[1]}`).href;
if (isMain || process.env["SLUICE_CLI"] === "1") {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      const e = err as Error;
      console.error(`sluice: ${e instanceof ConfigError || e?.name === "ModelSpecError" ? e.message : (e?.stack ?? String(e))}`);
      process.exit(1);
    },
  );
}
