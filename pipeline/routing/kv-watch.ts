/**
 * Keeps an in-memory view in step with a NATS KV bucket: the shared watch loop of the model
 * registry and the tenant registry.
 */
import { Kvm, type KV, type KvWatchEntry } from "@nats-io/kv";
import type { NatsConnection, QueuedIterator } from "@nats-io/transport-node";

const INITIAL_LOAD_TIMEOUT_MS = 5_000;
/** Values kept per key in a registry bucket (the last few, to see what changed). */
const REGISTRY_HISTORY = 5;

/** Opens (creating if needed) a registry bucket. */
export function openRegistryBucket(nc: NatsConnection, bucket: string, replicas: number): Promise<KV> {
  return new Kvm(nc).create(bucket, { history: REGISTRY_HISTORY, replicas });
}

export interface BucketHandlers {
  /** A key was written; `value` is its JSON. Throwing marks the value invalid (it is skipped). */
  put(key: string, value: unknown): void;
  /** A key was deleted or purged. */
  remove(key: string): void;
  /** An invalid value (`key` set) or the watch itself failing (`key` undefined). Must not throw. */
  onError?(key: string | undefined, err: Error): void;
}

export interface BucketWatch {
  /** Stops watching. Safe to call twice. */
  stop(): Promise<void>;
}

/**
 * Starts watching `kv` and resolves once its current values are applied (or after
 * `initialLoadTimeoutMs`, so a slow bucket never blocks start-up for long).
 */
export async function watchBucket(kv: KV, h: BucketHandlers, initialLoadTimeoutMs = INITIAL_LOAD_TIMEOUT_MS): Promise<BucketWatch> {
  const report = (key: string | undefined, err: unknown): void => {
    try {
      h.onError?.(key, err instanceof Error ? err : new Error(String(err)));
    } catch {
      // a listener's failure is its own
    }
  };
  const status = await kv.status();
  let markReady!: () => void;
  const ready = new Promise<void>((r) => (markReady = r));
  if (status.values === 0) markReady();
  const w: QueuedIterator<KvWatchEntry> = await kv.watch();
  let stopped = false;
  const loop = (async () => {
    for await (const e of w) {
      if (e.operation === "PUT") {
        try {
          h.put(e.key, e.json<unknown>());
        } catch (err) {
          report(e.key, err);
        }
      } else {
        h.remove(e.key);
      }
      // The last entry of the initial load has delta 0 (the client marks it as an update).
      if ((e.delta ?? 0) === 0) markReady();
    }
  })().catch((err: unknown) => {
    // The view stops following the bucket: say so rather than go stale in silence.
    if (!stopped) report(undefined, err);
  });
  const t = setTimeout(markReady, initialLoadTimeoutMs);
  t.unref();
  await ready;
  clearTimeout(t);
  return {
    stop: async () => {
      if (stopped) return;
      stopped = true;
      w.stop();
      await loop;
    },
  };
}

/**
 * Writes each seed value whose key the bucket does not have yet (a value already there wins over
 * the seed). `parse` checks a seed (throwing on a bad one) and gives its bucket key and value.
 */
export async function seedBucket<V>(kv: KV, seed: Record<string, V>, parse: (name: string, value: V) => [key: string, value: unknown]): Promise<void> {
  for (const [name, value] of Object.entries(seed)) {
    const [key, parsed] = parse(name, value);
    try {
      await kv.create(key, JSON.stringify(parsed));
    } catch {
      // Already there: the bucket's value wins over the seed.
    }
  }
}

/** What the KV-backed registries share: their bucket, its watch, and stopping it. */
export abstract class BucketRegistry {
  private watching: BucketWatch | undefined;

  protected constructor(
    readonly kv: KV,
    private readonly bucket: string,
  ) {}

  /** Starts watching the bucket; invalid values go to `onInvalid` (under the bucket's name when the watch itself fails). */
  protected async watch(h: Omit<BucketHandlers, "onError">, onInvalid?: (key: string, err: Error) => void): Promise<void> {
    this.watching = await watchBucket(this.kv, { ...h, onError: (key, err) => onInvalid?.(key ?? this.bucket, err) });
  }

  /** Stops watching. Safe to call twice. */
  async stop(): Promise<void> {
    await this.watching?.stop();
  }
}
