/**
 * Streams and consumers as code (created or updated idempotently at start-up), and the
 * adapter from a JetStream pull consumer to the operators' {@link PullSource}.
 */
import { AckPolicy, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, type Consumer, type ConsumerConfig, type JetStreamManager, type JsMsg, type StreamConfig } from "@nats-io/jetstream";
import { nanos } from "@nats-io/transport-node";
import type { Observable } from "rxjs";
import { pullFromAsync, type PullSource } from "./pull-source.js";
import type { Delivery } from "../../operators/types.js";
import { PRIORITIES, type Priority, subjects, STREAM_REQUESTS, STREAM_RESULTS, STREAM_DLQ } from "../../proto/wire.js";
import type { ConsumerSettings, StreamsConfig } from "../config.js";
import { headerValue } from "../support/headers.js";
import { isJsApiError, JsApiCode } from "../support/jetstream-errors.js";

function streamConfigs(s: StreamsConfig): StreamConfig[] {
  const common = {
    storage: StorageType.File,
    num_replicas: s.replicas,
    max_msg_size: s.maxMsgSize,
    duplicate_window: nanos(s.duplicateWindowMs),
  };
  return [
    {
      ...common,
      name: STREAM_REQUESTS,
      // Exactly the subjects the consumers read: a request on any other subject is refused at
      // publish (no stream answers) instead of being stored and never served.
      subjects: PRIORITIES.map((p) => subjects.requestsOfPriority(p)),
      retention: RetentionPolicy.Limits,
      max_age: nanos(s.requestsMaxAgeMs),
      max_msgs: s.requestsMaxMsgs > 0 ? s.requestsMaxMsgs : -1,
      max_bytes: s.requestsMaxBytes > 0 ? s.requestsMaxBytes : -1,
      // A full queue refuses new requests (the publisher gets an error) instead of dropping old ones.
      discard: DiscardPolicy.New,
    } as StreamConfig,
    {
      ...common,
      name: STREAM_RESULTS,
      subjects: [subjects.resultsAll, subjects.keptAll],
      retention: RetentionPolicy.Limits,
      max_age: nanos(s.resultsMaxAgeMs),
      // One result per request id: keep only the last message per subject.
      max_msgs_per_subject: 1,
      discard: DiscardPolicy.Old,
      // Direct get by subject: a client looks up its own result with
      // $JS.API.DIRECT.GET.INFER_RES.infer.res.<tenant>.<id>, which a per-tenant permission can
      // allow (the stream-wide STREAM.MSG.GET would read every tenant's results).
      allow_direct: true,
    } as StreamConfig,
    {
      ...common,
      name: STREAM_DLQ,
      subjects: [subjects.dlqAll],
      retention: RetentionPolicy.Limits,
      max_age: nanos(s.dlqMaxAgeMs),
      discard: DiscardPolicy.Old,
    } as StreamConfig,
  ];
}

export function durableName(c: ConsumerSettings, p: Priority): string {
  return `${c.durablePrefix}-${p}`;
}

function consumerConfig(c: ConsumerSettings, p: Priority): ConsumerConfig {
  return {
    durable_name: durableName(c, p),
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    filter_subject: subjects.requestsOfPriority(p),
    ack_wait: nanos(c.ackWaitMs),
    // The pipeline counts deliveries itself and answers + dead-letters a request at maxDeliver;
    // a server-side limit would drop it silently after the last delivery.
    max_deliver: -1,
    max_ack_pending: c.maxAckPending,
    max_waiting: 512,
  } as ConsumerConfig;
}

function isNotFound(err: unknown): boolean {
  return isJsApiError(err, JsApiCode.StreamNotFound, JsApiCode.ConsumerNotFound);
}

/** Creates each stream or updates it to the configuration; safe to run from many processes. */
export async function ensureStreams(jsm: JetStreamManager, s: StreamsConfig): Promise<void> {
  for (const cfg of streamConfigs(s)) {
    try {
      await jsm.streams.info(cfg.name);
      await jsm.streams.update(cfg.name, cfg);
    } catch (err) {
      if (!isNotFound(err)) throw err;
      try {
        await jsm.streams.add(cfg);
      } catch (addErr) {
        // Another process created it in between: update to our configuration.
        if (isJsApiError(addErr, JsApiCode.StreamNameInUse)) await jsm.streams.update(cfg.name, cfg);
        else throw addErr;
      }
    }
  }
}

/** Creates or updates the durable pull consumer of each priority. */
export async function ensureConsumers(jsm: JetStreamManager, c: ConsumerSettings, priorities: readonly Priority[]): Promise<void> {
  for (const p of priorities) {
    const cfg = consumerConfig(c, p);
    try {
      await jsm.consumers.info(STREAM_REQUESTS, cfg.durable_name!);
      const { durable_name: _d, deliver_policy: _dp, filter_subject: _f, ...update } = cfg;
      await jsm.consumers.update(STREAM_REQUESTS, cfg.durable_name!, { ...update, filter_subject: cfg.filter_subject });
    } catch (err) {
      if (!isNotFound(err)) throw err;
      await jsm.consumers.add(STREAM_REQUESTS, cfg);
    }
  }
}

/** The first nats-server release that honours a reason on `+TERM` (2.10.4). */
const TERM_REASON_SINCE: readonly [number, number, number] = [2, 10, 4];

/**
 * True when a server of this version honours `+TERM <reason>`. Older servers (Debian 12 ships
 * 2.9.10) do not parse the reason and drop the whole acknowledgement without a word: the message
 * stays pending until its ack wait runs out and is delivered again.
 */
export function honoursTermReason(version: string | undefined): boolean {
  const m = /^v?(\d+)\.(\d+)\.(\d+)/.exec(version ?? "");
  if (!m) return false;
  const v = [Number(m[1]), Number(m[2]), Number(m[3])];
  for (let i = 0; i < 3; i++) if (v[i] !== TERM_REASON_SINCE[i]) return v[i]! > TERM_REASON_SINCE[i]!;
  return true;
}

export interface JsDeliveryOptions {
  /**
   * Send the reason with `term()` (the server's termination advisory carries it). Only for
   * servers that honour it ({@link honoursTermReason}); otherwise a plain `+TERM` is sent.
   */
  termReason?: boolean;
}

/** A JetStream message as the operators see it. */
export class JsDelivery implements Delivery {
  readonly pulledAtMs = Date.now();
  private done = false;
  constructor(
    readonly msg: JsMsg,
    private readonly opts: JsDeliveryOptions = {},
  ) {}
  get subject(): string {
    return this.msg.subject;
  }
  get data(): Uint8Array {
    return this.msg.data;
  }
  get seq(): number {
    return this.msg.seq;
  }
  get pending(): number {
    return this.msg.info.pending;
  }

  get deliveryCount(): number {
    return this.msg.info.deliveryCount;
  }
  get storedAtMs(): number {
    return this.msg.info.timestampNanos / 1e6;
  }
  get settled(): boolean {
    return this.done;
  }
  /**
   * Headers, or undefined when the message has none or its header block cannot be parsed (any
   * client may send one this client cannot read: such a request must still be answered or
   * dead-lettered, never loop).
   */
  private get headersSafe(): JsMsg["headers"] {
    try {
      return this.msg.headers;
    } catch {
      return undefined;
    }
  }
  header(name: string): string | undefined {
    const h = this.headersSafe;
    if (!h) return undefined;
    try {
      return headerValue(h, name);
    } catch {
      return undefined;
    }
  }
  headerEntries(): Array<[string, string]> {
    const out: Array<[string, string]> = [];
    const h = this.headersSafe;
    try {
      if (h) for (const [k, vs] of h) for (const v of vs) out.push([k, v]);
    } catch {
      return [];
    }
    return out;
  }
  ack(): void {
    if (this.done) return;
    this.done = true;
    this.msg.ack();
  }
  nak(delayMs?: number): void {
    if (this.done) return;
    this.done = true;
    this.msg.nak(delayMs);
  }
  term(reason?: string): void {
    if (this.done) return;
    this.done = true;
    // The reason is kept in the result or the dead letter either way.
    if (reason !== undefined && this.opts.termReason === true) this.msg.term(reason);
    else this.msg.term();
  }
  working(): void {
    if (!this.done) this.msg.working();
  }
}

/** A durable pull consumer as a {@link PullSource}: one `fetch` per pull. */
export class ConsumerPullSource implements PullSource {
  private readonly source: PullSource;
  constructor(
    private readonly consumer: Consumer,
    private readonly opts: JsDeliveryOptions = {},
  ) {
    this.source = pullFromAsync(async (max, expiresMs) => {
      // The client refuses pulls that expire in under a second.
      const it = await this.consumer.fetch({ max_messages: max, expires: Math.max(1_000, expiresMs) });
      const o = this.opts;
      return {
        close: () => it.close(),
        async *[Symbol.asyncIterator]() {
          for await (const m of it) yield new JsDelivery(m, o);
        },
      };
    });
  }
  pull(max: number, expiresMs: number): Observable<Delivery> {
    return this.source.pull(max, expiresMs);
  }
}
