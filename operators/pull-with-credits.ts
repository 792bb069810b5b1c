import { Observable } from "rxjs";
import type { Delivery } from "./types.js";
import { backoffMs, type Backoff } from "./support/backoff.js";

/** One pull request to the queue: yields up to the requested number of messages, then ends. */
export interface PullBatch<M> extends AsyncIterable<M> {
  /** Ends the pull early (teardown). */
  close(): Promise<unknown>;
}

/** Where messages come from: a JetStream pull consumer, or anything shaped like one. */
export interface PullSource {
  /** Ask for up to `max` messages; the batch ends when they arrived or `expiresMs` passed. */
  pull(max: number, expiresMs: number): Promise<PullBatch<Delivery>>;
}

export interface PullWithCreditsOptions {
  /** The bound: never more than this many delivered and not yet settled. */
  maxUnsettled: number;
  /** How long one pull request waits for messages on an idle queue. */
  expiresMs?: number;
  /**
   * While a pull is outstanding, open another only when at least this many credits are free
   * (fewer, larger pulls under load). Default: a quarter of `maxUnsettled`.
   */
  minPull?: number;
  /**
   * Held messages older than this are reported as still in progress (`working()`), so the
   * queue does not redeliver them while they wait for a busy worker. 0 turns it off.
   */
  workingIntervalMs?: number;
  /** A failed pull is retried after a backoff; this hears of it. Must not throw. */
  onPullError?: (err: unknown) => void;
  /**
   * When this emits, the source stops pulling, and completes once everything it delivered has
   * been settled: a graceful drain.
   */
  drain?: Observable<unknown>;
  /** Hears each change of the unsettled count (for metrics and tests). Must not throw. */
  onUnsettledChange?: (unsettled: number) => void;
}

export const DEFAULT_PULL_EXPIRES_MS = 5_000;
const PULL_RETRY: Backoff = { baseMs: 100, maxMs: 5_000 };

/**
 * A source with bounded demand: it pulls from the queue only while fewer than
 * `maxUnsettled` messages it delivered are unsettled, and pulls more as they are settled.
 * A backlog stays in the queue (on the broker's disk), not in this process's memory.
 *
 * ```
 * queue:    a b c d e f ...
 * credits:  2
 * output:   a b ----(a acked) c --(b naked) d ...
 * ```
 *
 * Each emitted {@link Delivery} returns its credit when it is acked, naked or termed (once).
 * Pull failures (a broker restart, a lost connection) are retried with backoff; the
 * Observable only completes when unsubscribed.
 *
 * @example
 * pullWithCredits(consumerSource, { maxUnsettled: 256 }).pipe(decodeRequest(), ...)
 */
export function pullWithCredits(source: PullSource, opts: PullWithCreditsOptions): Observable<Delivery> {
  const max = Math.max(1, Math.floor(opts.maxUnsettled));
  const minPull = Math.max(1, Math.min(max, opts.minPull ?? Math.ceil(max / 4)));
  const expiresMs = opts.expiresMs ?? DEFAULT_PULL_EXPIRES_MS;
  const workingIntervalMs = opts.workingIntervalMs ?? 0;

  return new Observable<Delivery>((subscriber) => {
    let closed = false;
    let unsettled = 0;
    let requested = 0;
    let failures = 0;
    let retryTimer: NodeJS.Timeout | undefined;
    const pulls = new Set<PullBatch<Delivery>>();
    const held = new Set<CreditedDelivery>();
    // Stream sequences held now: a redelivery of a message still being worked on (its ack
    // timer ran out) is dropped here, so one request is never processed twice at once.
    const heldSeqs = new Set<number>();

    const changed = (): void => {
      try {
        opts.onUnsettledChange?.(unsettled);
      } catch {
        // a listener must never break the flow
      }
    };

    let draining = false;
    const finishDrain = (): void => {
      if (draining && unsettled === 0 && requested === 0 && !closed) subscriber.complete();
    };

    const release = (d: CreditedDelivery): void => {
      held.delete(d);
      heldSeqs.delete(d.seq);
      unsettled--;
      changed();
      pump();
      finishDrain();
    };

    const pump = (): void => {
      if (closed || draining || retryTimer !== undefined) return;
      const free = max - unsettled - requested;
      if (free <= 0) return;
      // `requested`, not `pulls`: a pull still being opened is outstanding too.
      if (requested > 0 && free < minPull) return;
      void pullOnce(free);
    };

    const pullOnce = async (n: number): Promise<void> => {
      requested += n;
      let got = 0;
      let batch: PullBatch<Delivery> | undefined;
      try {
        batch = await source.pull(n, expiresMs);
        if (closed) {
          await batch.close();
          return;
        }
        pulls.add(batch);
        // A drain that began while this pull was being opened: end it now, not at its expiry.
        if (draining) void batch.close().catch(() => undefined);
        for await (const m of batch) {
          got++;
          requested--;
          if (closed || draining || subscriber.closed) {
            // Not ours to process any more: let the queue give it to someone else at once.
            m.nak();
            continue;
          }
          if (heldSeqs.has(m.seq)) continue;
          const d = new CreditedDelivery(m, release);
          held.add(d);
          heldSeqs.add(m.seq);
          unsettled++;
          changed();
          subscriber.next(d);
        }
        failures = 0;
      } catch (err) {
        failures++;
        if (!closed) {
          try {
            opts.onPullError?.(err);
          } catch {
            // ignore
          }
          const wait = backoffMs(failures - 1, PULL_RETRY);
          if (retryTimer === undefined) {
            retryTimer = setTimeout(() => {
              retryTimer = undefined;
              pump();
            }, wait);
            retryTimer.unref?.();
          }
        }
      } finally {
        requested -= n - got;
        if (batch) pulls.delete(batch);
      }
      pump();
      finishDrain();
    };

    let workingTimer: NodeJS.Timeout | undefined;
    if (workingIntervalMs > 0) {
      workingTimer = setInterval(() => {
        const cutoff = Date.now() - workingIntervalMs;
        for (const d of held) if (d.pulledAtMs <= cutoff) d.working();
      }, workingIntervalMs);
      workingTimer.unref?.();
    }

    const drainSub = opts.drain?.subscribe(() => {
      if (draining) return;
      draining = true;
      if (retryTimer !== undefined) clearTimeout(retryTimer);
      retryTimer = undefined;
      for (const p of pulls) void p.close().catch(() => undefined);
      finishDrain();
    });

    pump();

    return () => {
      drainSub?.unsubscribe();
      closed = true;
      if (retryTimer !== undefined) clearTimeout(retryTimer);
      if (workingTimer !== undefined) clearInterval(workingTimer);
      for (const p of pulls) void p.close().catch(() => undefined);
      pulls.clear();
    };
  });
}

/** A delivery that hands its credit back the first time it is settled. */
export class CreditedDelivery implements Delivery {
  private done = false;
  constructor(
    private readonly inner: Delivery,
    private readonly onSettle: (d: CreditedDelivery, how: "ack" | "nak" | "term") => void,
  ) {}
  get subject(): string {
    return this.inner.subject;
  }
  get data(): Uint8Array {
    return this.inner.data;
  }
  get seq(): number {
    return this.inner.seq;
  }
  get deliveryCount(): number {
    return this.inner.deliveryCount;
  }
  get storedAtMs(): number {
    return this.inner.storedAtMs;
  }
  get pulledAtMs(): number {
    return this.inner.pulledAtMs;
  }
  get settled(): boolean {
    return this.done;
  }
  header(name: string): string | undefined {
    return this.inner.header(name);
  }
  headerEntries(): Array<[string, string]> {
    return this.inner.headerEntries();
  }
  private settle(how: "ack" | "nak" | "term", f: () => void): void {
    if (this.done) return;
    this.done = true;
    try {
      f();
    } finally {
      this.onSettle(this, how);
    }
  }
  ack(): void {
    this.settle("ack", () => this.inner.ack());
  }
  nak(delayMs?: number): void {
    this.settle("nak", () => this.inner.nak(delayMs));
  }
  term(reason?: string): void {
    this.settle("term", () => this.inner.term(reason));
  }
  working(): void {
    if (!this.done) this.inner.working();
  }
}
