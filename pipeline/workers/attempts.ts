/**
 * The attempt loops of the pool: a batch call (`Infer`) or a generation (`Generate`) is tried
 * on a worker chosen for it; a retriable failure is retried on another worker, with backoff,
 * within the retry budget and never past the deadline. When no worker can take it, it fails as
 * `noWorker`.
 */
import { DispatchError, type BatchReply } from "../../operators/dispatch-batch.js";
import type { Chunk, GenerationReply } from "../../operators/generate-each.js";
import type { Batch, RoutedJob } from "../../operators/types.js";
import { backoffMs } from "../../operators/support/backoff.js";
import { sleep } from "../../operators/support/sleep.js";
import type { BatchTrace } from "../telemetry/types.js";
import { asDispatchError, batchDeadline, latestDeadline, toWorkerBatch, toWorkerRequest } from "./worker-request.js";
import { DEFAULT_RETRY_BACKOFF_MS, keyOf, MAX_RETRY_BACKOFF_MS, PRIORITY_RANK, type PoolEvent, type PoolWorker, type RouteOf, type WorkerPoolOptions } from "./pool-options.js";
import type { RetryBudget } from "./retry-budget.js";
import type { WorkerChoice } from "./worker-choice.js";
import type { WorkerSet } from "./worker-set.js";

/** What the attempt loops work with: the pool's parts. */
export interface AttemptContext {
  readonly opts: WorkerPoolOptions;
  readonly set: WorkerSet;
  readonly choice: WorkerChoice;
  readonly budget: RetryBudget;
  readonly emit: (e: PoolEvent) => void;
  readonly signalFor: (job: RoutedJob) => { signal: AbortSignal; done: () => void };
}

const stopping = (): DispatchError => new DispatchError("the pipeline is stopping", "UNAVAILABLE", true, { noWorker: true });
const noWorker = (key: string): DispatchError => new DispatchError(`no healthy worker serves ${key}`, "UNAVAILABLE", true, { noWorker: true });
const cancelled = (cause?: unknown): DispatchError => new DispatchError("cancelled by the client", "CANCELLED", false, cause !== undefined ? { cause } : undefined);

/** The pause before the next attempt. */
function backoff(ctx: AttemptContext, attempt: number): Promise<void> {
  return sleep(backoffMs(attempt, { baseMs: ctx.opts.retryBackoffMs ?? DEFAULT_RETRY_BACKOFF_MS, maxMs: MAX_RETRY_BACKOFF_MS }));
}

/** Takes a retry from the budget, saying so when it is spent. */
function takeRetry(ctx: AttemptContext, key: string): boolean {
  if (ctx.budget.take()) return true;
  ctx.emit({ type: "retry-budget-exhausted", key });
  return false;
}

/** The worker for a batch: by the model's policy among the free ones, else the least busy. */
function pickFor(ctx: AttemptContext, batch: Batch, exclude: Set<PoolWorker>): PoolWorker | undefined {
  const first = batch.jobs[0];
  if (first && ctx.choice.policyOf(batch.model) !== "least-loaded") {
    const now = Date.now();
    const free = [...ctx.set.of(batch.key)].filter((w) => !exclude.has(w) && ctx.set.usable(w, now) && w.batches < ctx.opts.batchesPerWorker);
    const chosen = ctx.choice.choose(batch.key, free, ctx.choice.routeOf(first));
    if (chosen) return chosen;
  }
  return ctx.set.pick(batch.key, exclude);
}

/** Tries a batch on workers until one answers, the retries or the deadline run out. */
export async function batchAttempts(ctx: AttemptContext, batch: Batch, bt: BatchTrace | undefined): Promise<BatchReply> {
  const { set } = ctx;
  if (set.stopped) throw stopping();
  const tried = new Set<PoolWorker>();
  let lastErr: DispatchError | undefined;
  const request = toWorkerBatch(batch);
  // Waiting for a slot is bounded by the requests' own deadlines (the queue is bounded by the
  // in-flight credits); the model's timeout bounds each call, from when it starts.
  const waitUntil = latestDeadline(batch) ?? Number.POSITIVE_INFINITY;
  let deadlineMs = batchDeadline(batch, ctx.opts.timeoutMs(batch.model));
  const first = batch.jobs.find((j) => j.traceparent !== undefined);
  const passThrough = first?.traceparent ? { traceparent: first.traceparent, ...(first.tracestate ? { tracestate: first.tracestate } : {}) } : {};
  ctx.budget.noteCall();
  const rank = Math.min(...batch.jobs.map((j) => PRIORITY_RANK[j.priority]));
  for (let attempt = 0; ; attempt++) {
    // Every worker busy with its batches: wait for one, high priority first.
    while (!set.stopped && set.pick(batch.key, tried) !== undefined && !set.hasBatchSlot(batch.key, tried) && Date.now() < waitUntil) {
      await set.waitForSlot(batch.key, rank, waitUntil);
    }
    if (set.stopped) throw stopping();
    deadlineMs = batchDeadline(batch, ctx.opts.timeoutMs(batch.model));
    const w = pickFor(ctx, batch, tried);
    if (!w) throw lastErr ?? noWorker(batch.key);
    tried.add(w);
    w.breaker.calling();
    set.take(w, batch.jobs.length);
    const t0 = performance.now();
    const call = bt?.startWorkerCall(w.endpoint, "Infer");
    const trace = call?.carrier.traceparent ? call.carrier : passThrough;
    try {
      const reply = await w.conn.infer(request, { deadlineMs, ...trace });
      call?.end();
      set.succeeded(w);
      return { results: reply.results, workerMs: performance.now() - t0, worker: w.endpoint };
    } catch (err) {
      const e = asDispatchError(err);
      call?.end(e.code, e);
      if (!e.retriable) {
        // The worker answered (a bad batch, a deadline): not the worker's fault.
        if (w.breaker.probing) set.succeeded(w);
        throw e;
      }
      set.failed(w);
      lastErr = e;
      if (Date.now() >= deadlineMs || !takeRetry(ctx, batch.key)) throw e;
      ctx.emit({ type: "retry", endpoint: w.endpoint, key: batch.key, reason: e.message });
    } finally {
      set.release(w, batch.jobs.length);
    }
    await backoff(ctx, attempt);
  }
}

/** Waits for a usable worker of the key with a free slot; undefined when the key has none. */
async function acquireSlot(ctx: AttemptContext, key: string, exclude: Set<PoolWorker>, deadlineMs: number, signal: AbortSignal, rank: number, route: RouteOf): Promise<PoolWorker | undefined> {
  const { set } = ctx;
  for (;;) {
    if (signal.aborted) throw cancelled();
    if (set.stopped) return undefined;
    const now = Date.now();
    const free: PoolWorker[] = [];
    let anyUsable = false;
    for (const w of set.of(key)) {
      if (exclude.has(w) || !set.usable(w, now)) continue;
      anyUsable = true;
      if (w.items < w.capacity) free.push(w);
    }
    const best = ctx.choice.choose(key, free, route);
    if (best) {
      set.take(best, 1);
      return best;
    }
    if (!anyUsable) return undefined;
    if (now >= deadlineMs) throw new DispatchError(`no free worker slot for ${key} before the deadline`, "DEADLINE_EXCEEDED", false);
    // All busy: wait for a slot to free (or the deadline, or a cancel).
    await set.waitForSlot(key, rank, deadlineMs, signal);
  }
}

/** See WorkerPool.generate. */
export async function generateAttempts(ctx: AttemptContext, job: RoutedJob, onChunk: (c: Chunk) => Promise<void> | void): Promise<GenerationReply> {
  const { set } = ctx;
  const key = keyOf(job.model, job.version);
  const deadlineMs = job.deadlineMs ?? Date.now() + ctx.opts.timeoutMs(job.model);
  const cancel = ctx.signalFor(job);
  const tried = new Set<PoolWorker>();
  let lastErr: DispatchError | undefined;
  const route = ctx.choice.routeOf(job);
  try {
    for (let attempt = 0; ; attempt++) {
      const w = await acquireSlot(ctx, key, tried, deadlineMs, cancel.signal, PRIORITY_RANK[job.priority], route);
      if (!w) throw lastErr ?? noWorker(key);
      tried.add(w);
      w.breaker.calling();
      const call = ctx.opts.tracing?.requestOf(job.delivery)?.startWorkerCall(w.endpoint, "Generate");
      const trace = call?.carrier.traceparent ? call.carrier : job.traceparent ? { traceparent: job.traceparent, ...(job.tracestate ? { tracestate: job.tracestate } : {}) } : {};
      const t0 = performance.now();
      let chunks = 0;
      let firstChunkMs: number | undefined;
      try {
        if (!w.conn.generate) throw new DispatchError(`worker ${w.endpoint} cannot stream`, "UNAVAILABLE", true);
        const stream = w.conn.generate({ model: job.model, version: job.version, request: toWorkerRequest(job) }, { deadlineMs, signal: cancel.signal, ...trace });
        for await (const c of stream) {
          if (c.final) {
            const f = c.final;
            call?.end(f.status === "ok" ? "ok" : (f.error?.code ?? "INTERNAL"));
            set.succeeded(w);
            return {
              text: f.output?.text ?? "",
              usage: f.usage ?? { prompt_tokens: 0, completion_tokens: chunks },
              workerMs: performance.now() - t0,
              worker: w.endpoint,
              ...(firstChunkMs !== undefined ? { firstChunkMs } : {}),
              ...(f.output?.data !== undefined ? { data: f.output.data } : {}),
              ...(f.status !== "ok" ? { error: f.error ?? { code: "INTERNAL", message: "generation failed" } } : {}),
            };
          }
          if (chunks === 0) firstChunkMs = performance.now() - t0;
          chunks++;
          await onChunk({ seq: c.seq, text: c.text });
        }
        throw new DispatchError(`worker ${w.endpoint} ended the generation without a result`, "UNAVAILABLE", true);
      } catch (err) {
        if (cancel.signal.aborted) {
          call?.end("CANCELLED");
          throw cancelled(err);
        }
        const e = asDispatchError(err);
        call?.end(e.code, e);
        if (!e.retriable) throw e;
        set.failed(w);
        lastErr = chunks > 0 ? new DispatchError(`generation broke off after ${chunks} chunks: ${e.message}`, "UNAVAILABLE", true, { cause: e }) : e;
        if (chunks > 0 || Date.now() >= deadlineMs || !takeRetry(ctx, key)) throw lastErr;
        ctx.emit({ type: "retry", endpoint: w.endpoint, key, reason: e.message });
      } finally {
        set.release(w, 1);
      }
      await backoff(ctx, attempt);
    }
  } finally {
    cancel.done();
  }
}
