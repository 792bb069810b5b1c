import { from, mergeMap, type OperatorFunction } from "rxjs";
import { retryDelays, type RetryDelayOptions } from "./outcome.js";
import { DispatchError } from "./dispatch-batch.js";
import { errorResult, type InferResult, type Outcome, type RoutedJob, type Usage } from "./types.js";
import { ERROR_CODES, type ErrorCode } from "../proto/wire.js";

/** One streamed piece of a generation. */
export interface Chunk {
  readonly seq: number;
  readonly text: string;
}

export interface GenerationReply {
  /** The whole text, as the worker reports it. */
  text: string;
  usage: Usage;
  /** Set when the generation ended in an error of its own. */
  error?: { code: string; message: string };
  data?: unknown;
  workerMs: number;
  /** Milliseconds from the call's start to its first chunk. */
  firstChunkMs?: number;
  worker?: string;
}

/** Runs one generation, handing each chunk to `onChunk` in order. */
export interface Generator {
  generate(job: RoutedJob, onChunk: (c: Chunk) => Promise<void> | void): Promise<GenerationReply>;
}

export interface GenerateEachOptions extends RetryDelayOptions {
  now?: () => number;
  waitForWorkerMs?: (model: string) => number;
  /** Publishes a chunk (to `infer.tok.<tenant>.<id>`); a failure stops the generation. */
  publishChunk: (job: RoutedJob, chunk: Chunk) => Promise<void> | void;
}

/**
 * Streams each job through a generation, chunk by chunk, and ends it with its outcome: the
 * whole text as the result, its own error, or a retry when the call failed in a way worth
 * retrying. Jobs run concurrently; how many at once is the generator's business (a worker's
 * advertised capacity).
 *
 * ```
 * input:   a------b-----------
 * chunks:   a0 a1 a2  b0 b1
 * output:  -----------A-----B      (A = a's result with a0+a1+a2)
 * ```
 */
export function generateEach(generator: Generator, opts: GenerateEachOptions): OperatorFunction<RoutedJob, Outcome> {
  const now = opts.now ?? Date.now;
  const retryDelay = retryDelays(opts);
  return mergeMap((job: RoutedJob) => {
    const t0 = now();
    if (job.deadlineMs !== undefined && job.deadlineMs <= t0) {
      return from([{ kind: "result", job, result: errorResult(job, "DEADLINE_EXCEEDED", "deadline passed while the request waited for a worker") } satisfies Outcome]);
    }
    const run = async (): Promise<Outcome> => {
      try {
        const reply = await generator.generate(job, (c) => opts.publishChunk(job, c));
        if (reply.error) {
          const code = (ERROR_CODES as readonly string[]).includes(reply.error.code) ? (reply.error.code as ErrorCode) : "INTERNAL";
          const r = errorResult(job, code, reply.error.message);
          return { kind: "result", job, result: r };
        }
        const result: InferResult = {
          id: job.id,
          status: "ok",
          model: job.model,
          version: job.version,
          output: { text: reply.text, ...(reply.data !== undefined ? { data: reply.data } : {}) },
          usage: reply.usage,
          timing: {
            queue_ms: round(t0 - job.delivery.storedAtMs),
            batch_size: 1,
            worker_ms: round(reply.workerMs),
            total_ms: round(now() - job.delivery.storedAtMs),
          },
        };
        return { kind: "result", job, result };
      } catch (err) {
        const e = err instanceof DispatchError ? err : new DispatchError((err as Error)?.message ?? String(err), "INTERNAL", false, { cause: err });
        if (e.retriable) {
          return {
            kind: "retry",
            job,
            delayMs: retryDelay(job.delivery.deliveryCount),
            lastResort: errorResult(job, e.code, e.message),
            ...(e.noWorker && opts.waitForWorkerMs ? { waitUntilMs: job.deadlineMs ?? job.delivery.storedAtMs + opts.waitForWorkerMs(job.model) } : {}),
          };
        }
        return { kind: "result", job, result: errorResult(job, e.code, e.message) };
      }
    };
    return from(run());
  });
}

function round(ms: number): number {
  return Math.round(ms * 100) / 100;
}
