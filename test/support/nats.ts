/** Test harness: a real nats-server per suite, on a free port, with its own JetStream store. */
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { NatsServer, NatsServerMissingError } from "../../pipeline/dev/nats-server.js";

export interface NatsFixture {
  readonly server: NatsServer;
  readonly url: string;
  /** A connection for the test itself (closed after the suite). */
  readonly nc: NatsConnection;
}

/**
 * Registers before/after hooks in the calling `describe` that start a nats-server and stop it
 * (removing its store) after the suite. A missing binary fails the suite with how to install it.
 */
export function useNats(): NatsFixture {
  let server: NatsServer | undefined;
  let nc: NatsConnection | undefined;
  before(async function () {
    this.timeout(30_000);
    try {
      server = await NatsServer.start();
    } catch (err) {
      if (err instanceof NatsServerMissingError) throw new Error(`integration tests need nats-server: ${err.message}`);
      throw err;
    }
    nc = await connect({ servers: server.url, name: "sluice-test" });
  });
  after(async function () {
    this.timeout(30_000);
    await nc?.close().catch(() => undefined);
    await server?.stop();
  });
  return {
    get server() {
      if (!server) throw new Error("nats-server not started yet");
      return server;
    },
    get url() {
      if (!server) throw new Error("nats-server not started yet");
      return server.url;
    },
    get nc() {
      if (!nc) throw new Error("not connected yet");
      return nc;
    },
  };
}

/** Polls `f` until it returns true or `timeoutMs` passes (then throws with `what`). */
export async function waitFor(what: string, f: () => boolean | Promise<boolean>, timeoutMs = 20_000, everyMs = 20): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await f()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}
