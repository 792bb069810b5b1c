/**
 * Prometheus metrics of the pipeline (served by `MetricsServer`, metrics-server.ts).
 *
 * Names follow Prometheus conventions: base units in the name (`_seconds`), `_total` on
 * counters. Label values that come from outside (model, version, tenant) are capped per label
 * ({@link DEFAULT_MAX_LABEL_VALUES}); values beyond the cap read `_other`, so a flood of
 * made-up model names cannot blow up the series count.
 *
 * ```ts
 * const metrics = new PipelineMetrics();
 * metrics.onCollect(async () => metrics.setWorkers(pool.snapshot()));   // fresh values per scrape
 * metrics.settled(s);                                                   // for each settled outcome
 * ```
 */
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from "prom-client";
import type { Settled } from "../../operators/settle-outcome.js";
import type { RoutedJob } from "../../operators/types.js";
import { UNKNOWN_TOKEN } from "../../proto/wire.js";
import { DEFAULT_MAX_LABEL_VALUES, LabelCap, NO_VERSION, priorityOf } from "./metric-labels.js";
import { GenerationMetrics } from "./generation-metrics.js";

export const DEFAULT_METRICS_PORT = 9464;
/** Scraped from other hosts, so every interface by default. */
export const DEFAULT_METRICS_HOST = "0.0.0.0";
/** Longest the collect hooks may delay a scrape. */
const DEFAULT_COLLECT_TIMEOUT_MS = 2_000;

/** Time spent in JetStream before the pull: milliseconds to minutes of backlog. */
const QUEUE_SECONDS_BUCKETS: readonly number[] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];
/** Stored to settled. */
const REQUEST_SECONDS_BUCKETS: readonly number[] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];
/** One worker call. */
const WORKER_SECONDS_BUCKETS: readonly number[] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
const BATCH_SIZE_BUCKETS: readonly number[] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

export interface PipelineMetricsOptions {
  /** Registry to register in; a new one by default (never prom-client's global one). */
  registry?: Registry;
  /** Also export the process's CPU, memory, event loop and GC metrics; default true. */
  processMetrics?: boolean;
  /** Priorities whose series start at zero instead of appearing on first use. */
  priorities?: readonly string[];
  /** See {@link DEFAULT_MAX_LABEL_VALUES}. */
  maxLabelValues?: number;
  /** See {@link DEFAULT_COLLECT_TIMEOUT_MS}. */
  collectTimeoutMs?: number;
}

/** One request that reached its end (a published result or a dead letter), or was put back. */
export interface RequestSettledInfo {
  model: string;
  /** The routed version; {@link NO_VERSION} when there was none. */
  version?: string | undefined;
  tenant: string;
  priority: string;
  /** `ok`, an error code, or what happened instead of a result (`retry`, `duplicate`). */
  status: string;
  /** Stored to pulled. */
  queueMs?: number | undefined;
  /** Stored to settled. */
  totalMs?: number | undefined;
}

/** One worker call for a batch. */
export interface BatchDispatchedInfo {
  model: string;
  version: string;
  size: number;
  /** Wall time of the call. */
  workerSeconds?: number | undefined;
}

/** A worker as the pool sees it; the pool's `WorkerSnapshot` fits. */
export interface WorkerState {
  readonly endpoint: string;
  readonly healthy: boolean;
  readonly breaker: string;
}

/** What the metrics server serves on `/metrics`. */
export interface MetricsSource {
  readonly contentType: string;
  exposition(): Promise<string>;
}

type CollectHook = () => void | Promise<void>;

/** The pipeline's metrics, in their own registry. */
export class PipelineMetrics implements MetricsSource {
  readonly registry: Registry;
  readonly requests: Counter<"model" | "version" | "tenant" | "priority" | "status">;
  readonly queueSeconds: Histogram<"priority">;
  readonly requestSeconds: Histogram<"model" | "priority">;
  readonly batchSize: Histogram<"model" | "version">;
  readonly workerSeconds: Histogram<"model" | "version">;
  readonly ttftSeconds: Histogram<"model" | "version">;
  readonly tpotSeconds: Histogram<"model" | "version">;
  readonly inflight: Gauge<"priority">;
  readonly consumerPending: Gauge<"priority" | "model">;
  readonly modelInflight: Gauge<"model">;
  readonly consumerAckPending: Gauge<"priority">;
  readonly deadLetters: Counter<"code">;
  readonly workerHealthy: Gauge<"endpoint">;
  readonly workerBreakerOpen: Gauge<"endpoint">;
  readonly publishErrors: Counter;
  readonly pullErrors: Counter<"priority">;
  readonly traceSpansLost: Counter;
  private readonly hooks = new Set<CollectHook>();
  private readonly labels: LabelCap;
  private readonly collectTimeoutMs: number;
  private traceStats: (() => { spansDropped: number; spansFailed: number }) | undefined;
  private traceLost = 0;
  /** The `model` labels of `sluice_consumer_pending` set last, per priority. */
  private readonly pendingModels = new Map<string, string[]>();
  private readonly generation: GenerationMetrics;

  constructor(opts: PipelineMetricsOptions = {}) {
    const registers = [(this.registry = opts.registry ?? new Registry())];
    this.labels = new LabelCap(opts.maxLabelValues ?? DEFAULT_MAX_LABEL_VALUES);
    this.collectTimeoutMs = opts.collectTimeoutMs ?? DEFAULT_COLLECT_TIMEOUT_MS;
    this.requests = new Counter({
      name: "sluice_requests_total",
      help: "Requests settled, by outcome: ok, an error code, retry (put back in the queue) or duplicate.",
      labelNames: ["model", "version", "tenant", "priority", "status"],
      registers,
    });
    this.queueSeconds = new Histogram({
      name: "sluice_queue_seconds",
      help: "Time a request waited in JetStream, from stored to pulled.",
      labelNames: ["priority"],
      buckets: [...QUEUE_SECONDS_BUCKETS],
      registers,
    });
    this.requestSeconds = new Histogram({
      name: "sluice_request_seconds",
      help: "Time from a request being stored to its result being published.",
      labelNames: ["model", "priority"],
      buckets: [...REQUEST_SECONDS_BUCKETS],
      registers,
    });
    this.batchSize = new Histogram({
      name: "sluice_batch_size",
      help: "Requests per batch sent to a worker.",
      labelNames: ["model", "version"],
      buckets: [...BATCH_SIZE_BUCKETS],
      registers,
    });
    this.workerSeconds = new Histogram({
      name: "sluice_worker_seconds",
      help: "Wall time of one worker call for a batch.",
      labelNames: ["model", "version"],
      buckets: [...WORKER_SECONDS_BUCKETS],
      registers,
    });
    this.generation = new GenerationMetrics(registers, (model, version) => this.modelVersion(model, version));
    this.ttftSeconds = this.generation.ttftSeconds;
    this.tpotSeconds = this.generation.tpotSeconds;
    this.inflight = new Gauge({
      name: "sluice_inflight",
      help: "Requests pulled by this process and not yet settled.",
      labelNames: ["priority"],
      registers,
    });
    this.consumerPending = new Gauge({
      name: "sluice_consumer_pending",
      help: "Requests in the stream not yet delivered to the priority's consumer. Exact per priority (sum over model); split by model in proportion to the models this process recently pulled from the priority (an estimate), model=\"\" for what it cannot attribute.",
      labelNames: ["priority", "model"],
      registers,
    });
    this.modelInflight = new Gauge({
      name: "sluice_model_inflight",
      help: "Requests pulled by this process and not yet settled, per model.",
      labelNames: ["model"],
      registers,
    });
    this.consumerAckPending = new Gauge({
      name: "sluice_consumer_ack_pending",
      help: "Requests delivered by the priority's consumer and not yet acknowledged (all pipeline processes).",
      labelNames: ["priority"],
      registers,
    });
    this.deadLetters = new Counter({
      name: "sluice_dlq_total",
      help: "Requests written to the dead-letter stream, by error code.",
      labelNames: ["code"],
      registers,
    });
    this.workerHealthy = new Gauge({
      name: "sluice_worker_healthy",
      help: "1 when the worker's health check says SERVING.",
      labelNames: ["endpoint"],
      registers,
    });
    this.workerBreakerOpen = new Gauge({
      name: "sluice_worker_breaker_open",
      help: "1 while the worker is ejected (its circuit breaker is open).",
      labelNames: ["endpoint"],
      registers,
    });
    this.publishErrors = new Counter({
      name: "sluice_publish_errors_total",
      help: "Result or dead-letter publishes that failed (tried again in place, or the request is delivered again).",
      registers,
    });
    this.pullErrors = new Counter({
      name: "sluice_pull_errors_total",
      help: "Failed pulls from a priority's consumer.",
      labelNames: ["priority"],
      registers,
    });
    // Counted elsewhere (the tracing's own stats); brought up to date at each scrape.
    this.traceSpansLost = new Counter({
      name: "sluice_trace_spans_lost_total",
      help: "Trace spans lost: dropped from a full export queue or in failed exports.",
      registers,
      collect: () => this.syncTraceStats(),
    });
    for (const p of opts.priorities ?? ["high", "normal", "low"]) {
      this.inflight.set({ priority: p }, 0);
      this.pullErrors.inc({ priority: p }, 0);
    }
    if (opts.processMetrics !== false) collectDefaultMetrics({ register: this.registry });
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /** Counts a settled request and observes its times. */
  requestSettled(info: RequestSettledInfo): void {
    const model = this.labels.value("model", info.model);
    const version = info.version ? this.labels.value("version", info.version) : NO_VERSION;
    this.requests.inc({ model, version, tenant: this.labels.value("tenant", info.tenant), priority: info.priority, status: info.status });
    if (info.queueMs !== undefined && Number.isFinite(info.queueMs)) this.queueSeconds.observe({ priority: info.priority }, Math.max(0, info.queueMs) / 1000);
    if (info.totalMs !== undefined && Number.isFinite(info.totalMs)) {
      this.requestSeconds.observe({ model, priority: info.priority }, Math.max(0, info.totalMs) / 1000);
    }
  }

  /**
   * Everything a settled outcome says: the request's count and times (final outcomes only:
   * a retry is counted, its times are observed when it ends), a dead letter, a failed publish.
   */
  settled(s: Settled, nowMs: number = Date.now()): void {
    const o = s.outcome;
    const failed = s.error !== undefined;
    const publishErrors = Math.max(s.publishFailures ?? 0, failed ? 1 : 0);
    if (publishErrors > 0) this.publishErrors.inc(publishErrors);
    if (s.deadLettered) this.deadLetters.inc({ code: o.kind === "dead" ? o.error.code : (s.result?.error?.code ?? "INTERNAL") });
    // Put back in the queue (a retry, or a publish that failed): counted, timed when it ends.
    let status: string;
    if (failed) status = "retry";
    else if (s.result) status = s.result.status === "ok" ? "ok" : (s.result.error?.code ?? "INTERNAL");
    else if (o.kind === "dead") status = o.error.code;
    else if (s.action === "duplicate") status = "duplicate";
    else status = "retry";
    const final = status !== "retry" && status !== "duplicate";
    const d = o.kind === "dead" ? o.delivery : o.job.delivery;
    const queueMs = s.result?.timing?.queue_ms ?? d.pulledAtMs - d.storedAtMs;
    const times = final ? { queueMs, totalMs: nowMs - d.storedAtMs } : {};
    if (o.kind === "dead") {
      this.requestSettled({ model: o.model ?? UNKNOWN_TOKEN, tenant: o.tenant ?? UNKNOWN_TOKEN, priority: priorityOf(d.subject), status, ...times });
    } else {
      const job = o.job;
      this.requestSettled({ model: job.model, version: job.version ?? s.result?.version, tenant: job.tenant, priority: job.priority, status, ...times });
    }
  }

  /** One worker call for a batch: its size, and its time when it answered. */
  batchDispatched(info: BatchDispatchedInfo): void {
    const labels = { model: this.labels.value("model", info.model), version: this.labels.value("version", info.version) };
    this.batchSize.observe(labels, info.size);
    if (info.workerSeconds !== undefined && Number.isFinite(info.workerSeconds)) this.workerSeconds.observe(labels, Math.max(0, info.workerSeconds));
  }

  /** A generation's chunk went out (see {@link GenerationMetrics.chunkPublished}). Never throws. */
  chunkPublished(job: RoutedJob, nowMs: number = Date.now()): void {
    this.generation.chunkPublished(job, nowMs);
  }

  /** A request settled (see {@link GenerationMetrics.generationSettled}). Never throws. */
  generationSettled(s: Settled, nowMs: number = Date.now()): void {
    this.generation.generationSettled(s, nowMs);
  }

  setInflight(priority: string, n: number): void {
    this.inflight.set({ priority }, n);
  }

  /**
   * The consumer's `num_pending` and `num_ack_pending` (from its info), and `pending` split by
   * model (shares that add up to `pending`; all of it under model `""` without a split).
   */
  setConsumerState(priority: string, pending: number, ackPending: number, pendingByModel?: ReadonlyMap<string, number>): void {
    const split = new Map<string, number>();
    for (const [model, n] of pendingByModel ?? [["", pending] as const]) {
      const label = model === "" ? "" : this.labels.value("model", model);
      split.set(label, (split.get(label) ?? 0) + n);
    }
    for (const model of this.pendingModels.get(priority) ?? []) if (!split.has(model)) this.consumerPending.remove({ priority, model });
    for (const [model, n] of split) this.consumerPending.set({ priority, model }, n);
    this.pendingModels.set(priority, [...split.keys()]);
    this.consumerAckPending.set({ priority }, ackPending);
  }

  /** Requests pulled and not yet settled, per model: replaces the previous counts. */
  setModelInflight(byModel: ReadonlyMap<string, number>): void {
    this.modelInflight.reset();
    for (const [model, n] of byModel) this.modelInflight.inc({ model: model === "" ? "" : this.labels.value("model", model) }, n);
  }

  deadLettered(code: string): void {
    this.deadLetters.inc({ code });
  }

  publishFailed(): void {
    this.publishErrors.inc();
  }

  pullFailed(priority: string): void {
    this.pullErrors.inc({ priority });
  }

  /** Replaces the worker gauges with these workers (those gone disappear). */
  setWorkers(workers: readonly WorkerState[]): void {
    this.workerHealthy.reset();
    this.workerBreakerOpen.reset();
    for (const w of workers) {
      this.workerHealthy.set({ endpoint: w.endpoint }, w.healthy ? 1 : 0);
      this.workerBreakerOpen.set({ endpoint: w.endpoint }, w.breaker === "open" ? 1 : 0);
    }
  }

  /** Reports the spans a tracing lost (its `stats()`), as `sluice_trace_spans_lost_total`. */
  trackTracing(stats: () => { spansDropped: number; spansFailed: number }): void {
    this.traceStats = stats;
  }

  /**
   * Runs `hook` before every scrape, to bring gauges up to date (consumer info, worker
   * states). Hooks run together; a scrape waits for them at most `collectTimeoutMs`, and what
   * they throw is ignored. Returns a function that removes the hook.
   */
  onCollect(hook: CollectHook): () => void {
    this.hooks.add(hook);
    return () => void this.hooks.delete(hook);
  }

  /** The metrics in the text exposition format, after running the collect hooks. */
  async exposition(): Promise<string> {
    if (this.hooks.size > 0) await this.runHooks();
    return this.registry.metrics();
  }

  private runHooks(): Promise<void> {
    const runs = [...this.hooks].map(async (hook) => {
      try {
        await hook();
      } catch {
        // A hook that fails leaves the gauges it would have set as they were.
      }
    });
    return new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, this.collectTimeoutMs);
      timer.unref();
      void Promise.all(runs).then(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  private modelVersion(model: string, version: string | undefined): { model: string; version: string } {
    return { model: this.labels.value("model", model), version: version ? this.labels.value("version", version) : NO_VERSION };
  }

  private syncTraceStats(): void {
    if (!this.traceStats) return;
    try {
      const s = this.traceStats();
      const lost = s.spansDropped + s.spansFailed;
      if (lost > this.traceLost) this.traceSpansLost.inc(lost - this.traceLost);
      this.traceLost = Math.max(this.traceLost, lost);
    } catch {
      // Keep the last count.
    }
  }
}
