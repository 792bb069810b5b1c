/** `sluice serve`, `sluice dev` and `sluice worker`: the long-running processes. */
import { Option, type Command } from "commander";
import type { NatsConnection } from "@nats-io/transport-node";
import { createEngine, ENGINE_NAMES, EngineSpecError, type EngineName } from "../../worker/engines.js";
import { WorkerServer } from "../../worker/server.js";
import { loadConfig, parseWorkerList } from "../config.js";
import { DEV_API_KEY, DevStack } from "../dev/dev.js";
import { PipelineService } from "../service.js";
import { SERVICE_WORKER } from "../telemetry/types.js";
import { startTracing } from "../telemetry/export.js";
import { traceEngine } from "../telemetry/engine.js";
import { WorkerRegistration } from "../workers/directory.js";
import { connectCli, connectFailure, count, isConnectFailure, milliseconds, port, positive, serverOption, serversOf, UsageError, untilSignal } from "./common.js";
import type { CliContext } from "./program.js";

/** Default metrics port of `serve` and `dev`. */
export const DEFAULT_METRICS_PORT = 9464;

const metricsPortOption = (): Option =>
  new Option("--metrics-port <port>", `/metrics, /healthz, /readyz (default ${DEFAULT_METRICS_PORT}; 0 = any free port, -1 = off)`).argParser(port);

export function addServeCommands(program: Command, ctx: CliContext): void {
  program
    .command("dev")
    .description("start a local nats-server (temporary store), a simulated worker and the pipeline")
    .option("--port <n>", "NATS client port (default: a free one)", count)
    .option("--base-ms <n>", "simulated device time per batch, ms", milliseconds)
    .option("--per-item-ms <n>", "simulated device time per request, ms", milliseconds)
    .option("--llm-sim", "serve the model llm-sim on a worker of its own with the llm-sim engine")
    .option("--kv-tokens <n>", "with --llm-sim: its KV cache capacity, tokens", positive)
    .addOption(metricsPortOption())
    .addOption(new Option("--gateway-port <port>", "HTTP / OpenAI gateway port (default: a free one; -1 = off)").argParser(port))
    .action(async (o: { port?: number; baseMs?: number; perItemMs?: number; metricsPort?: number; gatewayPort?: number; llmSim?: boolean; kvTokens?: number }) => {
      const dev = await DevStack.start({
        ...(o.llmSim ? { llmSim: o.kvTokens !== undefined ? { kv_tokens: o.kvTokens } : {} } : {}),
        ...(o.port !== undefined ? { port: o.port } : {}),
        ...(o.gatewayPort !== undefined ? { gatewayPort: o.gatewayPort } : {}),
        ...(o.baseMs !== undefined ? { baseMs: o.baseMs } : {}),
        ...(o.perItemMs !== undefined ? { perItemMs: o.perItemMs } : {}),
        // Local only: the dev stack's endpoint listens on loopback.
        config: { telemetry: { metricsPort: o.metricsPort ?? DEFAULT_METRICS_PORT, metricsHost: "127.0.0.1" } },
      });
      const metricsAt = dev.pipeline.metricsServer ? `, metrics http://127.0.0.1:${dev.pipeline.metricsServer.port}/metrics` : "";
      const httpAt = dev.gateway ? `, HTTP ${dev.gateway.baseUrl}` : "";
      console.log(`sluice dev ready: NATS ${dev.url} (JetStream, temporary store)${httpAt}, worker ${dev.worker.endpoint}${metricsAt}`);
      if (dev.gateway) console.log(`HTTP:  OpenAI API at ${dev.gateway.baseUrl}, API key ${DEV_API_KEY} (tenant demo)`);
      console.log(`models: echo, reverse, upper, llm-sim, embed-sim (version v1); any tenant; priorities high, normal, low`);
      console.log(`try:   npx sluice publish --server ${dev.url} --tenant demo --model echo --prompt "hello"`);
      if (dev.gateway)
        console.log(
          `       curl ${dev.gateway.baseUrl}/chat/completions -H 'Authorization: Bearer ${DEV_API_KEY}' -H 'Content-Type: application/json' -d '{"model":"echo","messages":[{"role":"user","content":"hello"}]}'`,
        );
      console.log(`stop:  Ctrl-C`);
      const sig = await untilSignal();
      console.log(`sluice dev: ${sig}, stopping`);
      await dev.stop();
      ctx.exitCode = 0;
    });

  program
    .command("serve")
    .description("run the pipeline")
    .addOption(serverOption())
    .option("-c, --config <file>", "configuration file (JSON; default: $SLUICE_CONFIG)")
    .option("--workers <list>", "static workers: model@version=host:port[*capacity],...")
    .option("--max-in-flight <n>", "requests held at once by this process", positive)
    .addOption(metricsPortOption())
    .action(async (o: { server?: string; config?: string; workers?: string; maxInFlight?: number; metricsPort?: number }) => {
      const config = loadConfig({
        ...(o.config ? { file: o.config } : {}),
        overrides: {
          ...(o.server || !process.env["NATS_URL"] ? { servers: serversOf(o) } : {}),
          ...(o.maxInFlight !== undefined ? { pipeline: { maxInFlight: o.maxInFlight } } : {}),
          ...(o.metricsPort !== undefined ? { telemetry: { metricsPort: o.metricsPort } } : {}),
        },
      });
      if (o.workers) config.workers.push(...parseWorkerList(o.workers));
      let svc: PipelineService;
      try {
        svc = await PipelineService.start(config);
      } catch (err) {
        throw isConnectFailure(err) ? connectFailure(config.servers, err) : err;
      }
      console.log(`sluice serve ready: NATS ${config.servers.join(",")}`);
      await untilSignal();
      await svc.stop();
      ctx.exitCode = 0;
    });

  program
    .command("worker")
    .description("run a gRPC worker over an engine (simulated by default)")
    .addOption(serverOption())
    .option("--host <host>", "address to listen on (default 127.0.0.1)")
    .option("--port <n>", "port to listen on (default: a free one)", count)
    .option("--id <name>", "worker id (default: a new unique one)")
    .addOption(new Option("--engine <name>", "the engine (default: $SLUICE_ENGINE or simulated)").choices(ENGINE_NAMES))
    .option("--engine-url <url>", "where the inference server listens (vllm, deepspeed-mii; or $SLUICE_ENGINE_URL)")
    .option("--engine-model <name>", "the model name the inference server knows (or $SLUICE_ENGINE_MODEL)")
    .option("--engine-chat", "vllm: use the chat completions API")
    .option("--base-ms <n>", "simulated engine: device time per batch, ms", milliseconds)
    .option("--per-item-ms <n>", "simulated engine: device time per request, ms", milliseconds)
    .option("--kv-tokens <n>", "llm-sim engine: KV cache capacity, tokens", positive)
    .option("--max-running <n>", "llm-sim engine: sequences running at once", positive)
    .option("--register <list>", "write this worker into the registry (bucket infer_workers) as model@version,... and keep it fresh")
    .option("--advertise <host:port>", "the endpoint registered (default: the one listened on)")
    .option("--capacity <n>", "requests this worker takes at once, as registered (default: the engine's)", positive)
    .action(async (o: WorkerOptions) => {
      await runWorker(o);
      ctx.exitCode = 0;
    });
}

interface WorkerOptions {
  server?: string;
  host?: string;
  port?: number;
  id?: string;
  engine?: string;
  engineUrl?: string;
  engineModel?: string;
  engineChat?: boolean;
  baseMs?: number;
  perItemMs?: number;
  kvTokens?: number;
  maxRunning?: number;
  register?: string;
  advertise?: string;
  capacity?: number;
}

async function runWorker(o: WorkerOptions): Promise<void> {
  const engineName = o.engine ?? process.env["SLUICE_ENGINE"] ?? "simulated";
  const url = o.engineUrl ?? process.env["SLUICE_ENGINE_URL"];
  const model = o.engineModel ?? process.env["SLUICE_ENGINE_MODEL"];
  const serves = o.register?.split(",").map((s) => {
    const m = /^([^@\s]+)@([^@\s]+)$/.exec(s.trim());
    if (!m) throw new UsageError(`--register takes model@version,...; got '${s}'`);
    return { model: m[1]!, version: m[2]! };
  });
  let engine;
  try {
    engine = createEngine({
      engine: engineName as EngineName,
      ...(url ? { url } : {}),
      ...(model ? { model } : {}),
      ...(o.engineChat ? { chat: true } : {}),
      ...(o.baseMs !== undefined ? { base_ms: o.baseMs } : {}),
      ...(o.perItemMs !== undefined ? { per_item_ms: o.perItemMs } : {}),
      ...(o.kvTokens !== undefined ? { kv_tokens: o.kvTokens } : {}),
      ...(o.maxRunning !== undefined ? { max_running: o.maxRunning } : {}),
    });
  } catch (err) {
    if (!(err instanceof EngineSpecError)) throw err;
    const hint = err.code === "MISSING_OPTION" ? ` (give --engine-${/'model'/.test(err.message) ? "model NAME" : "url URL"})` : "";
    throw new UsageError(`${err.message}${hint}`);
  }
  const tracing = startTracing({ serviceName: SERVICE_WORKER });
  const server = await WorkerServer.start({
    engine: traceEngine(engine, tracing, ...(o.id ? [{ workerId: o.id }] : [])),
    ...(o.host ? { host: o.host } : {}),
    ...(o.port !== undefined ? { port: o.port } : {}),
    ...(o.id ? { workerId: o.id } : {}),
  });
  let registration: WorkerRegistration | undefined;
  let nc: NatsConnection | undefined;
  try {
    if (serves) {
      nc = await connectCli(serversOf(o), `sluice-worker-${server.workerId}`);
      registration = await WorkerRegistration.start(nc, {
        workerId: server.workerId,
        endpoint: o.advertise ?? server.endpoint,
        capacity: o.capacity ?? engine.capacity,
        serves,
        onError: (err) => console.error(`sluice worker: registration refresh failed: ${(err as Error).message}`),
      });
    }
    console.log(`sluice worker ready: ${server.endpoint} (${engineName} engine)${registration ? ", registered" : ""}`);
    await untilSignal();
  } finally {
    await registration?.stop();
    await nc?.drain();
    await server.stop();
    await engine.close();
    await tracing.shutdown();
  }
}
