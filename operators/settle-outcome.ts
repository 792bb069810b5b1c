import { mergeMap, type OperatorFunction } from "rxjs";
import { retryDelayMs } from "./outcome.js";
import { errorResult, type Delivery, type ErrorInfo, type InferJob, type InferResult, type Outcome } from "./types.js";

/** A dead letter: the request as it came, and why it could not be served. */
export interface DeadLetter {
  delivery: Delivery;
  tenant?: string;
  model?: string;
  id?: string;
  error: ErrorInfo;
}

/** Where results and dead letters go (the results stream and the DLQ stream in the service). */
export interface ResultSink {
  /** Stores the result, de-duplicated by request id; resolves once it is stored. */
  publishResult(job: InferJob, result: InferResult): Promise<void>;
  /** True when a result for this request is already stored (asked after a redelivery). */
  hasResult(job: InferJob): Promise<boolean>;
  /** Stores a dead letter; resolves once it is stored. */
  publishDeadLetter(letter: DeadLetter): Promise<void>;
}

export type SettleAction = "ack" | "term" | "nak" | "duplicate";

/** What happened to one outcome: how its delivery was settled and what was published. */
export interface Settled {
  readonly outcome: Outcome;
  readonly action: SettleAction;
  /** The result published for the client, when one was. */
  readonly result?: InferResult;
  readonly deadLettered: boolean;
  /** Why a publish failed (the delivery was naked to be tried again). */
  readonly error?: unknown;
}

export interface SettleOutcomesOptions {
  /** Deliveries after which a retriable failure becomes final (answered and dead-lettered). */
  maxDeliver: number;
  /** Outcomes being published at once. */
  concurrency?: number;
  retryBaseMs?: number;
  retryMaxMs?: number;
  now?: () => number;
}

/**
 * Settles each outcome exactly once, **after** what it owes is stored: the result is published
 * (de-duplicated by request id), then the delivery is acked (`ok`) or termed (an error); a
 * retry is naked with its delay; a dead letter is stored, then termed. When publishing fails
 * the delivery is naked, so the queue delivers the request again: nothing is lost.
 *
 * ```
 * input:  a(result) b(retry) c(dead)
 * output: a:ack     b:nak    c:term     (each after its publish resolved)
 * ```
 */
export function settleOutcomes(sink: ResultSink, opts: SettleOutcomesOptions): OperatorFunction<Outcome, Settled> {
  const base = opts.retryBaseMs ?? 250;
  const max = opts.retryMaxMs ?? 10_000;
  const concurrency = opts.concurrency ?? 256;

  const publishResult = async (outcome: Outcome, job: InferJob, result: InferResult, deadLetter: boolean): Promise<Settled> => {
    const d = job.delivery;
    try {
      if (d.deliveryCount > 1 && (await sink.hasResult(job))) {
        // Answered before a crash or a lost ack: the client has its result; do not send another.
        d.ack();
        return { outcome, action: "duplicate", deadLettered: false };
      }
      if (deadLetter && result.error) {
        await sink.publishDeadLetter({ delivery: d, tenant: job.tenant, model: job.model, id: job.id, error: result.error });
      }
      await sink.publishResult(job, result);
    } catch (error) {
      d.nak(retryDelayMs(d.deliveryCount, base, max));
      return { outcome, action: "nak", deadLettered: false, error };
    }
    if (result.status === "ok") {
      d.ack();
      return { outcome, action: "ack", result, deadLettered: deadLetter };
    }
    d.term(result.error ? `${result.error.code}: ${result.error.message}` : "error");
    return { outcome, action: "term", result, deadLettered: deadLetter };
  };

  const settle = async (o: Outcome): Promise<Settled> => {
    switch (o.kind) {
      case "result":
        return publishResult(o, o.job, o.result, o.deadLetter === true);
      case "retry": {
        const d = o.job.delivery;
        // Waiting for a worker: retry until the wait ends (the last retry lands right at its
        // end, so a request with a deadline is answered DEADLINE_EXCEEDED at its deadline).
        // Otherwise: retry until the delivery count runs out.
        const remaining = o.waitUntilMs !== undefined ? o.waitUntilMs - (opts.now ?? Date.now)() : 0;
        const again = o.waitUntilMs !== undefined ? remaining > 0 : d.deliveryCount < opts.maxDeliver;
        if (again) {
          d.nak(o.waitUntilMs !== undefined ? Math.max(1, Math.min(o.delayMs, Math.ceil(remaining))) : o.delayMs);
          return { outcome: o, action: "nak", deadLettered: false };
        }
        const last = o.lastResort.error
          ? errorResult(o.job, o.lastResort.error.code, `${o.lastResort.error.message} (gave up after ${d.deliveryCount} deliveries)`)
          : o.lastResort;
        return publishResult(o, o.job, last, true);
      }
      case "dead": {
        const d = o.delivery;
        try {
          await sink.publishDeadLetter(o);
        } catch (error) {
          d.nak(retryDelayMs(d.deliveryCount, base, max));
          return { outcome: o, action: "nak", deadLettered: false, error };
        }
        d.term(`${o.error.code}: ${o.error.message}`);
        return { outcome: o, action: "term", deadLettered: true };
      }
    }
  };

  // settle() catches what it awaits; this also catches a throwing ack/nak (a closed connection),
  // so one bad settlement never ends the stream. The queue redelivers what was not acked.
  return mergeMap(
    (o: Outcome) => settle(o).catch((error: unknown): Settled => ({ outcome: o, action: "nak", deadLettered: false, error })),
    concurrency,
  );
}
