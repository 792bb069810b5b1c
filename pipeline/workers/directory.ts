/**
 * Worker registration in NATS KV (docs/protocol.md: bucket `infer_workers`, key
 * `<model>.<version>.<worker-id>`, value `{"endpoint", "capacity"}`).
 *
 * - {@link WorkerRegistration} (the worker side) writes its keys and refreshes them every third
 *   of the TTL; stopping deletes them, so the pipeline drains the worker at once.
 * - {@link WorkerDirectory} (the pipeline side) watches the bucket and keeps a {@link WorkerPool}
 *   in step. An entry not refreshed within the TTL is dropped even when no delete arrives (a
 *   worker that crashed): the server's own expiry of aged messages sends no notice before
 *   nats-server 2.11, so the directory sweeps by the entry's time.
 */
import type { NatsConnection, QueuedIterator } from "@nats-io/transport-node";
import { Kvm, type KV, type KvWatchEntry } from "@nats-io/kv";
import { TOKEN_RE, WORKERS_BUCKET, VERSION_RE, WORKER_ID_RE } from "../../proto/wire.js";

const DEFAULT_WORKER_TTL_MS = 15_000;

export interface WorkerEntry {
  model: string;
  version: string;
  workerId: string;
  endpoint: string;
  capacity: number;
  /** When the entry was last written (epoch ms). */
  updatedMs: number;
}

function workerKey(model: string, version: string, workerId: string): string {
  return `${model}.${version}.${workerId}`;
}

/** Splits `<model>.<version>.<worker-id>`; the version may itself contain dots. */
export function parseWorkerKey(key: string): { model: string; version: string; workerId: string } | undefined {
  const first = key.indexOf(".");
  const last = key.lastIndexOf(".");
  if (first <= 0 || last <= first) return undefined;
  const model = key.slice(0, first);
  const version = key.slice(first + 1, last);
  const workerId = key.slice(last + 1);
  if (!TOKEN_RE.test(model) || !VERSION_RE.test(version) || !WORKER_ID_RE.test(workerId)) return undefined;
  return { model, version, workerId };
}

export async function openWorkersBucket(nc: NatsConnection, ttlMs = DEFAULT_WORKER_TTL_MS, replicas = 1): Promise<KV> {
  // The bucket's TTL ages out entries of workers that are long gone.
  return new Kvm(nc).create(WORKERS_BUCKET, { history: 1, ttl: ttlMs * 4, replicas });
}

export interface WorkerRegistrationOptions {
  workerId: string;
  endpoint: string;
  capacity: number;
  /** The model versions this worker serves. */
  serves: Array<{ model: string; version: string }>;
  ttlMs?: number;
  onError?: (err: unknown) => void;
}

/** A worker's own registration, refreshed until stopped. */
export class WorkerRegistration {
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private constructor(
    private readonly kv: KV,
    private readonly opts: WorkerRegistrationOptions,
  ) {}

  static async start(nc: NatsConnection, opts: WorkerRegistrationOptions): Promise<WorkerRegistration> {
    if (!WORKER_ID_RE.test(opts.workerId)) throw new Error(`worker id '${opts.workerId}' must be 1-64 of A-Z a-z 0-9 _ -`);
    for (const s of opts.serves) {
      if (!TOKEN_RE.test(s.model) || !VERSION_RE.test(s.version)) throw new Error(`cannot register '${s.model}@${s.version}': bad model or version name`);
    }
    const ttl = opts.ttlMs ?? DEFAULT_WORKER_TTL_MS;
    const kv = await openWorkersBucket(nc, ttl);
    const r = new WorkerRegistration(kv, opts);
    await r.refresh();
    r.timer = setInterval(() => {
      r.refresh().catch((err: unknown) => {
        try {
          opts.onError?.(err);
        } catch {
          // ignore
        }
      });
    }, Math.max(100, Math.floor(ttl / 3)));
    r.timer.unref();
    return r;
  }

  private async refresh(): Promise<void> {
    if (this.stopped) return;
    const value = JSON.stringify({ endpoint: this.opts.endpoint, capacity: this.opts.capacity });
    for (const s of this.opts.serves) await this.kv.put(workerKey(s.model, s.version, this.opts.workerId), value);
  }

  /** Stops refreshing and deletes the entries (the pipeline drains this worker). Safe twice. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    for (const s of this.opts.serves) await this.kv.delete(workerKey(s.model, s.version, this.opts.workerId)).catch(() => undefined);
  }
}

export interface WorkerDirectoryTarget {
  add(model: string, version: string, endpoint: string, capacity?: number): void;
  remove(model: string, version: string, endpoint: string): void;
}

/** Watches `infer_workers` and keeps the pool's registered workers current. */
export class WorkerDirectory {
  private readonly entries = new Map<string, WorkerEntry>();
  private watcher: QueuedIterator<KvWatchEntry> | undefined;
  private loop: Promise<void> | undefined;
  private sweeper: NodeJS.Timeout | undefined;

  private constructor(
    private readonly target: WorkerDirectoryTarget,
    private readonly ttlMs: number,
    private readonly onInvalid?: (key: string, why: string) => void,
  ) {}

  static async start(
    nc: NatsConnection,
    target: WorkerDirectoryTarget,
    opts: { ttlMs?: number; replicas?: number; onInvalid?: (key: string, why: string) => void } = {},
  ): Promise<WorkerDirectory> {
    const ttl = opts.ttlMs ?? DEFAULT_WORKER_TTL_MS;
    const kv = await openWorkersBucket(nc, ttl, opts.replicas ?? 1);
    const d = new WorkerDirectory(target, ttl, opts.onInvalid);
    const w = await kv.watch();
    d.watcher = w;
    d.loop = (async () => {
      for await (const e of w) d.apply(e);
    })().catch(() => undefined);
    d.sweeper = setInterval(() => d.sweep(), Math.max(50, Math.floor(ttl / 4)));
    d.sweeper.unref();
    return d;
  }

  list(): WorkerEntry[] {
    return [...this.entries.values()];
  }

  private apply(e: KvWatchEntry): void {
    const k = parseWorkerKey(e.key);
    if (!k) {
      this.onInvalid?.(e.key, "key is not <model>.<version>.<worker-id>");
      return;
    }
    if (e.operation !== "PUT") {
      this.drop(e.key);
      return;
    }
    let v: { endpoint?: unknown; capacity?: unknown };
    try {
      v = e.json<{ endpoint?: unknown; capacity?: unknown }>();
    } catch {
      this.onInvalid?.(e.key, "value is not JSON");
      return;
    }
    if (typeof v.endpoint !== "string" || !/^[^\s]+:\d+$/.test(v.endpoint)) {
      this.onInvalid?.(e.key, "endpoint must be host:port");
      return;
    }
    const capacity = typeof v.capacity === "number" && v.capacity >= 1 ? Math.floor(v.capacity) : 1;
    const updatedMs = e.created.getTime();
    if (Date.now() - updatedMs > this.ttlMs) return; // already stale when seen
    const prev = this.entries.get(e.key);
    if (prev && prev.endpoint !== v.endpoint) this.target.remove(prev.model, prev.version, prev.endpoint);
    this.entries.set(e.key, { ...k, endpoint: v.endpoint, capacity, updatedMs });
    this.target.add(k.model, k.version, v.endpoint, capacity);
  }

  private drop(key: string): void {
    const prev = this.entries.get(key);
    if (!prev) return;
    this.entries.delete(key);
    this.target.remove(prev.model, prev.version, prev.endpoint);
  }

  private sweep(): void {
    const cutoff = Date.now() - this.ttlMs;
    for (const [key, e] of this.entries) if (e.updatedMs < cutoff) this.drop(key);
  }

  /** Stops watching. Safe to call twice. */
  async stop(): Promise<void> {
    if (this.sweeper) clearInterval(this.sweeper);
    this.sweeper = undefined;
    this.watcher?.stop();
    this.watcher = undefined;
    await this.loop;
  }
}
