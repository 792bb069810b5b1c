/**
 * A simulated LLM device, for tests, benchmarks and `sluice dev`: it costs what an LLM engine
 * costs, so routing by prefix and load shows the effect it has on a real one.
 *
 * - **KV capacity** in tokens ({@link LlmSimOptions.kv_tokens}). A sequence is admitted only when
 *   its prompt blocks and its own tokens (the prompt's last partial block and `max_tokens` of
 *   output) fit; otherwise it waits, first come first served. At most `max_running` run at once.
 * - **Prefix cache**: prompts are cut into blocks ({@link prefixBlockHashes}, shared with the
 *   pipeline's router); blocks stay cached after their sequence ends, least recently used
 *   evicted first. A prompt whose leading blocks are cached prefills only the rest.
 * - **Steps** (continuous batching): each device step gives every running sequence one token, and
 *   prefills the sequences admitted for it. A step costs `step_ms + step_per_seq_ms x running +
 *   prefill_ms_per_token x uncached prompt tokens`. Time to first token and time per output
 *   token come out of that.
 *
 * Time comes from an injected {@link LlmSimClock}, so tests run on virtual time.
 * Output: `max_tokens` (default {@link DEFAULT_LLM_MAX_TOKENS}) tokens ` t0 t1 ...`.
 */
import { performance } from "node:perf_hooks";
import { BLOCK_TOKENS, estimateTokens, prefixBlockHashes } from "../../proto/prefix-blocks.js";
import {
  EngineClosedError,
  EngineError,
  type Engine,
  type EngineBatch,
  type EngineGeneration,
  type EngineItemResult,
  type EngineLoad,
  type EngineRequest,
  type EngineToken,
  type EngineUsage,
} from "../engine.js";
import { KvBlockCache } from "./kv-block-cache.js";

export const DEFAULT_LLM_KV_TOKENS = 32_768;
export const DEFAULT_LLM_MAX_RUNNING = 32;
const DEFAULT_LLM_MAX_TOKENS = 16;
const DEFAULT_LLM_STEP_MS = 2;
const DEFAULT_LLM_STEP_PER_SEQ_MS = 0.05;
const DEFAULT_LLM_PREFILL_MS_PER_TOKEN = 0.02;
/** Entries of {@link LlmSimEngine.log} kept (the most recent). */
const DEFAULT_LLM_LOG_LIMIT = 10_000;

/** Where the engine reads time and sets its step timer. */
export interface LlmSimClock {
  now(): number;
  /** Runs `fn` after `ms`; the returned function cancels it. */
  setTimer(fn: () => void, ms: number): () => void;
}

/** Wall-clock time (timers unref'ed so an idle engine never holds the process). */
export const realClock: LlmSimClock = {
  now: () => performance.timeOrigin + performance.now(),
  setTimer: (fn, ms) => {
    const t = setTimeout(fn, ms);
    t.unref();
    return () => clearTimeout(t);
  },
};

export interface LlmSimOptions {
  /** KV cache capacity, tokens. */
  kv_tokens?: number;
  /** Sequences running at once. */
  max_running?: number;
  /** Fixed cost of a device step, ms. */
  step_ms?: number;
  /** Cost of a step per running sequence, ms. */
  step_per_seq_ms?: number;
  /** Prefill cost per uncached prompt token, ms. */
  prefill_ms_per_token?: number;
  /** Requests the worker takes at once (its registered capacity); default `max_running` x 2. */
  capacity?: number;
  /** Entries of the sequence log to keep. */
  log_limit?: number;
}

/** One finished (or stopped) sequence, for tests and benchmarks. */
export interface LlmSequenceRecord {
  readonly id: string;
  readonly promptTokens: number;
  /** Prompt tokens found in the prefix cache at admission. */
  readonly cachedTokens: number;
  readonly arrivedAtMs: number;
  readonly admittedAtMs?: number;
  readonly firstTokenAtMs?: number;
  readonly finishedAtMs: number;
  readonly outputTokens: number;
  readonly cancelled: boolean;
}

export interface LlmSimCounters {
  sequences: number;
  promptTokens: number;
  cachedTokens: number;
  outputTokens: number;
  steps: number;
  maxRunning: number;
}

interface Sequence {
  readonly request: EngineRequest;
  readonly promptTokens: number;
  readonly maxTokens: number;
  readonly blocks: string[];
  /** Tokens the sequence holds on its own: its prompt's partial block and its output. */
  readonly ownTokens: number;
  readonly arrivedAtMs: number;
  admittedAtMs?: number;
  firstTokenAtMs?: number;
  cachedTokens: number;
  /** Prompt tokens still to prefill (counted in the next step). */
  prefill: number;
  produced: number;
  done: boolean;
  /** Tokens not yet taken by the iterator, and the iterator waiting for one. */
  readonly pending: EngineToken[];
  wake?: () => void;
  error?: Error;
}

export class LlmSimEngine implements Engine {
  readonly capacity: number;
  readonly counters: LlmSimCounters = { sequences: 0, promptTokens: 0, cachedTokens: 0, outputTokens: 0, steps: 0, maxRunning: 0 };
  /** Finished sequences, oldest first (bounded by `log_limit`). */
  readonly log: LlmSequenceRecord[] = [];

  private readonly cache: KvBlockCache;
  private readonly maxRunning: number;
  private readonly stepMs: number;
  private readonly stepPerSeqMs: number;
  private readonly prefillMsPerToken: number;
  private readonly logLimit: number;
  private readonly waiting: Sequence[] = [];
  private readonly running = new Set<Sequence>();
  private cancelStep: (() => void) | undefined;
  private closed = false;

  constructor(
    options: LlmSimOptions = {},
    private readonly clock: LlmSimClock = realClock,
  ) {
    const kv = options.kv_tokens ?? DEFAULT_LLM_KV_TOKENS;
    this.maxRunning = options.max_running ?? DEFAULT_LLM_MAX_RUNNING;
    this.stepMs = options.step_ms ?? DEFAULT_LLM_STEP_MS;
    this.stepPerSeqMs = options.step_per_seq_ms ?? DEFAULT_LLM_STEP_PER_SEQ_MS;
    this.prefillMsPerToken = options.prefill_ms_per_token ?? DEFAULT_LLM_PREFILL_MS_PER_TOKEN;
    this.logLimit = options.log_limit ?? DEFAULT_LLM_LOG_LIMIT;
    this.capacity = options.capacity ?? this.maxRunning * 2;
    if (!Number.isInteger(kv) || kv < BLOCK_TOKENS) throw new RangeError(`kv_tokens must be an integer >= ${BLOCK_TOKENS}, got ${kv}`);
    if (!Number.isInteger(this.maxRunning) || this.maxRunning < 1) throw new RangeError(`max_running must be an integer >= 1, got ${this.maxRunning}`);
    if (!Number.isInteger(this.capacity) || this.capacity < 1) throw new RangeError(`capacity must be an integer >= 1, got ${this.capacity}`);
    for (const [name, v] of [["step_ms", this.stepMs], ["step_per_seq_ms", this.stepPerSeqMs], ["prefill_ms_per_token", this.prefillMsPerToken]] as const) {
      if (!Number.isFinite(v) || v < 0) throw new RangeError(`${name} must be a number >= 0, got ${v}`);
    }
    this.cache = new KvBlockCache(kv, BLOCK_TOKENS);
  }

  generate(request: EngineRequest, signal: AbortSignal): EngineGeneration {
    const seq = this.enqueue(request, signal);
    const usage = (): EngineUsage => ({ prompt_tokens: seq.promptTokens, completion_tokens: seq.produced });
    const stop = (reason: unknown): void => this.stop(seq, reason);
    async function* tokens(): AsyncGenerator<EngineToken> {
      try {
        for (;;) {
          const next = seq.pending.shift();
          if (next) {
            yield next;
            continue;
          }
          if (seq.error !== undefined) throw seq.error;
          if (seq.done) return;
          await new Promise<void>((resolve) => (seq.wake = resolve));
        }
      } finally {
        // Left early (break) or failed: the sequence stops and frees its room.
        if (!seq.done) stop(new EngineError("CANCELLED", "generation stopped by the caller"));
      }
    }
    return { [Symbol.asyncIterator]: tokens, usage };
  }

  async infer(batch: EngineBatch, signal: AbortSignal): Promise<EngineItemResult[]> {
    return Promise.all(
      batch.requests.map(async (request): Promise<EngineItemResult> => {
        const generation = this.generate(request, signal);
        let text = "";
        try {
          for await (const t of generation) text += t.text;
        } catch (err) {
          if (signal.aborted) throw signal.reason instanceof Error ? signal.reason : new EngineError("CANCELLED", "batch cancelled");
          if (err instanceof EngineClosedError) throw err;
          if (err instanceof EngineError) return { ok: false, error: { code: err.code, message: err.message } };
          throw err;
        }
        return { ok: true, output: { text }, usage: generation.usage() };
      }),
    );
  }

  load(options: { prefixBlocks: boolean }): Promise<EngineLoad> {
    return Promise.resolve({
      waiting: this.waiting.length,
      running: this.running.size,
      kvUsage: this.cache.usedTokens / this.cache.capacityTokens,
      kvCapacityTokens: this.cache.capacityTokens,
      ...(options.prefixBlocks ? { prefixBlocks: this.cache.hashes(), blockTokens: BLOCK_TOKENS } : {}),
    });
  }

  close(): Promise<void> {
    if (!this.closed) {
      this.closed = true;
      this.cancelStep?.();
      this.cancelStep = undefined;
      for (const s of [...this.waiting, ...this.running]) this.stop(s, new EngineClosedError());
    }
    return Promise.resolve();
  }

  private enqueue(request: EngineRequest, signal: AbortSignal): Sequence {
    const prompt = request.prompt ?? (request.inputs !== undefined ? JSON.stringify(request.inputs) : "");
    const promptTokens = estimateTokens(prompt);
    const blocks = prefixBlockHashes(prompt);
    const maxTokens = maxTokensOf(request.parameters);
    const seq: Sequence = {
      request,
      promptTokens,
      maxTokens: typeof maxTokens === "number" ? maxTokens : 0,
      blocks,
      ownTokens: promptTokens - blocks.length * BLOCK_TOKENS + (typeof maxTokens === "number" ? maxTokens : 0),
      arrivedAtMs: this.clock.now(),
      cachedTokens: 0,
      prefill: 0,
      produced: 0,
      done: false,
      pending: [],
    };
    if (typeof maxTokens === "string") return this.failed(seq, new EngineError("INVALID_ARGUMENT", maxTokens));
    if (this.closed) return this.failed(seq, new EngineClosedError());
    if (blocks.length * BLOCK_TOKENS + seq.ownTokens > this.cache.capacityTokens) {
      return this.failed(seq, new EngineError("INVALID_ARGUMENT", `prompt (${promptTokens} tokens) and max_tokens (${seq.maxTokens}) exceed the KV capacity of ${this.cache.capacityTokens} tokens`));
    }
    if (signal.aborted) return this.failed(seq, signal.reason);
    const onAbort = (): void => this.stop(seq, signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    this.waiting.push(seq);
    this.counters.sequences++;
    // Forget the listener once the sequence is over.
    this.onEnd.set(seq, () => signal.removeEventListener("abort", onAbort));
    this.schedule(0);
    return seq;
  }

  private readonly onEnd = new Map<Sequence, () => void>();

  private failed(seq: Sequence, error: unknown): Sequence {
    seq.error = asError(error);
    seq.done = true;
    return seq;
  }

  private schedule(ms: number): void {
    if (this.cancelStep || this.closed) return;
    this.cancelStep = this.clock.setTimer(() => {
      this.cancelStep = undefined;
      this.step();
    }, ms);
  }

  /** Admits what fits, then runs one step: prefill of the newly admitted, a token for each. */
  private step(): void {
    while (this.waiting.length > 0 && this.running.size < this.maxRunning) {
      const seq = this.waiting[0]!;
      const cached = this.cache.cachedPrefix(seq.blocks);
      if (!this.cache.admit(seq.blocks, seq.ownTokens)) break; // first come, first served
      this.waiting.shift();
      seq.admittedAtMs = this.clock.now();
      seq.cachedTokens = Math.min(cached * BLOCK_TOKENS, seq.promptTokens);
      seq.prefill = seq.promptTokens - seq.cachedTokens;
      this.counters.promptTokens += seq.promptTokens;
      this.counters.cachedTokens += seq.cachedTokens;
      this.running.add(seq);
    }
    if (this.running.size === 0) return;
    this.counters.maxRunning = Math.max(this.counters.maxRunning, this.running.size);
    const batch = [...this.running];
    let prefill = 0;
    for (const s of batch) {
      prefill += s.prefill;
      s.prefill = 0;
    }
    const ms = this.stepMs + this.stepPerSeqMs * batch.length + this.prefillMsPerToken * prefill;
    this.counters.steps++;
    this.cancelStep = this.clock.setTimer(() => {
      this.cancelStep = undefined;
      this.endStep(batch);
    }, ms);
  }

  private endStep(batch: Sequence[]): void {
    const now = this.clock.now();
    for (const s of batch) {
      if (s.done) continue;
      if (s.produced < s.maxTokens) {
        s.pending.push({ text: ` t${s.produced}` });
        s.produced++;
        this.counters.outputTokens++;
        s.firstTokenAtMs ??= now;
      }
      if (s.produced >= s.maxTokens) this.finish(s, undefined);
      else this.notify(s);
    }
    this.step();
  }

  private stop(seq: Sequence, reason: unknown): void {
    if (seq.done) return;
    this.finish(seq, reason ?? new EngineError("CANCELLED", "generation stopped"));
    this.schedule(0);
  }

  private finish(seq: Sequence, error: unknown): void {
    seq.done = true;
    if (error !== undefined) seq.error = asError(error);
    const i = this.waiting.indexOf(seq);
    if (i >= 0) this.waiting.splice(i, 1);
    if (this.running.delete(seq)) this.cache.release(seq.blocks, seq.ownTokens);
    this.onEnd.get(seq)?.();
    this.onEnd.delete(seq);
    this.record(seq, error !== undefined);
    this.notify(seq);
  }

  private notify(seq: Sequence): void {
    const wake = seq.wake;
    seq.wake = undefined;
    wake?.();
  }

  private record(seq: Sequence, cancelled: boolean): void {
    this.log.push({
      id: seq.request.id,
      promptTokens: seq.promptTokens,
      cachedTokens: seq.cachedTokens,
      arrivedAtMs: seq.arrivedAtMs,
      ...(seq.admittedAtMs !== undefined ? { admittedAtMs: seq.admittedAtMs } : {}),
      ...(seq.firstTokenAtMs !== undefined ? { firstTokenAtMs: seq.firstTokenAtMs } : {}),
      finishedAtMs: this.clock.now(),
      outputTokens: seq.produced,
      cancelled,
    });
    if (this.log.length > this.logLimit) this.log.splice(0, this.log.length - this.logLimit);
  }
}

function asError(reason: unknown): Error {
  return reason instanceof Error ? reason : new EngineError("CANCELLED", `generation stopped: ${JSON.stringify(reason)}`);
}

/** `parameters.max_tokens` as a count, or the message saying why it is not one. */
function maxTokensOf(parameters: Readonly<Record<string, unknown>> | undefined): number | string {
  const v = parameters?.["max_tokens"];
  if (v === undefined || v === null) return DEFAULT_LLM_MAX_TOKENS;
  if (typeof v !== "number" || !Number.isInteger(v) || v < 1) return `max_tokens must be an integer >= 1, got ${JSON.stringify(v)}`;
  return v;
}
