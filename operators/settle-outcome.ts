import { mergeMap, Observable, type OperatorFunction } from "rxjs";
import { retryDelays, type RetryDelayOptions } from "./outcome.js";
import { errorResult, type Delivery, type ErrorInfo, type InferJob, type InferResult, type Outcome } from "./types.js";
import { sleep } from "./support/sleep.js";

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
  /**
   * Sends the result to the client and stores it, de-duplicated by request id; resolves once it
   * is stored. Rejects with a {@link ResultNotStoredError} when the result reached the client
   * but the store refused it.
   */
  publishResult(job: InferJob, result: InferResult): Promise<void>;
  /**
   * Stores a result that already reached the client, without sending it to the client again.
   * Without it, a refused store is retried through {@link publishResult}.
   */
  keepResult?(job: InferJob, result: InferResult): Promise<void>;
  /** True when a result for this request is already stored (asked after a redelivery). */
  hasResult(job: InferJob): Promise<boolean>;
  /** The stored result of this request, if there is one (asked before a redelivery is run again). */
  storedResult?(job: InferJob): Promise<InferResult | undefined>;
  /** Stores a dead letter; resolves once it is stored. */
  publishDeadLetter(letter: DeadLetter): Promise<void>;
}

/**
 * A result was sent to the client (its live subscribers have it, or may have it: the store
 * refused it, or never acknowledged it) and is not known to be stored: it must be stored without
 * being sent again, or the client would get a second answer.
 */
export class ResultNotStoredError extends Error {
  override readonly name = "ResultNotStoredError";
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/**
 * A result is larger than any message the broker takes: it can never be sent. The request is
 * answered with an error result instead, which says so.
 */
export class ResultTooLargeError extends Error {
  override readonly name = "ResultTooLargeError";
  constructor(
    message: string,
    readonly bytes: number,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
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
  /** Publishes of the result that failed before it was stored (tried again in place). */
  readonly publishFailures?: number;
  /** The result reached the client but could not be stored within `publishRetryMs`; it was dead-lettered. */
  readonly notStored?: boolean;
}

export interface SettleOutcomesOptions extends RetryDelayOptions {
  /** Deliveries after which a retriable failure becomes final (answered and dead-lettered). */
  maxDeliver: number;
  /** Outcomes being published at once. */
  concurrency?: number;
  /**
   * How long a result whose publish failed is tried again in place (same result, no second run
   * on a worker) before giving up: 0 (the default) naks at once. A result the client already has
   * but the store refused is then stored without being sent again ({@link ResultSink.keepResult});
   * one that cannot be stored in this time is dead-lettered with the reason, and settled.
   */
  publishRetryMs?: number;
  /**
   * A redelivered request that was looked up before it ran ({@link InferJob.storedCheckedAtMs})
   * is looked up again before its result is published only when that was at least this long
   * ago: time enough for another process that held it to have answered it meanwhile.
   */
  recheckStoredAfterMs?: number;
  now?: () => number;
}

/** See {@link SettleOutcomesOptions.recheckStoredAfterMs}. */
const DEFAULT_RECHECK_STORED_AFTER_MS = 5_000;

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
  const retryDelay = retryDelays(opts);
  const concurrency = opts.concurrency ?? 256;
  const retryFor = Math.max(0, opts.publishRetryMs ?? 0);
  const now = opts.now ?? Date.now;
  const recheckAfter = opts.recheckStoredAfterMs ?? DEFAULT_RECHECK_STORED_AFTER_MS;
  /** A redelivered request not looked up lately: its result may be stored already. */
  const mayBeStored = (job: InferJob): boolean =>
    job.delivery.deliveryCount > 1 && (job.storedCheckedAtMs === undefined || now() - job.storedCheckedAtMs >= recheckAfter);

  /** Acks an ok result, terms an error result: it is stored (or dead-lettered) and final. */
  const finish = (outcome: Outcome, d: Delivery, result: InferResult, extra: Partial<Settled>): Settled => {
    if (result.status === "ok") {
      d.ack();
      return { outcome, action: "ack", result, deadLettered: false, ...extra };
    }
    d.term(result.error ? `${result.error.code}: ${result.error.message}` : "error");
    return { outcome, action: "term", result, deadLettered: false, ...extra };
  };

  const publishResult = async (outcome: Outcome, job: InferJob, produced: InferResult, deadLetter: boolean, stop: Stop): Promise<Settled> => {
    let result = produced;
    const d = job.delivery;
    try {
      if (mayBeStored(job) && (await sink.hasResult(job))) {
        // Answered before a crash or a lost ack: the client has its result; do not send another.
        d.ack();
        return { outcome, action: "duplicate", deadLettered: false };
      }
      if (deadLetter && result.error) {
        await sink.publishDeadLetter({ delivery: d, tenant: job.tenant, model: job.model, id: job.id, error: result.error });
      }
    } catch (error) {
      d.nak(retryDelay(d.deliveryCount));
      return { outcome, action: "nak", deadLettered: false, error };
    }
    const dl = deadLetter ? { deadLettered: true } : {};
    let failures = 0;
    let lastError: unknown;
    // Sent to the client already: from now on it is only stored, never sent again.
    let delivered = false;
    const giveUpAt = now() + retryFor;
    for (;;) {
      let stored = false;
      try {
        if (delivered && sink.keepResult) {
          // De-duplicated by request id like a publish: no lookup needed first.
          await sink.keepResult(job, result);
        } else if (failures === 0 || !(await sink.hasResult(job))) {
          // (A failed publish may have been stored after all: its acknowledgement was lost.)
          await sink.publishResult(job, result);
        }
        stored = true;
      } catch (error) {
        if (error instanceof ResultTooLargeError && result === produced) {
          // Nothing was sent: answer with a short error that says why, at once (once).
          result = errorResult(job, "INTERNAL", `the result (${error.bytes} bytes) is larger than the largest message the broker takes`);
          continue;
        }
        failures++;
        lastError = error;
        if (error instanceof ResultNotStoredError) delivered = true;
      }
      // Settled outside the try: a failing ack is not a failed publish.
      if (stored) return finish(outcome, d, result, failures > 0 ? { ...dl, publishFailures: failures } : dl);
      const wait = retryDelay(failures);
      if (stop.aborted || now() + wait > giveUpAt) break;
      d.working();
      await sleep(wait, stop.signal);
      if (stop.aborted) break;
    }
    // The client has its answer, but the results store would not keep it: keep the request and
    // the reason in the dead-letter stream instead of running it again. (When stopping, the
    // queue delivers the request again instead, to be stored then.)
    if (delivered && retryFor > 0 && !stop.aborted) {
      const reason = `the result reached the client but ${STORE_NAME} refused to store it for ${retryFor} ms: ${(lastError as Error)?.message ?? String(lastError)}`;
      try {
        await sink.publishDeadLetter({ delivery: d, tenant: job.tenant, model: job.model, id: job.id, error: { code: "INTERNAL", message: reason } });
        return { ...finish(outcome, d, result, { publishFailures: failures, notStored: true }), deadLettered: true };
      } catch {
        // neither stream takes it: the queue delivers the request again
      }
    }
    d.nak(retryDelay(d.deliveryCount));
    return { outcome, action: "nak", deadLettered: false, error: lastError, publishFailures: failures };
  };

  const settle = async (o: Outcome, stop: Stop): Promise<Settled> => {
    switch (o.kind) {
      case "result":
        if (o.alreadyStored === true) {
          // Answered by an earlier delivery: the client has its result; do not send another.
          o.job.delivery.ack();
          return { outcome: o, action: "duplicate", deadLettered: false };
        }
        return publishResult(o, o.job, o.result, o.deadLetter === true, stop);
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
        return publishResult(o, o.job, last, true, stop);
      }
      case "dead": {
        const d = o.delivery;
        try {
          await sink.publishDeadLetter(o);
        } catch (error) {
          d.nak(retryDelay(d.deliveryCount));
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
    (o: Outcome) =>
      new Observable<Settled>((subscriber) => {
        // Unsubscribing ends the retries of a failed publish (the delivery is naked); a publish
        // under way still settles its delivery.
        const stop = new Stop();
        settle(o, stop)
          .catch((error: unknown): Settled => ({ outcome: o, action: "nak", deadLettered: false, error }))
          .then(
            (s) => {
              subscriber.next(s);
              subscriber.complete();
            },
            (err: unknown) => subscriber.error(err),
          );
        return () => stop.abort();
      }),
    concurrency,
  );
}

/**
 * Ends one settlement's publish retries when its subscriber leaves. Almost every settlement ends
 * without waiting, so the AbortSignal (and the AbortError an abort creates) exists only once a
 * retry has to sleep.
 */
class Stop {
  aborted = false;
  #controller: AbortController | undefined;

  get signal(): AbortSignal {
    if (!this.#controller) {
      this.#controller = new AbortController();
      if (this.aborted) this.#controller.abort();
    }
    return this.#controller.signal;
  }

  abort(): void {
    if (this.aborted) return;
    this.aborted = true;
    this.#controller?.abort();
  }
}

/** What the service's results store is called in reasons (the operator knows no streams). */
const STORE_NAME = "the results store";

