/**
 * Cancellation (docs/protocol.md: `infer.cancel.<tenant>.<id>`). Every pipeline process subscribes
 * (not as a queue group: the process that holds the request must hear it) and remembers each
 * cancelled request for a while, so a request cancelled while it still waits in the stream is
 * answered `CANCELLED` when it is pulled, one in a batch window is never sent, and a running
 * generation is stopped at once.
 *
 * Limits: the memory is bounded (oldest forgotten first) and per process; a process that starts
 * after a cancel was sent does not know of it.
 */
import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import { ID_RE, subjects, TOKEN_RE } from "../../proto/wire.js";

const DEFAULT_CANCEL_MEMORY = 100_000;
const DEFAULT_CANCEL_TTL_MS = 10 * 60_000;

export class CancelRegistry {
  private readonly cancelled = new Map<string, number>();
  private readonly running = new Map<string, Set<AbortController>>();
  private sub: Subscription | undefined;
  /** Cancels heard (for metrics and tests). */
  heard = 0;

  constructor(
    private readonly maxRemembered = DEFAULT_CANCEL_MEMORY,
    private readonly ttlMs = DEFAULT_CANCEL_TTL_MS,
  ) {}

  /** Starts listening on `infer.cancel.*.*`. */
  listen(nc: NatsConnection): this {
    this.sub = nc.subscribe(subjects.cancelAll, {
      callback: (err, msg) => {
        if (err) return;
        const [, , tenant, id] = msg.subject.split(".");
        if (tenant && id) this.cancel(tenant, id);
      },
    });
    return this;
  }

  /** Marks a request cancelled and aborts its running work, if any. */
  cancel(tenant: string, id: string): void {
    if (!TOKEN_RE.test(tenant) || !ID_RE.test(id)) return;
    this.heard++;
    const key = `${tenant}.${id}`;
    this.cancelled.delete(key);
    this.cancelled.set(key, Date.now());
    while (this.cancelled.size > this.maxRemembered) {
      const oldest = this.cancelled.keys().next().value;
      if (oldest === undefined) break;
      this.cancelled.delete(oldest);
    }
    for (const c of this.running.get(key) ?? []) c.abort(new Error("cancelled by the client"));
  }

  isCancelled(tenant: string, id: string): boolean {
    const key = `${tenant}.${id}`;
    const at = this.cancelled.get(key);
    if (at === undefined) return false;
    if (Date.now() - at > this.ttlMs) {
      this.cancelled.delete(key);
      return false;
    }
    return true;
  }

  /**
   * A signal that aborts when the request is cancelled (already aborted when it was); `done()`
   * must be called when the work ends.
   */
  track(tenant: string, id: string): { signal: AbortSignal; done: () => void } {
    const key = `${tenant}.${id}`;
    const c = new AbortController();
    if (this.isCancelled(tenant, id)) c.abort(new Error("cancelled by the client"));
    let set = this.running.get(key);
    if (!set) this.running.set(key, (set = new Set()));
    set.add(c);
    return {
      signal: c.signal,
      done: () => {
        const s = this.running.get(key);
        s?.delete(c);
        if (s && s.size === 0) this.running.delete(key);
      },
    };
  }

  /** Stops listening. Safe to call twice. */
  stop(): void {
    this.sub?.unsubscribe();
    this.sub = undefined;
  }
}
