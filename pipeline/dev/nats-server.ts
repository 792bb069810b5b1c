/**
 * Runs a local `nats-server` child process with JetStream and a temporary store: what
 * `sluice dev` and the tests use, so nothing depends on a server already running.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdtemp, readFile, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as delay } from "node:timers/promises";

const NATS_SERVER_BINARY = process.env["SLUICE_NATS_SERVER"] ?? "nats-server";
const START_TIMEOUT_MS = 15_000;

export class NatsServerMissingError extends Error {
  override readonly name = "NatsServerMissingError";
  constructor(binary: string, cause?: unknown) {
    super(
      `cannot run '${binary}': install nats-server (Debian/Ubuntu: apt-get install -y nats-server; ` +
        `or a release from the NATS project) or set SLUICE_NATS_SERVER to its path`,
      { cause },
    );
  }
}

export interface NatsServerOptions {
  /** Client port; a free one when omitted. */
  port?: number;
  /** JetStream store directory; a new temporary one (removed on stop) when omitted. */
  storeDir?: string;
  /** Extra configuration text appended to the generated config file. */
  config?: string;
  /** Print the server's log to this process's stderr. */
  verbose?: boolean;
}

/** Version of the nats-server binary, e.g. "2.9.10", or throws NatsServerMissingError. */
export function natsServerVersion(binary = NATS_SERVER_BINARY): string {
  const r = spawnSync(binary, ["--version"], { encoding: "utf8" });
  if (r.error || r.status !== 0) throw new NatsServerMissingError(binary, r.error);
  const m = /v?(\d+\.\d+\.\d+)/.exec(r.stdout);
  return m?.[1] ?? r.stdout.trim();
}

export class NatsServer {
  private child: ChildProcess | undefined;
  private stopped = false;

  private constructor(
    readonly port: number,
    readonly storeDir: string,
    private readonly ownsStore: boolean,
    private readonly workDir: string,
    private readonly opts: NatsServerOptions,
  ) {}

  get url(): string {
    return `nats://127.0.0.1:${this.port}`;
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** Starts a server and resolves once it accepts clients. */
  static async start(opts: NatsServerOptions = {}): Promise<NatsServer> {
    natsServerVersion();
    const workDir = await mkdtemp(join(tmpdir(), "sluice-nats-"));
    const storeDir = opts.storeDir ?? join(workDir, "js");
    const s = new NatsServer(opts.port ?? -1, storeDir, opts.storeDir === undefined, workDir, opts);
    try {
      await s.launch();
    } catch (err) {
      await rm(workDir, { recursive: true, force: true });
      throw err;
    }
    return s;
  }

  private async launch(): Promise<void> {
    const portsDir = join(this.workDir, "ports");
    await rm(portsDir, { recursive: true, force: true });
    const conf = join(this.workDir, "nats.conf");
    await writeFile(
      conf,
      [
        `listen: 127.0.0.1:${this.port}`,
        `jetstream { store_dir: ${JSON.stringify(this.storeDir)} }`,
        `ports_file_dir: ${JSON.stringify(portsDir)}`,
        this.opts.config ?? "",
      ].join("\n"),
    );
    await import("node:fs/promises").then((fs) => fs.mkdir(portsDir, { recursive: true }));
    const child = spawn(NATS_SERVER_BINARY, ["-c", conf], {
      stdio: ["ignore", "ignore", this.opts.verbose ? "inherit" : "pipe"],
    });
    this.child = child;
    let log = "";
    child.stderr?.on("data", (b: Buffer) => {
      if (log.length < 20_000) log += b.toString();
    });
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    child.once("error", () => undefined);
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (Date.now() < deadline) {
      const early = await Promise.race([exited, delay(25).then(() => "running" as const)]);
      if (early !== "running") throw new Error(`nats-server exited (${early}) during start:\n${log}`);
      const files = await readdir(portsDir).catch(() => [] as string[]);
      const f = files.find((n) => n.endsWith(".ports"));
      if (f) {
        const ports = JSON.parse(await readFile(join(portsDir, f), "utf8")) as { nats?: string[] };
        const url = ports.nats?.[0];
        if (url) {
          (this as { port: number }).port = Number(new URL(url).port);
          return;
        }
      }
    }
    child.kill("SIGKILL");
    throw new Error(`nats-server did not start within ${START_TIMEOUT_MS} ms:\n${log}`);
  }

  /** Stops the server (and its child) and restarts it on the same port and store. */
  async restart(): Promise<void> {
    await this.halt("SIGTERM");
    await this.launch();
  }

  /** Kills the process abruptly (as a crash would); `restart()` brings it back. */
  async kill(): Promise<void> {
    await this.halt("SIGKILL");
  }

  private async halt(signal: NodeJS.Signals): Promise<void> {
    const child = this.child;
    this.child = undefined;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    child.kill(signal);
    const t = setTimeout(() => child.kill("SIGKILL"), 5_000);
    t.unref();
    await exited;
    clearTimeout(t);
  }

  /** Stops the server and removes its temporary files. Safe to call twice. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    await this.halt("SIGTERM");
    await rm(this.workDir, { recursive: true, force: true });
    if (this.ownsStore) await rm(this.storeDir, { recursive: true, force: true });
  }
}
