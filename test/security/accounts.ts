/**
 * Test support for the security suite: a nats-server running the users and permissions of
 * `infra/nats/accounts.conf` (the file itself, not a copy), connections as those users, and a
 * log of the permission errors the server sends back to each connection.
 */
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { connect, PermissionViolationError, type NatsConnection } from "@nats-io/transport-node";
import { NatsServer } from "../../pipeline/dev/nats-server.js";
import { ROOT } from "../support/process.js";

export const ACCOUNTS_CONF = join(ROOT, "infra", "nats", "accounts.conf");

/** The password variables accounts.conf reads, by user. */
const PASSWORD_VARS: Record<string, string> = {
  pipeline: "SLUICE_PIPELINE_PASSWORD",
  worker: "SLUICE_WORKER_PASSWORD",
  "tenant-acme": "SLUICE_TENANT_ACME_PASSWORD",
  "tenant-globex": "SLUICE_TENANT_GLOBEX_PASSWORD",
  sys: "SLUICE_SYS_PASSWORD",
};

/** The inbox prefix each user may subscribe to (accounts.conf, "Inboxes"). */
export const INBOX_PREFIX: Record<string, string> = {
  pipeline: "_INBOX_sluice",
  worker: "_INBOX_worker",
  "tenant-acme": "_INBOX_acme",
  "tenant-globex": "_INBOX_globex",
};

export interface SecuredServer {
  readonly server: NatsServer;
  readonly passwords: Readonly<Record<string, string>>;
}

/**
 * Starts nats-server with accounts.conf appended to the harness's own lines (listen, the
 * JetStream store, the ports file). The passwords are fresh random ones, defined as config
 * variables ahead of the accounts block, exactly as the environment would supply them.
 */
export async function startSecuredServer(): Promise<SecuredServer> {
  const passwords: Record<string, string> = {};
  const vars: string[] = [];
  for (const [user, variable] of Object.entries(PASSWORD_VARS)) {
    passwords[user] = randomBytes(18).toString("base64url");
    vars.push(`${variable}: "${passwords[user]}"`);
  }
  const config = [...vars, readFileSync(ACCOUNTS_CONF, "utf8")].join("\n");
  const server = await NatsServer.start({ config });
  return { server, passwords };
}

/** A connection as one user, with the permission errors the server sent it. */
export class UserConnection {
  readonly denied: PermissionViolationError[] = [];
  private readonly watching: Promise<void>;

  private constructor(
    readonly user: string,
    readonly nc: NatsConnection,
  ) {
    this.watching = (async () => {
      for await (const s of nc.status()) {
        if (s.type === "error" && s.error instanceof PermissionViolationError) this.denied.push(s.error);
      }
    })();
  }

  static async open(secured: SecuredServer, user: string, opts: { inboxPrefix?: string; reconnect?: boolean } = {}): Promise<UserConnection> {
    const pass = secured.passwords[user];
    if (pass === undefined) throw new Error(`no password for user '${user}'`);
    const inboxPrefix = opts.inboxPrefix ?? INBOX_PREFIX[user];
    const nc = await connect({
      servers: secured.server.url,
      user,
      pass,
      name: `security-${user}`,
      ...(inboxPrefix !== undefined ? { inboxPrefix } : {}),
      ...(opts.reconnect === false ? { reconnect: false } : { maxReconnectAttempts: -1, reconnectTimeWait: 250 }),
    });
    return new UserConnection(user, nc);
  }

  /** Permission errors for `subject` in the given operation. */
  deniedFor(operation: "publish" | "subscription", subject: string): PermissionViolationError[] {
    return this.denied.filter((e) => e.operation === operation && e.subject === subject);
  }

  /**
   * Resolves with the permission error for `subject` once the server has sent it, or rejects
   * after `timeoutMs`. The server answers a denied publish or subscribe with `-ERR
   * 'Permissions Violation ...'` and keeps the connection open.
   */
  async waitDenied(operation: "publish" | "subscription", subject: string, timeoutMs = 5_000): Promise<PermissionViolationError> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const hit = this.deniedFor(operation, subject)[0];
      if (hit) return hit;
      if (Date.now() > deadline) {
        throw new Error(`no permission error for ${operation} to '${subject}' within ${timeoutMs} ms (saw: ${this.denied.map((e) => e.message).join("; ") || "none"})`);
      }
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  async close(): Promise<void> {
    await this.nc.close().catch(() => undefined);
    await this.watching.catch(() => undefined);
  }
}
