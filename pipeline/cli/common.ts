/**
 * What every `sluice` command shares: the `--server` option, value parsers, the connection to
 * NATS (a failure names the URL), and the errors that end a command with one line.
 *
 * Exit status: 0 done, 1 the command ran and failed, 2 bad usage.
 */
import { InvalidArgumentError, Option } from "commander";
import type { NatsConnection } from "@nats-io/transport-node";
import { DEFAULT_NATS_URL } from "../config.js";
import { connectNats } from "../connection.js";

/** Exit status of a usage mistake (as the CLI's help says). */
export const EXIT_USAGE = 2;
/** Exit status of a command that ran and failed. */
export const EXIT_FAILED = 1;

/** A usage mistake found by a command itself (not by the parser): one line, exit 2. */
export class UsageError extends Error {
  override readonly name = "UsageError";
}

/** A command that could not do its work: one line on stderr, exit status `exitCode` (1 by default). */
export class CliError extends Error {
  override readonly name = "CliError";
  constructor(
    message: string,
    readonly exitCode: number = EXIT_FAILED,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** `--server URL[,URL...]`, falling back to `NATS_URL`, then the local default. */
export function serverOption(): Option {
  return new Option("--server <url>", `NATS server, or several separated by commas (default: $NATS_URL or ${DEFAULT_NATS_URL})`);
}

/** The servers to connect to, from `--server`, `NATS_URL` or the default. */
export function serversOf(opts: { server?: string | undefined }): string[] {
  const s = opts.server ?? process.env["NATS_URL"] ?? DEFAULT_NATS_URL;
  return s
    .split(",")
    .map((x) => x.trim())
    .filter(Boolean);
}

/** True when `err` says the NATS server could not be reached. */
export function isConnectFailure(err: unknown): boolean {
  const e = err as { name?: unknown; code?: unknown; message?: unknown } | null;
  const text = [e?.name, e?.code, e?.message].filter((x) => typeof x === "string" || typeof x === "number").join(" ");
  return /ConnectionError|ECONNREFUSED|ENOTFOUND|EAI_AGAIN|EHOSTUNREACH|ETIMEDOUT|connection refused|cannot connect|getaddrinfo/i.test(text);
}

/** The one line for a server that cannot be reached, naming where it was looked for. */
export function connectFailure(servers: readonly string[], err: unknown): CliError {
  const why = (err as Error)?.message ?? String(err);
  return new CliError(
    `cannot connect to NATS at ${servers.join(", ")} (${why}): start nats-server there, or give --server URL or NATS_URL`,
    EXIT_FAILED,
    { cause: err },
  );
}

/** Connects for a command; a server that cannot be reached is a {@link CliError} naming the URL. */
export async function connectCli(servers: readonly string[], name: string): Promise<NatsConnection> {
  try {
    return await connectNats([...servers], name);
  } catch (err) {
    throw isConnectFailure(err) ? connectFailure(servers, err) : err;
  }
}

/** Options of a command that talks to NATS. */
export type ServerOpts = { server?: string };

/** Runs `f` on a connection to the command's server, closing it afterwards. */
export async function withNats<T>(o: ServerOpts, f: (nc: NatsConnection) => Promise<T>): Promise<T> {
  const nc = await connectCli(serversOf(o), "sluice-cli");
  try {
    return await f(nc);
  } finally {
    await nc.close().catch(() => undefined);
  }
}

/** Parser of a non-negative integer option value. */
export function count(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value.trim()) || !Number.isSafeInteger(n)) throw new InvalidArgumentError("must be an integer >= 0.");
  return n;
}

/** Parser of a duration in milliseconds that may be fractional (a simulated device's cost). */
export function milliseconds(value: string): number {
  const n = Number(value);
  if (value.trim() === "" || !Number.isFinite(n) || n < 0) throw new InvalidArgumentError("must be a number of milliseconds >= 0.");
  return n;
}

/** Parser of a positive integer option value. */
export function positive(value: string): number {
  const n = count(value);
  if (n < 1) throw new InvalidArgumentError("must be an integer >= 1.");
  return n;
}

/** Parser of a port option: a port number, 0 for any free port, -1 for none (off). */
export function port(value: string): number {
  const n = Number(value);
  if (!/^-?\d+$/.test(value.trim()) || n < -1 || n > 65535) throw new InvalidArgumentError("must be a port, 0 (any free port) or -1 (off).");
  return n;
}

/** Parser of a JSON option value. */
export function json(value: string): unknown {
  try {
    return JSON.parse(value);
  } catch (err) {
    throw new InvalidArgumentError(`is not JSON (${(err as Error).message}).`);
  }
}

/** Resolves on SIGINT or SIGTERM: the one way a long-running command is told to stop. */
export function untilSignal(): Promise<NodeJS.Signals> {
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
