/**
 * The workers of each model@version and the choice of one for each batch.
 *
 * - **Routing policy** per model (pipeline/workers/routing-policy.ts): `prefix` (the prompt tokens
 *   a worker would have to prefill plus its load, bounded; default for generative models),
 *   `least-loaded` (items in flight against capacity; default otherwise) or `round-robin`. The
 *   pool keeps its own index of the prompt blocks it sent where, and asks workers for their load
 *   (`GetLoad`) every `loadIntervalMs`; a worker that does not report is routed by what the pool
 *   knows of it.
 * - **Health-checked**: each worker is asked `grpc.health.v1.Health/Check` every
 *   `healthIntervalMs`; one that is not SERVING (or does not answer) gets no traffic until it is.
 * - **Circuit breaker**: after `ejectAfterFailures` consecutive failed calls a worker is ejected
 *   for `ejectForMs` (doubling while it keeps failing); then one probe call may go through, and
 *   its success closes the breaker.
 * - **Retries**: a call that fails with UNAVAILABLE or a lost connection is retried on another
 *   worker, with backoff, within a retry budget (a fraction of calls), and never past the
 *   batch's deadline. When no worker can take it, the batch fails as `noWorker`, and its
 *   requests wait in the queue for one to appear.
 * - **Draining**: a removed worker takes no new calls; its calls in flight finish, then its
 *   connection closes.
 */
import type { Observable } from "rxjs";
import type { BatchDispatcher, BatchReply, DispatchError } from "../../operators/dispatch-batch.js";
import type { Chunk, GenerationReply, Generator } from "../../operators/generate-each.js";
import type { Batch, RoutedJob } from "../../operators/types.js";
import type { BatchTrace } from "../telemetry/types.js";
import { batchAttempts, generateAttempts, type AttemptContext } from "./attempts.js";
import { pollLoad } from "./load-poll.js";
import {
  DEFAULT_HEALTH_INTERVAL_MS,
  DEFAULT_LOAD_INTERVAL_MS,
  DEFAULT_MIN_RETRIES_PER_SECOND,
  DEFAULT_RETRY_BUDGET_RATIO,
  DEFAULT_WORKER_CAPACITY,
  type PoolEvent,
  type WorkerPoolOptions,
  type WorkerSnapshot,
} from "./pool-options.js";
import { PrefixIndex } from "./prefix-index.js";
import { RetryBudget } from "./retry-budget.js";
import { WorkerChoice } from "./worker-choice.js";
import { WorkerSet } from "./worker-set.js";


export class WorkerPool implements BatchDispatcher, Generator {
  private readonly set: WorkerSet;
  private readonly prefixes: PrefixIndex;
  private readonly attempts: AttemptContext;
  private healthTimer: NodeJS.Timeout | undefined;
  private loadTimer: NodeJS.Timeout | undefined;
  /** Aborts for generations (cancellation), by job. */
  signalFor: (job: RoutedJob) => { signal: AbortSignal; done: () => void } = () => ({ signal: new AbortController().signal, done: () => undefined });

  constructor(private readonly opts: WorkerPoolOptions) {
    const every = opts.healthIntervalMs ?? DEFAULT_HEALTH_INTERVAL_MS;
    if (every > 0) {
      this.healthTimer = setInterval(() => void this.checkHealth(), every);
      this.healthTimer.unref();
    }
    this.prefixes = new PrefixIndex(opts.prefixTtlMs !== undefined ? { ttlMs: opts.prefixTtlMs } : {});
    const emit = (e: PoolEvent): void => this.emit(e);
    this.set = new WorkerSet(opts, this.prefixes, emit);
    this.attempts = {
      opts,
      set: this.set,
      choice: new WorkerChoice(opts, this.prefixes),
      budget: new RetryBudget(opts.retryBudgetRatio ?? DEFAULT_RETRY_BUDGET_RATIO, opts.minRetriesPerSecond ?? DEFAULT_MIN_RETRIES_PER_SECOND),
      emit,
      signalFor: (job) => this.signalFor(job),
    };
    const loadEvery = opts.loadIntervalMs ?? DEFAULT_LOAD_INTERVAL_MS;
    if (loadEvery > 0) {
      this.loadTimer = setInterval(() => void this.pollLoad(), loadEvery);
      this.loadTimer.unref();
    }
  }

  /** Emits a model@version key whenever one of its workers finishes a batch or becomes usable. */
  get capacityFreed$(): Observable<string> {
    return this.set.freed$;
  }

  private emit(e: PoolEvent): void {
    try {
      this.opts.onEvent?.(e);
    } catch {
      // a listener's failure is its own
    }
  }

  /** Adds a worker for a model version (again: updates its capacity). */
  add(model: string, version: string, endpoint: string, capacity = DEFAULT_WORKER_CAPACITY): void {
    this.set.add(model, version, endpoint, capacity);
  }

  /** Removes a worker from a model version; with no version left it drains and closes. */
  remove(model: string, version: string, endpoint: string): void {
    this.set.remove(model, version, endpoint);
  }

  /** Keys served now. */
  keys(): string[] {
    return this.set.keys();
  }

  /**
   * True when the batcher need not wait: some usable worker of the key could start a batch now,
   * or the key has no usable worker at all (then waiting here helps nothing: the batch goes to
   * dispatch, which answers "no worker" and the requests wait in the queue, deadlines counted).
   */
  hasIdleCapacity(key: string): boolean {
    return this.set.hasIdleCapacity(key);
  }

  /** True when the key has at least one usable worker. */
  hasWorker(key: string): boolean {
    return this.set.hasWorker(key);
  }

  snapshot(): WorkerSnapshot[] {
    return this.set.snapshot();
  }

  /** One round of load reports (run on a timer; exposed for tests). */
  async pollLoad(): Promise<void> {
    await pollLoad(this.set.all(), this.prefixes);
  }

  async dispatch(batch: Batch): Promise<BatchReply> {
    let bt: BatchTrace | undefined;
    try {
      bt = this.opts.tracing?.startBatch(batch);
    } catch {
      bt = undefined;
    }
    const t0 = performance.now();
    let ok = false;
    try {
      const reply = await batchAttempts(this.attempts, batch, bt);
      ok = true;
      bt?.end();
      return reply;
    } catch (err) {
      bt?.end((err as DispatchError).code ?? "INTERNAL", err);
      throw err;
    } finally {
      try {
        this.opts.onBatch?.({ model: batch.model, version: batch.version, size: batch.jobs.length, workerSeconds: (performance.now() - t0) / 1000, ok });
      } catch {
        // metrics never break a call
      }
    }
  }

  /**
   * Runs one generation on the least-loaded worker with a free slot (items in flight below its
   * advertised capacity), waiting for a slot when all are busy. Chunks go to `onChunk` in order.
   * A failure before the first chunk is retried on another worker; after it, the generation
   * cannot be resumed and fails retriably (the request is delivered again and starts over).
   */
  async generate(job: RoutedJob, onChunk: (c: Chunk) => Promise<void> | void): Promise<GenerationReply> {
    return generateAttempts(this.attempts, job, onChunk);
  }

  /** One round of health checks (run on a timer; exposed for tests). */
  async checkHealth(): Promise<void> {
    await this.set.checkHealth();
  }

  /** Closes every connection. Safe to call twice. */
  async stop(): Promise<void> {
    if (this.set.stopped) return;
    if (this.healthTimer) clearInterval(this.healthTimer);
    if (this.loadTimer) clearInterval(this.loadTimer);
    this.prefixes.clear();
    // Calls waiting for a slot see `stopped` and end (their requests go back to the queue).
    await this.set.stop();
  }
}
