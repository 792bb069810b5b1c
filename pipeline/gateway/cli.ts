/**
 * `sluice gateway`: runs the HTTP / OpenAI gateway; `sluice gateway keys add|hash` manages API keys
 * (only their hashes are ever stored).
 */
import { randomBytes } from "node:crypto";
import { parseArgs } from "node:util";
import { ConfigError, loadConfig } from "../config.js";
import { connectNats } from "../connection.js";
import { startTracing } from "../telemetry.js";
import { hashApiKey, openApiKeysBucket, putApiKey } from "./auth.js";
import { Gateway, SERVICE_GATEWAY } from "./server.js";

export const GATEWAY_USAGE =
  "sluice gateway [--config FILE] [--server URL] [--port N (default 8080; 0 = any free port)] [--host H] [--max-open-requests N]\n" +
  "sluice gateway keys add --tenant T [--key KEY]   store a key's hash in bucket infer_api_keys (a new key is made and printed when none is given)\n" +
  "sluice gateway keys hash KEY                     print the SHA-256 of a key, for gateway.apiKeys in the configuration";

function intArg(v: string | undefined, name: string): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new ConfigError(`--${name} must be a non-negative integer, got '${v}'`);
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

/** A usage error: one line on stderr, exit status 2. */
function usageError(message: string): number {
  console.error(`sluice gateway: ${message} (sluice gateway --help)`);
  return 2;
}

export async function cmdGateway(args: string[]): Promise<number> {
  try {
    return await gateway(args);
  } catch (err) {
    const e = err as { code?: unknown; message?: string };
    if (err instanceof ConfigError || (typeof e?.code === "string" && e.code.startsWith("ERR_PARSE_ARGS"))) return usageError(e.message ?? String(err));
    throw err;
  }
}

async function gateway(args: string[]): Promise<number> {
  const { values: v, positionals } = parseArgs({
    args,
    options: {
      server: { type: "string" },
      help: { type: "boolean", short: "h" },
      config: { type: "string", short: "c" },
      port: { type: "string" },
      host: { type: "string" },
      "max-open-requests": { type: "string" },
      tenant: { type: "string" },
      key: { type: "string" },
    },
    allowPositionals: true,
    strict: true,
  });
  if (v.help) {
    console.log(GATEWAY_USAGE);
    return 0;
  }
  const servers = (v.server ?? process.env["NATS_URL"])?.split(",").map((s) => s.trim());
  if (positionals[0] === "keys") return keys(positionals.slice(1), v.tenant, v.key, servers);
  if (positionals.length > 0) throw new ConfigError(`unknown gateway argument '${positionals[0]}'`);
  const port = intArg(v.port, "port");
  const maxOpen = intArg(v["max-open-requests"], "max-open-requests");
  const config = loadConfig({
    ...(v.config ? { file: v.config } : {}),
    overrides: {
      ...(servers ? { servers } : {}),
      gateway: {
        ...(port !== undefined ? { port } : {}),
        ...(v.host ? { host: v.host } : {}),
        ...(maxOpen !== undefined ? { maxOpenRequests: maxOpen } : {}),
      },
    },
  });
  const tracing = startTracing({ serviceName: SERVICE_GATEWAY });
  const gw = await Gateway.start({ servers: config.servers, settings: config.gateway, tracing });
  console.log(`sluice gateway ready: ${gw.baseUrl} (NATS ${config.servers.join(",")})`);
  const sig = await untilSignal();
  console.log(`sluice gateway: ${sig}, draining`);
  await gw.stop();
  await tracing.shutdown();
  return 0;
}

async function keys(args: string[], tenant: string | undefined, key: string | undefined, servers: string[] | undefined): Promise<number> {
  const [sub, arg] = args;
  if (sub === "hash") {
    if (!arg) throw new ConfigError("gateway keys hash needs a key");
    console.log(hashApiKey(arg));
    return 0;
  }
  if (sub !== "add") throw new ConfigError(`gateway keys takes add or hash; got '${sub ?? ""}'`);
  if (!tenant) throw new ConfigError("gateway keys add needs --tenant");
  const made = key ?? `sk-sluice-${randomBytes(24).toString("base64url")}`;
  const nc = await connectNats(servers ?? loadConfig().servers, "sluice-cli");
  try {
    const hash = await putApiKey(await openApiKeysBucket(nc), made, tenant);
    console.log(key ? `stored key ${hash.slice(0, 12)}… for tenant ${tenant}` : `${made}\t(tenant ${tenant}; only its hash ${hash.slice(0, 12)}… is stored: keep the key now)`);
    return 0;
  } finally {
    await nc.close();
  }
}
