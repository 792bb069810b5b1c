/**
 * The router's own index of which prompt blocks it sent to which worker (docs/protocol.md,
 * "Prefix blocks"), each remembered for a time to live, and of which worker each session last
 * went to. A worker's own report of the blocks it holds replaces what the index guessed for it.
 * Each block's value is when it was last sent (epoch ms).
 */
import { TTLCache } from "@isaacs/ttlcache";

/** How long a block sent to a worker is assumed to stay in its cache. */
const DEFAULT_PREFIX_TTL_MS = 120_000;
/** Blocks remembered per worker (a bound on memory; the oldest go first). */
const DEFAULT_PREFIX_BLOCKS_PER_WORKER = 100_000;
/** Blocks sent this long before a report was asked for are kept even when it does not show them. */
const REPORT_GRACE_MS = 2_000;
/** Sessions remembered. */
const DEFAULT_MAX_SESSIONS = 100_000;

export interface PrefixIndexOptions {
  ttlMs?: number;
  blocksPerWorker?: number;
  maxSessions?: number;
}

export class PrefixIndex {
  private readonly byWorker = new Map<string, TTLCache<string, number>>();
  private readonly sessions: TTLCache<string, string>;
  private readonly ttlMs: number;
  private readonly blocksPerWorker: number;

  constructor(opts: PrefixIndexOptions = {}) {
    this.ttlMs = opts.ttlMs ?? DEFAULT_PREFIX_TTL_MS;
    this.blocksPerWorker = opts.blocksPerWorker ?? DEFAULT_PREFIX_BLOCKS_PER_WORKER;
    this.sessions = new TTLCache({ ttl: this.ttlMs, max: opts.maxSessions ?? DEFAULT_MAX_SESSIONS, checkAgeOnGet: true });
  }

  private blocksOf(worker: string): TTLCache<string, number> {
    let c = this.byWorker.get(worker);
    if (!c) this.byWorker.set(worker, (c = new TTLCache({ ttl: this.ttlMs, max: this.blocksPerWorker, checkAgeOnHas: true })));
    return c;
  }

  /** Notes that the prompt of `hashes` (and `session`, if any) went to `worker`. */
  record(worker: string, hashes: readonly string[], session?: string): void {
    const c = this.blocksOf(worker);
    const now = Date.now();
    for (const h of hashes) c.set(h, now);
    if (session !== undefined) this.sessions.set(session, worker);
  }

  /** Leading blocks of `hashes` that `worker` is thought to hold. */
  matched(worker: string, hashes: readonly string[]): number {
    const c = this.byWorker.get(worker);
    if (!c) return 0;
    let n = 0;
    while (n < hashes.length && c.has(hashes[n]!)) n++;
    return n;
  }

  /** The worker the session last went to, while remembered. */
  sessionWorker(session: string): string | undefined {
    return this.sessions.get(session);
  }

  /**
   * What the worker reports it holds replaces what the index thought, except blocks sent there
   * shortly before the report was asked for (`askedAtMs`, epoch ms) or since: the engine may not
   * have admitted their request yet when it answered.
   */
  replace(worker: string, hashes: readonly string[], askedAtMs: number): void {
    const c = this.blocksOf(worker);
    const recent = [...c.entries()].filter(([, at]) => at >= askedAtMs - REPORT_GRACE_MS);
    c.clear();
    for (const h of hashes) c.set(h, askedAtMs - REPORT_GRACE_MS - 1);
    for (const [h, at] of recent) c.set(h, at);
  }

  /** Forgets a worker (removed from the pool). */
  forget(worker: string): void {
    this.byWorker.get(worker)?.clear();
    this.byWorker.delete(worker);
  }

  /** Blocks remembered for `worker`. */
  size(worker: string): number {
    return this.byWorker.get(worker)?.size ?? 0;
  }

  /** Drops everything (and the caches' timers). */
  clear(): void {
    for (const c of this.byWorker.values()) c.clear();
    this.byWorker.clear();
    this.sessions.clear();
  }
}
