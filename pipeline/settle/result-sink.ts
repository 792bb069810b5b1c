/** The results and dead-letter streams as the operators' {@link ResultSink}. */
import { JetStreamApiError, type JetStreamClient, type JetStreamManager } from "@nats-io/jetstream";
import { ClosedConnectionError, DrainingConnectionError, headers as natsHeaders, InvalidArgumentError } from "@nats-io/transport-node";
import { ResultNotStoredError, ResultTooLargeError, type DeadLetter, type ResultSink } from "../../operators/settle-outcome.js";
import type { InferJob, InferResult } from "../../operators/types.js";
import { getStoredResult } from "./stored-result.js";
import { STREAM_RESULTS, H, subjects } from "../../proto/wire.js";
import type { Tracing } from "../telemetry/types.js";
import { deadLetterHeaders, deadLetterTokens } from "./dead-letter.js";
import { claimResult, type ResultClaimCheck } from "../payloads/results.js";


export class StreamResultSink implements ResultSink {
  constructor(
    private readonly js: JetStreamClient,
    private readonly jsm: JetStreamManager,
    private readonly tracing?: Tracing,
    /** Results over its threshold go to the object store (claim check); all inline without it. */
    private readonly claim?: ResultClaimCheck,
  ) {}

  /**
   * Publishes on `infer.res.<tenant>.<id>`, where the client listens and INFER_RES stores. A
   * JetStream publish is a core publish the stream then stores or refuses, so once it has left
   * this process the client has the result, or may have it, whatever the stream did with it:
   * INFER_RES answered with an error (it refused the result), or no answer came (a timeout, the
   * connection or the stream's leader lost meanwhile). Both are a {@link ResultNotStoredError}:
   * the result is then stored without being sent again. Only a publish that never left (the
   * connection closed or draining, no stream and no listener at all) is an error to send again.
   */
  async publishResult(job: InferJob, result: InferResult): Promise<void> {
    const subject = subjects.result(job.tenant, job.id);
    const span = this.tracing?.requestOf(job.delivery)?.startPublish(subject);
    const traceparent = span?.carrier.traceparent ?? job.traceparent;
    const tracestate = span?.carrier.tracestate ?? job.tracestate;
    // A large result is written to the object store first; failing that, nothing was sent.
    const msg = await claimResult(this.claim, job.tenant, job.id, result);
    const data = msg.data;
    const h = resultHeaders(result, traceparent, tracestate);
    msg.reference?.(h);
    try {
      await this.js.publish(subject, data, { msgID: job.id, headers: h });
      span?.end();
    } catch (err) {
      span?.end("PUBLISH_FAILED", err);
      if (err instanceof InvalidArgumentError && /max_payload/i.test(err.message)) {
        throw new ResultTooLargeError(err.message, data.length, { cause: err });
      }
      if (err instanceof JetStreamApiError) {
        throw new ResultNotStoredError(`${STREAM_RESULTS} refused the result of '${job.id}' (the client has it): ${err.message}`, { cause: err });
      }
      if (notSent(err)) throw err;
      throw new ResultNotStoredError(`no acknowledgement for the result of '${job.id}' (the client may have it): ${(err as Error)?.message ?? String(err)}`, {
        cause: err,
      });
    }
  }

  /** Stores a result the client already has on `infer.kept.<tenant>.<id>`, which no client reads live. */
  async keepResult(job: InferJob, result: InferResult): Promise<void> {
    const h = resultHeaders(result, job.traceparent, job.tracestate);
    const msg = await claimResult(this.claim, job.tenant, job.id, result);
    msg.reference?.(h);
    await this.js.publish(subjects.kept(job.tenant, job.id), msg.data, { msgID: job.id, headers: h });
  }

  async hasResult(job: InferJob): Promise<boolean> {
    return (await getStoredResult(this.jsm, job.tenant, job.id)) !== null;
  }

  async storedResult(job: InferJob): Promise<InferResult | undefined> {
    const m = await getStoredResult(this.jsm, job.tenant, job.id);
    if (m === null) return undefined;
    try {
      return m.json<InferResult>();
    } catch {
      // Unreadable: it is stored all the same, so the request is not run again.
      return { id: job.id, status: "error", model: job.model, error: { code: "INTERNAL", message: "the stored result is unreadable" } };
    }
  }

  async publishDeadLetter(letter: DeadLetter): Promise<void> {
    const d = letter.delivery;
    const { tenant, model } = deadLetterTokens(letter);
    // One dead letter per stored request, however often it is redelivered.
    try {
      // A body read from the object store is not copied: the letter keeps the reference.
      await this.js.publish(subjects.dlq(tenant, model), d.wireData ?? d.data, { msgID: `dlq-${d.seq}`, headers: deadLetterHeaders(letter) });
    } catch (err) {
      if (!tooLarge(err)) throw err;
      // The request with its headers does not fit in a letter: keep the reason and where the
      // whole request is (INFER_REQ sequence), without the original body and headers.
      await this.js.publish(subjects.dlq(tenant, model), new Uint8Array(0), { msgID: `dlq-${d.seq}`, headers: deadLetterHeaders(letter, { brief: true }) });
    }
  }
}

/** The publish never left this process: nobody has the result. */
function notSent(err: unknown): boolean {
  return (
    err instanceof ClosedConnectionError ||
    err instanceof DrainingConnectionError ||
    err instanceof InvalidArgumentError ||
    (err as Error)?.name === "JetStreamNotEnabled"
  );
}

function resultHeaders(result: InferResult, traceparent: string | undefined, tracestate: string | undefined): ReturnType<typeof natsHeaders> {
  const h = natsHeaders();
  h.set(H.status, result.status === "ok" ? "ok" : (result.error?.code ?? "INTERNAL"));
  if (traceparent) h.set(H.traceparent, traceparent);
  if (tracestate) h.set(H.tracestate, tracestate);
  h.set(H.contentType, "application/json");
  return h;
}

function tooLarge(err: unknown): boolean {
  return /maximum payload|payload.*exceed|message size|too large|max_payload|header/i.test((err as Error)?.message ?? "");
}
