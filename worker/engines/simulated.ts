/**
 * A simulated GPU engine for tests, benchmarks and `sluice dev`.
 *
 * It behaves like one device: batches queue in FIFO order and run one at a time, each costing
 * `base_ms + per_item_ms * size`, so batching pays off exactly as it does on a real GPU.
 * Generations run alongside (continuous batching), a first token after `ttft_ms`, then one
 * every `token_interval_ms`.
 *
 * Outputs are derived from each request so a test can tell that every answer belongs to its
 * own request:
 * - model `echo`: the prompt; `reverse`: the prompt reversed; `upper`: the prompt upper-cased;
 * - model `embed-sim`: no text but a vector (`output.data`) derived from the prompt (embed-sim.ts);
 * - any other model: `<model>@<version>: <prompt>`;
 * - without a prompt, `JSON.stringify(inputs)` stands in for it.
 *
 * `parameters.simulate_error` set to an error code (e.g. `"NOT_FOUND"`) makes that request
 * fail with that code, and only that request.
 */
import { setMaxListeners } from "node:events";
import { performance } from "node:perf_hooks";
import { EMBED_SIM_MODEL, simulatedEmbedding } from "./embed-sim.js";
import { capTokens, countWords, simulatedError, simulatedOutputText, splitTokens } from "./simulated-output.js";
import {
  EngineClosedError,
  EngineError,
  type Engine,
  type EngineBatch,
  type EngineGeneration,
  type EngineItemResult,
  type EngineRequest,
  type EngineToken,
  type EngineUsage,
} from "../engine.js";
import { sleep } from "../../operators/support/sleep.js";

export const DEFAULT_BASE_MS = 8;
export const DEFAULT_PER_ITEM_MS = 0.5;
export const DEFAULT_TTFT_MS = 20;
export const DEFAULT_TOKEN_INTERVAL_MS = 5;
export const DEFAULT_CAPACITY = 64;
/** How many entries of {@link SimulatedEngine.calls} are kept (the most recent). */
export const DEFAULT_CALL_LOG_LIMIT = 100_000;

export interface SimulatedEngineOptions {
  /** Fixed cost of one device pass, ms. 0 together with `per_item_ms: 0` is a zero-cost device. */
  base_ms?: number;
  /** Cost of each item of a pass, ms. */
  per_item_ms?: number;
  /** Time to the first token of a generation, ms. */
  ttft_ms?: number;
  /** Time between tokens of a generation, ms. */
  token_interval_ms?: number;
  /** Items one device pass takes; a larger batch runs as several passes in a row. */
  capacity?: number;
  /** Entries of the call log to keep. */
  call_log_limit?: number;
  /**
   * Tests only: a generation that has produced this many tokens stops there, as a stalled device
   * would, until it is cancelled or the engine closes; it never finishes on its own. Lets a test
   * cancel a generation at a known point and see that nothing came after it. Unset: no stall.
   */
  stall_after_tokens?: number;
}

/** One entry of the call log. */
export interface EngineCall {
  readonly kind: "infer" | "generate";
  readonly model: string;
  readonly version: string;
  readonly ids: readonly string[];
  /** Epoch ms (sub-millisecond, monotonic within the process). */
  readonly startedAtMs: number;
  readonly finishedAtMs: number;
  /** The caller gave up (abort) or the engine closed before the work was done. */
  readonly cancelled: boolean;
  /** Generations only: the tokens it produced (handed to the caller) before it ended. */
  readonly tokens?: number;
}

export interface SimulatedEngineCounters {
  /** Batches that ran on the device (including ones whose caller gave up meanwhile). */
  batches: number;
  /** Items of those batches. */
  items: number;
  /** Batches whose caller gave up while they ran or waited. */
  cancelledBatches: number;
  /** Generations started. */
  generations: number;
  /** Generations stopped before their last token. */
  cancelledGenerations: number;
  currentGenerations: number;
  maxConcurrentGenerations: number;
}

interface QueuedBatch {
  readonly batch: EngineBatch;
  readonly signal: AbortSignal;
  readonly resolve: (results: EngineItemResult[]) => void;
  readonly reject: (reason: unknown) => void;
  readonly onAbort: () => void;
  /** Resolved, rejected or given up: the device may still be busy with it. */
  settled: boolean;
}

/** Epoch ms with sub-millisecond resolution that never goes backwards within the process. */
function nowMs(): number {
  return performance.timeOrigin + performance.now();
}

export class SimulatedEngine implements Engine {
  readonly capacity: number;
  readonly counters: SimulatedEngineCounters = {
    batches: 0,
    items: 0,
    cancelledBatches: 0,
    generations: 0,
    cancelledGenerations: 0,
    currentGenerations: 0,
    maxConcurrentGenerations: 0,
  };

  private readonly baseMs: number;
  private readonly perItemMs: number;
  private readonly ttftMs: number;
  private readonly tokenIntervalMs: number;
  private readonly callLogLimit: number;
  private readonly stallAfterTokens: number | undefined;

  private readonly queue: QueuedBatch[] = [];
  private running: QueuedBatch | undefined;
  private deviceTimer: NodeJS.Timeout | undefined;
  private deviceImmediate: NodeJS.Immediate | undefined;
  /** Aborted by close(): stops every generation in progress. */
  private readonly closing = new AbortController();
  private closed = false;

  // The log is trimmed lazily (head index) so that appending stays O(1) when it is full.
  private readonly log: EngineCall[] = [];
  private logHead = 0;

  constructor(options: SimulatedEngineOptions = {}) {
    // Every generation in progress listens on this one signal.
    setMaxListeners(0, this.closing.signal);
    this.baseMs = nonNegative("base_ms", options.base_ms ?? DEFAULT_BASE_MS);
    this.perItemMs = nonNegative("per_item_ms", options.per_item_ms ?? DEFAULT_PER_ITEM_MS);
    this.ttftMs = nonNegative("ttft_ms", options.ttft_ms ?? DEFAULT_TTFT_MS);
    this.tokenIntervalMs = nonNegative("token_interval_ms", options.token_interval_ms ?? DEFAULT_TOKEN_INTERVAL_MS);
    this.capacity = positiveInteger("capacity", options.capacity ?? DEFAULT_CAPACITY);
    this.callLogLimit = positiveInteger("call_log_limit", options.call_log_limit ?? DEFAULT_CALL_LOG_LIMIT);
    this.stallAfterTokens = options.stall_after_tokens === undefined ? undefined : nonNegative("stall_after_tokens", options.stall_after_tokens);
  }

  /** The most recent calls (at most `call_log_limit`), oldest first, each added when it ended. */
  get calls(): readonly EngineCall[] {
    if (this.logHead > 0) {
      this.log.splice(0, this.logHead);
      this.logHead = 0;
    }
    return this.log;
  }

  /** Batches waiting for the device (not counting the one running). */
  get queuedBatches(): number {
    return this.queue.length;
  }

  /** Batches taken and not finished: queued, or running on the device. */
  get inFlightBatches(): number {
    return this.queue.length + (this.running ? 1 : 0);
  }

  /** Device time of a batch of `size` items, ms. */
  batchCostMs(size: number): number {
    const passes = Math.max(1, Math.ceil(size / this.capacity));
    return this.baseMs * passes + this.perItemMs * size;
  }

  infer(batch: EngineBatch, signal: AbortSignal): Promise<EngineItemResult[]> {
    if (this.closed) return Promise.reject(new EngineClosedError());
    if (signal.aborted) return Promise.reject(abortReason(signal));
    return new Promise<EngineItemResult[]>((resolve, reject) => {
      const job: QueuedBatch = {
        batch,
        signal,
        resolve,
        reject,
        settled: false,
        onAbort: () => {
          if (job.settled) return;
          job.settled = true;
          const at = this.queue.indexOf(job);
          if (at >= 0) {
            // Never reached the device: nothing to log but the count.
            this.queue.splice(at, 1);
            this.counters.cancelledBatches++;
          }
          reject(abortReason(signal));
        },
      };
      signal.addEventListener("abort", job.onAbort, { once: true });
      this.queue.push(job);
      this.pump();
    });
  }

  generate(request: EngineRequest, signal: AbortSignal): EngineGeneration {
    const usage: EngineUsage = { prompt_tokens: countWords(request.prompt), completion_tokens: 0 };
    let iterated = false;
    return {
      usage: () => ({ ...usage }),
      [Symbol.asyncIterator]: () => {
        if (iterated) throw new Error("a generation can be iterated only once");
        iterated = true;
        return this.runGeneration(request, signal, usage);
      },
    };
  }

  /** Fails all queued and running work and stops generations. Safe to call twice. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.closing.abort(new EngineClosedError());
    if (this.deviceTimer) clearTimeout(this.deviceTimer);
    if (this.deviceImmediate) clearImmediate(this.deviceImmediate);
    this.deviceTimer = undefined;
    this.deviceImmediate = undefined;
    const failed = this.running ? [this.running, ...this.queue] : [...this.queue];
    this.running = undefined;
    this.queue.length = 0;
    for (const job of failed) {
      job.signal.removeEventListener("abort", job.onAbort);
      if (job.settled) continue;
      job.settled = true;
      job.reject(new EngineClosedError());
    }
  }

  /** Starts the next batch when the device is free. */
  private pump(): void {
    if (this.running || this.closed) return;
    const job = this.queue.shift();
    if (!job) return;
    this.running = job;
    const { batch } = job;
    const startedAtMs = nowMs();
    const results = batch.requests.map((r) => this.runItem(batch, r, startedAtMs));
    const finish = (): void => {
      this.deviceTimer = undefined;
      this.deviceImmediate = undefined;
      this.running = undefined;
      job.signal.removeEventListener("abort", job.onAbort);
      const cancelled = job.settled;
      this.counters.batches++;
      this.counters.items += batch.requests.length;
      if (cancelled) this.counters.cancelledBatches++;
      this.record({
        kind: "infer",
        model: batch.model,
        version: batch.version,
        ids: batch.requests.map((r) => r.id),
        startedAtMs,
        finishedAtMs: nowMs(),
        cancelled,
      });
      if (!job.settled) {
        job.settled = true;
        job.resolve(results);
      }
      this.pump();
    };
    // The device stays busy for the whole pass even when its caller gives up meanwhile: a GPU
    // cannot drop a running kernel. These timers are work in progress, so they keep the
    // process alive like any pending I/O.
    const costMs = this.batchCostMs(batch.requests.length);
    if (costMs > 0) this.deviceTimer = setTimeout(finish, costMs);
    else this.deviceImmediate = setImmediate(finish);
  }

  private runItem(batch: EngineBatch, request: EngineRequest, startedAtMs: number): EngineItemResult {
    const error = simulatedError(request);
    if (error) return { ok: false, error };
    if (request.deadlineMs !== undefined && request.deadlineMs > 0 && request.deadlineMs <= startedAtMs) {
      return {
        ok: false,
        notStarted: true,
        error: { code: "DEADLINE_EXCEEDED", message: `deadline passed before request '${request.id}' started` },
      };
    }
    if (batch.model === EMBED_SIM_MODEL) {
      const input = request.prompt ?? JSON.stringify(request.inputs) ?? "";
      return { ok: true, output: { data: simulatedEmbedding(input) }, usage: { prompt_tokens: countWords(input), completion_tokens: 0 } };
    }
    const text = simulatedOutputText(batch.model, batch.version, request);
    return {
      ok: true,
      output: { text },
      usage: { prompt_tokens: countWords(request.prompt), completion_tokens: countWords(text) },
    };
  }

  private async *runGeneration(
    request: EngineRequest,
    signal: AbortSignal,
    usage: EngineUsage,
  ): AsyncGenerator<EngineToken, void, undefined> {
    if (this.closed) throw new EngineClosedError();
    signal.throwIfAborted();
    const error = simulatedError(request);
    if (error) throw new EngineError(error.code, error.message);
    if (request.deadlineMs !== undefined && request.deadlineMs > 0 && request.deadlineMs <= nowMs()) {
      throw new EngineError("DEADLINE_EXCEEDED", `deadline passed before request '${request.id}' started`);
    }
    const tokens = capTokens(splitTokens(simulatedOutputText(request.model, request.version, request)), request);

    // One signal for "the caller gave up" and "the engine closed".
    const stop = new AbortController();
    const onAbort = (): void => stop.abort(signal.reason);
    const onClose = (): void => stop.abort(this.closing.signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    this.closing.signal.addEventListener("abort", onClose, { once: true });

    const c = this.counters;
    c.generations++;
    c.currentGenerations++;
    c.maxConcurrentGenerations = Math.max(c.maxConcurrentGenerations, c.currentGenerations);
    const startedAtMs = nowMs();
    let completed = false;
    try {
      for (let i = 0; i < tokens.length; i++) {
        if (i === this.stallAfterTokens) await untilAborted(stop.signal);
        await sleep(i === 0 ? this.ttftMs : this.tokenIntervalMs, stop.signal);
        if (stop.signal.aborted) throw abortReason(stop.signal);
        usage.completion_tokens++;
        yield { text: tokens[i] ?? "" };
      }
      completed = true;
    } finally {
      // Reached on the last token, on abort, and when the consumer stops iterating early.
      signal.removeEventListener("abort", onAbort);
      this.closing.signal.removeEventListener("abort", onClose);
      c.currentGenerations--;
      if (!completed) c.cancelledGenerations++;
      this.record({
        kind: "generate",
        model: request.model,
        version: request.version,
        ids: [request.id],
        startedAtMs,
        finishedAtMs: nowMs(),
        cancelled: !completed,
        tokens: usage.completion_tokens,
      });
    }
  }

  private record(call: EngineCall): void {
    this.log.push(call);
    if (this.log.length - this.logHead > this.callLogLimit) this.logHead++;
    if (this.logHead >= this.callLogLimit) {
      this.log.splice(0, this.logHead);
      this.logHead = 0;
    }
  }
}

/** The reason a signal was aborted with, as an Error (AbortSignal allows any value). */
function abortReason(signal: AbortSignal): Error {
  const reason: unknown = signal.reason;
  return reason instanceof Error ? reason : new EngineError("CANCELLED", `aborted: ${String(reason)}`, { cause: reason });
}

/** Never resolves; rejects with the signal's reason when it aborts. */
function untilAborted(signal: AbortSignal): Promise<never> {
  if (signal.aborted) return Promise.reject(abortReason(signal));
  return new Promise<never>((_resolve, reject) => {
    signal.addEventListener("abort", () => reject(abortReason(signal)), { once: true });
  });
}

function nonNegative(name: string, value: number): number {
  if (!Number.isFinite(value) || value < 0) throw new RangeError(`${name} must be a finite number >= 0, got ${value}`);
  return value;
}

function positiveInteger(name: string, value: number): number {
  if (!Number.isInteger(value) || value < 1) throw new RangeError(`${name} must be an integer >= 1, got ${value}`);
  return value;
}
