/**
 * How every sluice process connects to NATS: servers from `--server`/`NATS_URL`, and credentials
 * from the environment, so the same command works against a server with accounts and
 * per-tenant permissions (infra/nats/accounts.conf):
 *
 * | variable | meaning |
 * | --- | --- |
 * | `NATS_USER`, `NATS_PASSWORD` | user and password |
 * | `NATS_TOKEN` | token |
 * | `NATS_CREDS` | path of a `.creds` file (JWT + nkey seed) |
 * | `NATS_INBOX_PREFIX` | inbox prefix (a user may only subscribe to its own inboxes) |
 * | `NATS_TLS_CA`, `NATS_TLS_CERT`, `NATS_TLS_KEY` | TLS: CA, client certificate and key files |
 */
import { readFileSync } from "node:fs";
import { connect, credsAuthenticator, type NatsConnection, type NodeConnectionOptions } from "@nats-io/transport-node";

function connectionOptions(servers: string | string[], name: string, env: NodeJS.ProcessEnv = process.env): NodeConnectionOptions {
  const opts: NodeConnectionOptions = {
    servers,
    name,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 250,
    // Otherwise every request (each JetStream publish, pull and API call) builds two Error objects
    // with stack traces up front, in case it fails: a sixth of the pipeline's CPU under load.
    // Errors keep their messages; they lose only the stack of the call that started them.
    noAsyncTraces: true,
  };
  if (env["NATS_USER"]) opts.user = env["NATS_USER"];
  if (env["NATS_PASSWORD"]) opts.pass = env["NATS_PASSWORD"];
  if (env["NATS_TOKEN"]) opts.token = env["NATS_TOKEN"];
  if (env["NATS_CREDS"]) opts.authenticator = credsAuthenticator(new Uint8Array(readFileSync(env["NATS_CREDS"])));
  if (env["NATS_INBOX_PREFIX"]) opts.inboxPrefix = env["NATS_INBOX_PREFIX"];
  if (env["NATS_TLS_CA"] || env["NATS_TLS_CERT"]) {
    opts.tls = {
      ...(env["NATS_TLS_CA"] ? { caFile: env["NATS_TLS_CA"] } : {}),
      ...(env["NATS_TLS_CERT"] ? { certFile: env["NATS_TLS_CERT"] } : {}),
      ...(env["NATS_TLS_KEY"] ? { keyFile: env["NATS_TLS_KEY"] } : {}),
    };
  }
  return opts;
}

/** Connects with {@link connectionOptions}. */
export function connectNats(servers: string | string[], name: string, env: NodeJS.ProcessEnv = process.env): Promise<NatsConnection> {
  return connect(connectionOptions(servers, name, env));
}
