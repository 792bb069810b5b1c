/**
 * The pipeline: pulls requests from the durable consumer of each priority with bounded demand,
 * decodes and validates them, routes them to a model version, batches them per model@version,
 * dispatches each batch to a worker and publishes every result before acknowledging its request.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JetStreamClient, type JetStreamManager } from "@nats-io/jetstream";
import { Subject, tap, type Observable, type Subscription } from "rxjs";
import { pullByPriority, type PriorityClass } from "../operators/pull-by-priority.js";
import type { Settled } from "../operators/settle-outcome.js";
import type { InferResult, Outcome, Priority } from "../operators/types.js";
import { inferencePipeline } from "./compose.js";
import { MetricsServer, PipelineMetrics } from "./metrics.js";
import { SERVICE_PIPELINE, startTracing, type Tracing } from "./telemetry.js";
import type { SluiceConfig } from "./config.js";
import { ConsumerPullSource, durableName, ensureConsumers, ensureStreams, honoursTermReason, STREAM_REQUESTS } from "./jetstream.js";
import { ModelRegistry } from "./registry.js";
import { StreamResultSink } from "./result-sink.js";
import { CancelRegistry } from "./cancel.js";
import { ensureDiscoveryConsumers, tenantLaneSource } from "./tenant-lanes.js";
import { TenantRegistry } from "./tenant-limits.js";
import { subjects } from "./subjects.js";
import { WorkerDirectory } from "./worker-directory.js";
import { WorkerClient } from "./worker-client.js";
import { WorkerPool, type WorkerConnection } from "./worker-pool.js";
import { connectNats } from "./connection.js";
import { PipelineClaimCheck } from "./payloads/pipeline-claim-check.js";

export interface PipelineLogger {
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
}

export const consoleLogger: PipelineLogger = {
  info: (m) => console.log(`[sluice] ${m}`),
  warn: (m) => console.warn(`[sluice] ${m}`),
  error: (m) => console.error(`[sluice] ${m}`),
};

export const silentLogger: PipelineLogger = { info: () => undefined, warn: () => undefined, error: () => undefined };

export interface PipelineStartOptions {
  /** Tracing to use instead of starting one from the configuration (not shut down on stop). */
  tracing?: Tracing;
  /** Use this connection instead of opening one (it is not closed on stop). */
  nc?: NatsConnection;
  logger?: PipelineLogger;
  /** Opens worker connections; the gRPC client by default. */
  connectWorker?: (endpoint: string) => WorkerConnection;
}

export interface PipelineStats {
  /** Unsettled messages held now, per priority. */
  unsettled: Record<string, number>;
  /** Highest unsettled count seen, per priority. */
  maxUnsettled: Record<string, number>;
  settled: number;
  byAction: Record<string, number>;
  byStatus: Record<string, number>;
  pullErrors: number;
  shadowPublished: number;
  shadowSkipped: number;
}

export class PipelineService {
  readonly stats: PipelineStats = { unsettled: {}, maxUnsettled: {}, settled: 0, byAction: {}, byStatus: {}, pullErrors: 0, shadowPublished: 0, shadowSkipped: 0 };
  private readonly settledSubject = new Subject<Settled>();
  private readonly drainSignal = new Subject<void>();
  private readonly drained = new Subject<void>();
  private subscription: Subscription | undefined;
  private stopping: Promise<void> | undefined;

  private constructor(
    readonly config: SluiceConfig,
    readonly nc: NatsConnection,
    private readonly ownsConnection: boolean,
    readonly js: JetStreamClient,
    readonly jsm: JetStreamManager,
    readonly registry: ModelRegistry,
    readonly pool: WorkerPool,
    readonly directory: WorkerDirectory,
    private readonly log: PipelineLogger,
    readonly tracing: Tracing,
    private readonly ownsTracing: boolean,
    readonly metrics: PipelineMetrics,
    readonly tenants: TenantRegistry,
  ) {}

  /** Cancellations heard on `infer.cancel.*.*`. */
  readonly cancels = new CancelRegistry();

  /** Bodies beyond the threshold through the object store (created when the pipeline runs). */
  payloads: PipelineClaimCheck | undefined;

  /** The `/metrics` server, when one runs. */
  metricsServer: MetricsServer | undefined;
  private running = false;

  /** Pulling and connected: what `/readyz` answers. */
  get ready(): boolean {
    return this.running && !this.nc.isClosed() && this.stopping === undefined;
  }

  /** Every settled outcome (for tests, metrics and the CLI). */
  get settled$(): Observable<Settled> {
    return this.settledSubject.asObservable();
  }

  static async start(config: SluiceConfig, opts: PipelineStartOptions = {}): Promise<PipelineService> {
    const log = opts.logger ?? consoleLogger;
    const t = config.telemetry;
    const tracing =
      opts.tracing ??
      startTracing({
        serviceName: t.serviceName || SERVICE_PIPELINE,
        ...(t.tracesEndpoint ? { tracesEndpoint: t.tracesEndpoint } : {}),
        onWarning: (m) => log.warn(`tracing: ${m}`),
      });
    const metrics = new PipelineMetrics({ priorities: config.pipeline.priorities });
    metrics.trackTracing(() => tracing.stats());
    const nc =
      opts.nc ??
      (await connectNats(config.servers, "sluice-pipeline"));
    try {
      const jsm = await jetstreamManager(nc);
      await ensureStreams(jsm, config.streams);
      // One durable consumer per priority: the discovery consumers of the tenant lanes, or the
      // work consumers themselves when lanes are off.
      if (config.pipeline.tenantLanes) await ensureDiscoveryConsumers(jsm, config.consumer, config.pipeline.priorities);
      else await ensureConsumers(jsm, config.consumer, config.pipeline.priorities);
      const registry = await ModelRegistry.open(nc, {
        replicas: config.streams.replicas,
        seed: config.models,
        timeoutMs: config.pipeline.defaultTimeoutMs,
        onInvalid: (key, err) => log.warn(`registry: ignoring invalid value of '${key}': ${err.message}`),
      });
      const pool = new WorkerPool({
        batchesPerWorker: config.pipeline.batchesPerWorker,
        timeoutMs: (model) => registry.table.timeoutMs(model),
        connect: opts.connectWorker ?? ((endpoint) => new WorkerClient(endpoint)),
        healthIntervalMs: config.pipeline.healthIntervalMs,
        tracing,
        onBatch: (b) => metrics.batchDispatched(b),
        onEvent: (e) => {
          if (e.type === "unhealthy" || e.type === "ejected" || e.type === "retry-budget-exhausted") log.warn(`worker pool: ${JSON.stringify(e)}`);
          else if (e.type !== "retry") log.info(`worker pool: ${JSON.stringify(e)}`);
        },
      });
      for (const w of config.workers) pool.add(w.model, w.version, w.endpoint, w.capacity);
      const directory = await WorkerDirectory.start(nc, pool, {
        ttlMs: config.pipeline.workerTtlMs,
        replicas: config.streams.replicas,
        onInvalid: (key, why) => log.warn(`worker registry: ignoring '${key}': ${why}`),
      });
      const tenants = await TenantRegistry.open(nc, {
        replicas: config.streams.replicas,
        seed: config.tenants,
        onInvalid: (key, err) => log.warn(`tenant registry: ignoring '${key}': ${err.message}`),
      });
      const svc = new PipelineService(config, nc, opts.nc === undefined, jetstream(nc), jsm, registry, pool, directory, log, tracing, opts.tracing === undefined, metrics, tenants);
      await svc.run();
      if (t.metricsPort >= 0) {
        try {
          svc.metricsServer = await MetricsServer.start({ port: t.metricsPort, host: t.metricsHost, metrics, ready: () => svc.ready });
          log.info(`metrics on http://${t.metricsHost}:${svc.metricsServer.port}/metrics`);
        } catch (err) {
          // Telemetry never stops the pipeline: serve without the endpoint and say so.
          log.warn(`metrics endpoint not started: ${(err as Error).message}`);
        }
      }
      return svc;
    } catch (err) {
      if (!opts.nc) await nc.close().catch(() => undefined);
      if (!opts.tracing) await tracing.shutdown();
      throw err;
    }
  }

  private async run(): Promise<void> {
    const { pipeline: p, consumer: c } = this.config;
    this.cancels.listen(this.nc);
    this.pool.signalFor = (job) => this.cancels.track(job.tenant, job.id);
    const classes: PriorityClass[] = [];
    const termReason = honoursTermReason(this.nc.info?.version);
    for (const priority of p.priorities) {
      this.stats.unsettled[priority] = 0;
      this.stats.maxUnsettled[priority] = 0;
      if (p.tenantLanes) continue;
      const consumer = await this.js.consumers.get(STREAM_REQUESTS, durableName(c, priority));
      classes.push({ name: priority, source: new ConsumerPullSource(consumer, { termReason }), weight: p.priorityWeights[priority] ?? 1 });
    }
    const onPullError = (priority: Priority, err: unknown): void => {
      this.stats.pullErrors++;
      this.metrics.pullFailed(priority);
      this.log.warn(`pull (${priority}) failed: ${(err as Error)?.message ?? err}`);
    };
    const workingIntervalMs = Math.max(100, Math.floor(c.ackWaitMs / 3));
    const source$ = p.tenantLanes
      ? tenantLaneSource({
          js: this.js,
          jsm: this.jsm,
          termReason,
          consumer: c,
          priorities: p.priorities,
          weights: p.priorityWeights,
          maxUnsettled: p.maxInFlight,
          expiresMs: p.pullExpiresMs,
          workingIntervalMs,
          onPullError,
          onUnsettledChange: (priority, n) => this.noteUnsettled(priority, n),
          drain: this.drainSignal,
        })
      : pullByPriority(classes, {
          maxUnsettled: p.maxInFlight,
          expiresMs: p.pullExpiresMs,
          workingIntervalMs,
          onPullError: (priority, err) => onPullError(priority as Priority, err),
          onUnsettledChange: (priority, n) => this.noteUnsettled(priority as Priority, n),
          drain: this.drainSignal,
        });
    const { pipeline: pp } = this.config;
    const payloads = new PipelineClaimCheck({
      js: this.js,
      jsm: this.jsm,
      maxPayload: () => this.nc.info?.max_payload,
      settings: this.config.payloads,
      streams: this.config.streams,
      maxDeliver: c.maxDeliver,
      retryDelayMs: (n) => Math.min(pp.retryMaxMs, pp.retryBaseMs * 2 ** Math.max(0, n - 1)),
      onSweepError: (err) => this.log.warn(`payload sweep failed: ${(err as Error)?.message ?? err}`),
    });
    this.payloads = payloads;
    payloads.start();
    const settled$ = source$.pipe(
      inferencePipeline({
        table: this.registry.table,
        dispatcher: this.pool,
        sink: new StreamResultSink(this.js, this.jsm, this.tracing, payloads.results),
        tracing: this.tracing,
        resolveBodies: payloads.resolveBodies(),
        generator: this.pool,
        publishChunk: (job, c) => {
          this.nc.publish(subjects.tokens(job.tenant, job.id), JSON.stringify({ id: job.id, seq: c.seq, text: c.text }));
        },
        isCancelled: (tenant, id) => this.cancels.isCancelled(tenant, id),
        tenantLimits: this.tenants.limiter,
        tenantMaxWaitMs: pp.tenantMaxWaitMs,
        shadow: { maxInFlight: pp.maxInFlight, publish: (o) => this.publishShadow(o), onSkipped: () => this.stats.shadowSkipped++ },
        maxPayloadBytes: pp.maxPayloadBytes,
        maxDeliver: c.maxDeliver,
        publishConcurrency: pp.publishConcurrency,
        publishRetryMs: pp.publishRetryMs,
        retryBaseMs: pp.retryBaseMs,
        retryMaxMs: pp.retryMaxMs,
      }),
      tap((s) => this.noteSettled(s)),
    );
    this.subscription = settled$.subscribe({
      error: (err: unknown) => this.log.error(`pipeline stopped on an error: ${(err as Error)?.stack ?? err}`),
      complete: () => this.drained.next(),
    });
    // Backlog per priority: the work consumers' pending and ack-pending (the tenant lanes' sums).
    this.metrics.onCollect(async () => {
      this.metrics.setWorkers(this.pool.snapshot());
      const sums = new Map<Priority, { pending: number; ackPending: number }>(p.priorities.map((pr) => [pr, { pending: 0, ackPending: 0 }]));
      for await (const ci of this.jsm.consumers.list(STREAM_REQUESTS)) {
        for (const pr of p.priorities) {
          const mine = p.tenantLanes ? ci.name.startsWith(`${c.durablePrefix}-${pr}-t-`) : ci.name === durableName(c, pr);
          if (!mine) continue;
          const sum = sums.get(pr)!;
          sum.pending += ci.num_pending;
          sum.ackPending += ci.num_ack_pending;
        }
      }
      for (const [pr, sum] of sums) this.metrics.setConsumerState(pr, sum.pending, sum.ackPending);
    });
    this.running = true;
    this.log.info(
      `pipeline consuming ${p.priorities.join(", ")} (${p.tenantLanes ? "a lane per tenant" : "one consumer per priority"}; at most ${p.maxInFlight} in flight)`,
    );
  }

  /** Publishes a shadow copy's result for comparison; never fails the pipeline. */
  private async publishShadow(o: Outcome): Promise<void> {
    if (o.kind === "dead") return;
    const result: InferResult = o.kind === "result" ? o.result : o.lastResort;
    try {
      this.nc.publish(subjects.shadow(o.job.tenant, o.job.id), JSON.stringify({ ...result, version: o.job.version }));
      this.stats.shadowPublished++;
    } catch {
      // shadow results are best effort
    } finally {
      o.job.delivery.ack();
    }
  }

  private noteUnsettled(priority: Priority, n: number): void {
    this.metrics.setInflight(priority, n);
    this.stats.unsettled[priority] = n;
    if (n > (this.stats.maxUnsettled[priority] ?? 0)) this.stats.maxUnsettled[priority] = n;
  }

  private noteSettled(s: Settled): void {
    this.metrics.settled(s);
    this.stats.settled++;
    this.stats.byAction[s.action] = (this.stats.byAction[s.action] ?? 0) + 1;
    const status = s.result ? (s.result.status === "ok" ? "ok" : (s.result.error?.code ?? "INTERNAL")) : s.action;
    this.stats.byStatus[status] = (this.stats.byStatus[status] ?? 0) + 1;
    if (s.error !== undefined) this.log.warn(`publish failed, request will be redelivered: ${(s.error as Error)?.message ?? s.error}`);
    if (s.notStored) this.log.warn(`a result reached its client but could not be stored; its request is in the dead-letter stream`);
    this.settledSubject.next(s);
  }

  /**
   * Stops pulling, lets what is in flight finish for up to `graceMs`, then closes everything.
   * Unsettled requests are redelivered to another pipeline process. Safe to call twice.
   */
  stop(graceMs = 5_000): Promise<void> {
    this.stopping ??= (async () => {
      // Stop pulling; the sources complete once what they delivered is settled.
      const done = new Promise<void>((resolve) => {
        const t = setTimeout(resolve, graceMs);
        t.unref();
        this.drained.subscribe({ next: () => (clearTimeout(t), resolve()), complete: () => resolve() });
      });
      this.drainSignal.next();
      await done;
      this.subscription?.unsubscribe();
      this.settledSubject.complete();
      this.running = false;
      await this.metricsServer?.stop();
      this.cancels.stop();
      await this.payloads?.stop();
      await this.registry.stop();
      await this.tenants.stop();
      await this.directory.stop();
      await this.pool.stop();
      if (this.ownsTracing) await this.tracing.shutdown();
      if (this.ownsConnection) await this.nc.drain().catch(() => undefined);
    })();
    return this.stopping;
  }
}
