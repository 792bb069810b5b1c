/**
 * Child processes of the benchmark: the system under test, the simulated worker, nats-server.
 * Every one is registered here so `stopAll()` can stop whatever is still running, whatever
 * went wrong, and the benchmark never leaves a process behind.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { readFileSync, rmSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { NatsServer } from "../../pipeline/dev/nats-server.js";

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
/**
 * Every system runs compiled (`scripts/build.mjs --all`), as deployed: through tsx a Node process
 * carries a TypeScript loader (about 35 MB more memory, and start-up work), which none of them
 * would in production. Built once per benchmark run, here, so it is never stale.
 */
export const BUILD = join(ROOT, "bench", ".build");

/** Compiles the project (the benchmark harness included) into {@link BUILD}. */
export function buildForBench(): void {
  const r = spawnSync(process.execPath, [join(ROOT, "scripts", "build.mjs"), "--all", "--out", BUILD], { cwd: ROOT, encoding: "utf8" });
  if (r.status !== 0) throw new Error(`building the benchmark's JavaScript failed:\n${r.stdout}${r.stderr}`);
}

/** A compiled entry point: `compiled("test/bench/raw-loop.ts")` is its .js in {@link BUILD}. */
export function compiled(source: string): string {
  return join(BUILD, source.replace(/\.ts$/, ".js"));
}

/** How long a child gets to print its ready line. */
export const READY_TIMEOUT_MS = 30_000;
/** How long a child gets to exit after SIGTERM before it is killed. */
export const STOP_GRACE_MS = 5_000;
/** Output kept per child, for error messages. */
const OUTPUT_LIMIT = 64 * 1024;

export class ChildFailedError extends Error {
  override readonly name = "ChildFailedError";
  constructor(
    readonly label: string,
    message: string,
    readonly output: string,
  ) {
    super(`${label}: ${message}\n--- output of ${label} (last lines) ---\n${output.split("\n").slice(-30).join("\n")}`);
  }
}

/** A child process started by the benchmark. */
export class BenchChild {
  private out = "";
  private readonly listeners = new Set<() => void>();
  private stopping: Promise<void> | undefined;
  readonly exited: Promise<void>;

  constructor(
    readonly label: string,
    readonly child: ChildProcess,
  ) {
    const onData = (b: Buffer): void => {
      this.out += b.toString();
      if (this.out.length > OUTPUT_LIMIT) this.out = this.out.slice(-OUTPUT_LIMIT / 2);
      for (const l of this.listeners) l();
    };
    child.stdout?.on("data", onData);
    child.stderr?.on("data", onData);
    this.exited = new Promise<void>((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) resolve();
      child.once("exit", () => {
        resolve();
        for (const l of this.listeners) l();
      });
      // A spawn failure emits 'error' and maybe no 'exit'.
      child.once("error", (err) => {
        this.out += `\nspawn error: ${err.message}`;
        resolve();
        for (const l of this.listeners) l();
      });
    });
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null && this.child.pid !== undefined;
  }

  output(): string {
    return this.out;
  }

  /** Resolves with the first match of `re` in the output; rejects when the child exits first or time runs out. */
  waitFor(re: RegExp, timeoutMs = READY_TIMEOUT_MS): Promise<RegExpExecArray> {
    return new Promise((resolve, reject) => {
      const done = (): void => {
        clearTimeout(timer);
        this.listeners.delete(check);
      };
      const check = (): void => {
        const m = re.exec(this.out);
        if (m) {
          done();
          resolve(m);
        } else if (!this.running) {
          done();
          reject(new ChildFailedError(this.label, `exited before it printed ${re}`, this.out));
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new ChildFailedError(this.label, `did not print ${re} within ${timeoutMs} ms`, this.out));
      }, timeoutMs);
      this.listeners.add(check);
      check();
    });
  }

  /** SIGTERM, then SIGKILL after the grace. Safe to call twice. */
  stop(graceMs = STOP_GRACE_MS): Promise<void> {
    this.stopping ??= (async () => {
      if (this.running) {
        this.child.kill("SIGTERM");
        const t = setTimeout(() => {
          if (this.running) this.child.kill("SIGKILL");
        }, graceMs);
        t.unref();
        await this.exited;
        clearTimeout(t);
      }
      children.delete(this);
    })();
    return this.stopping;
  }
}

const children = new Set<BenchChild>();
const servers = new Set<NatsServer>();
const tempDirs = new Set<string>();

/** A temporary directory, removed by `removeTempDir` or, failing that, by `stopAll()`. */
export async function makeTempDir(prefix: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

export async function removeTempDir(dir: string): Promise<void> {
  tempDirs.delete(dir);
  await rm(dir, { recursive: true, force: true });
}

/**
 * This process's environment without what would change a system's behaviour (`SLUICE_*`,
 * `NATS_URL`, `OTEL_*`), so a developer's shell does not change what is measured.
 */
export function cleanEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith("SLUICE_") || k.startsWith("OTEL_") || k === "NATS_URL") continue;
    env[k] = v;
  }
  return { ...env, ...extra };
}

/** Starts `node <args>` in the repository root with `cleanEnv(env)`, its output captured. */
export function spawnNode(label: string, args: string[], env: NodeJS.ProcessEnv = {}): BenchChild {
  const child = spawn(process.execPath, args, {
    cwd: ROOT,
    env: cleanEnv(env),
    stdio: ["ignore", "pipe", "pipe"],
  });
  const c = new BenchChild(label, child);
  children.add(c);
  return c;
}

/** A nats-server with its own temporary store, stopped by `stopAll()` if nobody else does. */
export async function startNats(): Promise<NatsServer> {
  const s = await NatsServer.start();
  servers.add(s);
  return s;
}

export async function stopNats(s: NatsServer): Promise<void> {
  servers.delete(s);
  await s.stop();
}

/** Stops every child and server still running. Safe to call at any time, and twice. */
export async function stopAll(): Promise<void> {
  await Promise.all([...children].map((c) => c.stop().catch(() => undefined)));
  await Promise.all([...servers].map((s) => stopNats(s).catch(() => undefined)));
  await Promise.all([...tempDirs].map((d) => removeTempDir(d).catch(() => undefined)));
}

/** Synchronous last resort (process 'exit'): SIGKILL whatever is left, remove temporary files. */
export function killAllNow(): void {
  for (const d of tempDirs) rmSync(d, { recursive: true, force: true });
  for (const c of children) if (c.running) c.child.kill("SIGKILL");
  for (const s of servers) {
    const pid = s.pid;
    if (pid !== undefined) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // already gone
      }
    }
  }
}

/** Peak resident set size (VmHWM) of a live process, MB; undefined when it cannot be read. */
export function peakRssMb(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(status);
    return m ? Number(m[1]) / 1024 : undefined;
  } catch {
    return undefined;
  }
}

/** A simulated gRPC worker in its own process (`sluice worker`); resolves with its endpoint. */
export async function startWorkerProcess(device: { baseMs: number; perItemMs: number }): Promise<{ proc: BenchChild; endpoint: string }> {
  const proc = spawnNode("worker", [
    compiled("pipeline/cli/main.ts"),
    "worker",
    "--host",
    "127.0.0.1",
    "--base-ms",
    String(device.baseMs),
    "--per-item-ms",
    String(device.perItemMs),
  ]);
  try {
    const m = await proc.waitFor(/sluice worker ready: (\S+)/);
    return { proc, endpoint: m[1]! };
  } catch (err) {
    await proc.stop();
    throw err;
  }
}
