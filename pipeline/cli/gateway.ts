/**
 * `sluice gateway`: the HTTP / OpenAI gateway; `sluice gateway keys add|hash` manages API keys
 * (only their SHA-256 hashes are ever stored).
 */
import { randomBytes } from "node:crypto";
import type { Command } from "commander";
import { loadConfig } from "../config.js";
import { hashApiKey, openApiKeysBucket, putApiKey } from "../gateway/auth.js";
import { Gateway, SERVICE_GATEWAY } from "../gateway/server.js";
import { startTracing } from "../telemetry/mod.js";
import { TOKEN_RE } from "../../proto/wire.js";
import { connectFailure, isConnectFailure, port, positive, serverOption, serversOf, untilSignal, UsageError, withNats, type ServerOpts } from "./common.js";
import type { CliContext } from "./program.js";

export function addGatewayCommand(program: Command, ctx: CliContext): void {
  const gateway = program
    .command("gateway")
    .description("run the HTTP / OpenAI gateway (keys: gateway keys --help)")
    .addOption(serverOption())
    .option("-c, --config <file>", "configuration file (JSON; section `gateway`; default: $SLUICE_CONFIG)")
    .option("--port <port>", "HTTP port (default 8080; 0 = any free port)", port)
    .option("--host <host>", "address to listen on (default 0.0.0.0)")
    .option("--max-open-requests <n>", "requests held at once; beyond it 503", positive)
    .action(async (o: { server?: string; config?: string; port?: number; host?: string; maxOpenRequests?: number }) => {
      if (o.port === -1) throw new UsageError("--port must be a port or 0 (any free port)");
      const config = loadConfig({
        ...(o.config ? { file: o.config } : {}),
        overrides: {
          ...(o.server || !process.env["NATS_URL"] ? { servers: serversOf(o) } : {}),
          gateway: {
            ...(o.port !== undefined ? { port: o.port } : {}),
            ...(o.host ? { host: o.host } : {}),
            ...(o.maxOpenRequests !== undefined ? { maxOpenRequests: o.maxOpenRequests } : {}),
          },
        },
      });
      const tracing = startTracing({ serviceName: SERVICE_GATEWAY });
      let gw: Gateway;
      try {
        gw = await Gateway.start({ servers: config.servers, settings: config.gateway, tracing });
      } catch (err) {
        await tracing.shutdown();
        throw isConnectFailure(err) ? connectFailure(config.servers, err) : err;
      }
      console.log(`sluice gateway ready: ${gw.baseUrl} (NATS ${config.servers.join(",")})`);
      const sig = await untilSignal();
      console.log(`sluice gateway: ${sig}, draining`);
      await gw.stop();
      await tracing.shutdown();
      ctx.exitCode = 0;
    });

  const keys = gateway.command("keys").description("API keys of the gateway (only their SHA-256 is stored)");
  keys
    .command("add")
    .description("store a key's hash for a tenant in bucket infer_api_keys (a new key is made and printed when none is given)")
    .addOption(serverOption())
    .requiredOption("--tenant <tenant>", "the tenant the key names")
    .option("--key <key>", "the key (default: a new random one, printed once)")
    .action(async (o: ServerOpts & { tenant: string; key?: string }) => {
      if (!TOKEN_RE.test(o.tenant)) throw new UsageError(`--tenant must be 1-64 of a-z 0-9 _ -; got '${o.tenant}'`);
      const made = o.key ?? `sk-sluice-${randomBytes(24).toString("base64url")}`;
      await withNats(o, async (nc) => {
        const hash = await putApiKey(await openApiKeysBucket(nc), made, o.tenant);
        console.log(o.key ? `stored key ${hash.slice(0, 12)}… for tenant ${o.tenant}` : `${made}\t(tenant ${o.tenant}; only its hash ${hash.slice(0, 12)}… is stored: keep the key now)`);
      });
      ctx.exitCode = 0;
    });
  keys
    .command("hash")
    .description("print the SHA-256 of a key, for gateway.apiKeys in the configuration")
    .argument("<key>")
    .action((key: string) => {
      console.log(hashApiKey(key));
      ctx.exitCode = 0;
    });
}
