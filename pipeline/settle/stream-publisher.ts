/**
 * JetStream publishes whose acknowledgements come back on one inbox, as the asynchronous
 * publishers of other NATS clients work: one wildcard subscription for every acknowledgement,
 * one timer that fails those overdue, and no request object, timer or error built per publish.
 * The results of the hot path go out through it; what it answers is what `js.publish` answers
 * (the stream's {@link PubAck}, or a {@link JetStreamApiError} when the stream refused it).
 */
import { JetStreamApiError, type PubAck } from "@nats-io/jetstream";
import { ClosedConnectionError, createInbox, TimeoutError, type Msg, type MsgHdrs, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import { H } from "../../proto/wire.js";

/** How long a publish waits for the stream's acknowledgement, by default (as `js.publish`). */
export const DEFAULT_PUBLISH_ACK_TIMEOUT_MS = 5_000;
/** How often publishes past their timeout are failed. */
const OVERDUE_SWEEP_MS = 250;

/** No stream (and nobody else) listens on the subject: the message reached no one. */
export class NoStreamError extends Error {
  override readonly name = "NoStreamError";
}

/** The connection closed before the acknowledgement came: the message may have been stored. */
export class AckLostError extends Error {
  override readonly name = "AckLostError";
}

interface Waiting {
  readonly resolve: (ack: PubAck) => void;
  readonly reject: (err: unknown) => void;
  readonly deadline: number;
  readonly subject: string;
}

export interface StreamPublisherOptions {
  /** How long a publish waits for its acknowledgement (default {@link DEFAULT_PUBLISH_ACK_TIMEOUT_MS}). */
  timeoutMs?: number;
  /** Where acknowledgements come back (default: the connection's own inbox prefix). */
  inboxPrefix?: string;
}

/** The inbox prefix the connection was opened with (a user may only subscribe to its own inboxes). */
function inboxPrefixOf(nc: NatsConnection): string | undefined {
  const prefix = (nc as Partial<{ options: { inboxPrefix?: unknown } }>).options?.inboxPrefix;
  return typeof prefix === "string" && prefix !== "" ? prefix : undefined;
}

export class StreamPublisher {
  private readonly prefix: string;
  private readonly timeoutMs: number;
  private readonly waiting = new Map<string, Waiting>();
  private sub: Subscription | undefined;
  private sweeper: ReturnType<typeof setInterval> | undefined;
  private next = 0;
  private closed = false;
  private readonly decoder = new TextDecoder();

  constructor(
    private readonly nc: NatsConnection,
    opts: StreamPublisherOptions = {},
  ) {
    this.prefix = `${createInbox(opts.inboxPrefix ?? inboxPrefixOf(nc))}.`;
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_PUBLISH_ACK_TIMEOUT_MS;
    // A connection that closes takes the acknowledgements still to come with it.
    void nc.closed().then(() => this.close(new AckLostError("the connection closed before the stream acknowledged the message")));
  }

  /**
   * Publishes `data` on `subject` with `Nats-Msg-Id: msgID` (set on `headers`) and resolves with
   * the stream's acknowledgement. Throws at once what the connection refuses (closed, draining,
   * over max_payload), and a `ClosedConnectionError` once closed: then nothing left this process.
   */
  publish(subject: string, data: Uint8Array, opts: { msgID: string; headers: MsgHdrs }): Promise<PubAck> {
    // Closed: nothing is sent, as on a closed connection.
    if (this.closed) return Promise.reject(new ClosedConnectionError());
    const token = (this.next++).toString(36);
    opts.headers.set(H.msgId, opts.msgID);
    return new Promise<PubAck>((resolve, reject) => {
      try {
        this.sub ??= this.nc.subscribe(`${this.prefix}*`, { callback: (err, m) => this.answer(err, m) });
        this.nc.publish(subject, data, { headers: opts.headers, reply: this.prefix + token });
      } catch (err) {
        reject(err instanceof Error ? err : new Error(String(err)));
        return;
      }
      this.waiting.set(token, { resolve, reject, deadline: Date.now() + this.timeoutMs, subject });
      this.sweeper ??= setInterval(() => this.sweep(), OVERDUE_SWEEP_MS).unref();
    });
  }

  /** Publishes waiting for their acknowledgement. */
  get pending(): number {
    return this.waiting.size;
  }

  /** Stops: publishes still waiting fail with `reason` (an {@link AckLostError} by default). */
  close(reason: unknown = new AckLostError("the publisher closed before the stream acknowledged the message")): void {
    if (this.closed) return;
    this.closed = true;
    if (this.sweeper) clearInterval(this.sweeper);
    this.sweeper = undefined;
    try {
      this.sub?.unsubscribe();
    } catch {
      // the connection is gone already
    }
    const waiting = [...this.waiting.values()];
    this.waiting.clear();
    for (const w of waiting) w.reject(reason);
  }

  private answer(err: Error | null, m: Msg): void {
    const token = m.subject.slice(this.prefix.length);
    const w = this.waiting.get(token);
    if (!w) return;
    this.waiting.delete(token);
    if (err) {
      w.reject(err);
      return;
    }
    if (m.data.length === 0 && m.headers?.code === 503) {
      w.reject(new NoStreamError(`no stream stores '${w.subject}' (no responders)`));
      return;
    }
    try {
      const v = JSON.parse(this.decoder.decode(m.data)) as PubAck & { error?: ConstructorParameters<typeof JetStreamApiError>[0] };
      if (v.error) w.reject(new JetStreamApiError(v.error));
      else if (typeof v.stream !== "string" || v.stream === "") w.reject(new Error(`invalid acknowledgement: ${this.decoder.decode(m.data).slice(0, 200)}`));
      else w.resolve({ ...v, duplicate: v.duplicate === true });
    } catch (e) {
      w.reject(e);
    }
  }

  /** Fails the publishes past their deadline (they wait in the order they were made). */
  private sweep(): void {
    const now = Date.now();
    for (const [token, w] of this.waiting) {
      if (w.deadline > now) break;
      this.waiting.delete(token);
      w.reject(new TimeoutError());
    }
    if (this.waiting.size === 0 && this.sweeper) {
      clearInterval(this.sweeper);
      this.sweeper = undefined;
    }
  }
}
