/** The replay's side of settlement: deliveries that settle nothing in the stream, and the sink that publishes on `infer.replay.<session>.>`. */
import { headers as natsHeaders, type NatsConnection } from "@nats-io/transport-node";
import type { DeadLetter, ResultSink } from "../../../operators/settle-outcome.js";
import type { Delivery, InferJob, InferResult } from "../../../operators/types.js";
import { H, replaySubjects, REPLAY_HEADERS, SESSION_RE } from "../../../proto/wire.js";
import { headerValue, sanitizeHeader } from "../../support/headers.js";
import { deadLetterHeaders, deadLetterTokens } from "../../settle/dead-letter.js";
import { originalDelivery } from "../../payloads/resolve-requests.js";
import { ReplayError } from "./options.js";

export interface ReplayRecord {
  readonly seq: number;
  readonly subject: string;
  readonly data: Uint8Array;
  /** The request's headers as the replay presents them (new trace, shifted deadline, replay marks). */
  readonly headers: ReadonlyArray<readonly [string, string]>;
  readonly id: string | undefined;
  readonly tenant: string | undefined;
  readonly model: string | undefined;
  /** When the original was stored in `INFER_REQ` (epoch ms). */
  readonly originalStoredAtMs: number;
  readonly originalTraceparent: string | undefined;
  /** The new trace this replay runs under. */
  readonly traceparent: string;
  /** The recorded result (`INFER_RES`), when there is one. */
  recorded: InferResult | undefined;
  /** When the replay first put it into the pipeline (epoch ms): the replay's "stored at". */
  injectedAtMs: number;
  reruns: number;
  /** The result the replay published, once it has. */
  replayed: InferResult | undefined;
}

/**
 * A recorded request delivered to the pipeline by a replay. Settling it changes nothing in the
 * stream: it only records how it was settled, for the replay to act on (a nak's delay schedules
 * a re-run).
 */
export class ReplayDelivery implements Delivery {
  readonly pulledAtMs = Date.now();
  private how: { action: "ack" | "nak" | "term"; delayMs?: number } | undefined;
  constructor(
    readonly record: ReplayRecord,
    readonly deliveryCount: number,
  ) {}
  get subject(): string {
    return this.record.subject;
  }
  get data(): Uint8Array {
    return this.record.data;
  }
  get seq(): number {
    return this.record.seq;
  }
  get storedAtMs(): number {
    return this.record.injectedAtMs;
  }
  get settled(): boolean {
    return this.how !== undefined;
  }
  /** How it was settled; undefined while it is not. */
  get settlement(): { action: "ack" | "nak" | "term"; delayMs?: number } | undefined {
    return this.how;
  }
  header(name: string): string | undefined {
    return headerValue(this.record.headers, name);
  }
  headerEntries(): Array<[string, string]> {
    return this.record.headers.map(([k, v]): [string, string] => [k, v]);
  }
  ack(): void {
    this.how ??= { action: "ack" };
  }
  nak(delayMs?: number): void {
    this.how ??= delayMs !== undefined ? { action: "nak", delayMs } : { action: "nak" };
  }
  term(): void {
    this.how ??= { action: "term" };
  }
  working(): void {
    // nothing waits on an ack timer
  }
}

export function recordOf(d: Delivery): ReplayRecord | undefined {
  const o = originalDelivery(d);
  return o instanceof ReplayDelivery ? o.record : undefined;
}

const encoder = new TextEncoder();
/** Room left for headers when a replay result is checked against max_payload. */
const REPLAY_HEADROOM_BYTES = 16 * 1024;

/**
 * The replay's {@link ResultSink}: results on `infer.replay.<session>.res.<tenant>.<id>`, dead
 * letters on `infer.replay.<session>.dlq.<tenant>.<model>`, both core NATS. Never the live
 * `infer.res` / `infer.dlq` subjects.
 */
export class ReplayResultSink implements ResultSink {
  constructor(
    private readonly nc: NatsConnection,
    readonly session: string,
  ) {
    if (!SESSION_RE.test(session)) throw new ReplayError("INVALID_ARGUMENT", `session '${session}' must be 1-64 of A-Z a-z 0-9 _ -`);
  }

  async publishResult(job: InferJob, result: InferResult): Promise<void> {
    const rec = recordOf(job.delivery);
    const h = natsHeaders();
    // No Nats-Msg-Id: a stream that keeps replay results would drop a second session's result
    // of the same request as a duplicate.
    h.set(H.status, result.status === "ok" ? "ok" : (result.error?.code ?? "INTERNAL"));
    if (job.traceparent) h.set(H.traceparent, job.traceparent);
    if (job.tracestate) h.set(H.tracestate, job.tracestate);
    h.set(H.contentType, "application/json");
    h.set(REPLAY_HEADERS.session, this.session);
    if (rec) {
      h.set(REPLAY_HEADERS.ofSeq, String(rec.seq));
      if (rec.originalTraceparent) h.set(REPLAY_HEADERS.ofTraceparent, sanitizeHeader(rec.originalTraceparent));
    }
    let data = encoder.encode(JSON.stringify(result));
    const limit = (this.nc.info?.max_payload ?? 1024 * 1024) - REPLAY_HEADROOM_BYTES;
    if (data.length > limit) {
      // Never written to the object store (that would replace the live result's object): the
      // message goes without the output; the report compares the whole result.
      const { output: _output, ...rest } = result;
      h.set(REPLAY_HEADERS.outputOmitted, `result of ${data.length} bytes is over the message size limit`);
      data = encoder.encode(JSON.stringify(rest));
    }
    this.nc.publish(replaySubjects.result(this.session, job.tenant, job.id), data, { headers: h });
    if (rec) rec.replayed = result;
  }

  /** True once this replay has published a result for the request (asked before a re-run publishes again). */
  async hasResult(job: InferJob): Promise<boolean> {
    return recordOf(job.delivery)?.replayed !== undefined;
  }

  async publishDeadLetter(letter: DeadLetter): Promise<void> {
    const { tenant, model } = deadLetterTokens(letter);
    // A body read from the object store is not copied: the letter keeps the reference.
    const d = letter.delivery;
    this.nc.publish(replaySubjects.dlq(this.session, tenant, model), d.wireData ?? d.data, { headers: deadLetterHeaders(letter) });
  }

}

// ---- the replay ---------------------------------------------------------------------------
