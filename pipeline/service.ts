/**
 * The pipeline: pulls requests from the durable consumer of each priority with bounded demand,
 * decodes and validates them, routes them to a model version, batches them per model@version,
 * dispatches each batch to a worker and publishes every result before acknowledging its request.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JetStreamClient, type JetStreamManager } from "@nats-io/jetstream";
import { Subject, tap, type Observable, type Subscription } from "rxjs";
import { creditGate } from "./intake/credit-gate.js";
import type { GateLane } from "./intake/gate-options.js";
import type { Settled } from "../operators/settle-outcome.js";
import type { InferResult, Outcome } from "../operators/types.js";
import { retryDelays } from "../operators/outcome.js";
import type { Priority } from "../proto/wire.js";
import { STREAM_REQUESTS, subjects } from "../proto/wire.js";
import { inferencePipeline } from "./request-path.js";
import { PipelineMetrics } from "./telemetry/metrics.js";
import { MetricsServer } from "./telemetry/metrics-server.js";
import { ModelBacklog } from "./telemetry/model-backlog.js";
import { SERVICE_PIPELINE, type Tracing } from "./telemetry/types.js";
import { startTracing } from "./telemetry/export.js";
import type { SluiceConfig } from "./config.js";
import { ConsumerPullSource, durableName, ensureConsumers, ensureStreams, honoursTermReason } from "./intake/jetstream.js";
import type { ModelRegistry } from "./routing/registry.js";
import { StreamResultSink } from "./settle/result-sink.js";
import { CancelRegistry } from "./routing/cancel.js";
import { laneIntake } from "./intake/lanes.js";
import { laneConsumerPrefix } from "./intake/lane-protocol.js";
import { TenantRegistry } from "./routing/tenant-registry.js";
import type { WorkerDirectory } from "./workers/directory.js";
import { openFleet } from "./workers/fleet.js";
import type { WorkerPool, WorkerConnection } from "./workers/mod.js";
import { consoleLogger, type PipelineLogger } from "./support/logger.js";
import { Teardowns } from "./support/teardown.js";
import { connectNats } from "./connection.js";
import { CacheMetrics } from "./cache/cache-metrics.js";
import { ResultCache } from "./cache/result-cache.js";
import { TokenFairShare } from "./intake/token-fair-share.js";
import { PipelineClaimCheck } from "./payloads/pipeline-claim-check.js";

export interface PipelineStartOptions {
  /** Tracing to use instead of starting one from the configuration (not shut down on stop). */
  tracing?: Tracing;
  /** Use this connection instead of opening one (it is not closed on stop). */
  nc?: NatsConnection;
  logger?: PipelineLogger;
  /** Opens worker connections; the gRPC client by default. */
  connectWorker?: (endpoint: string) => WorkerConnection;
}

/** What the service is made of, built by {@link PipelineService.start}. */
interface PipelineParts {
  config: SluiceConfig;
  nc: NatsConnection;
  js: JetStreamClient;
  jsm: JetStreamManager;
  registry: ModelRegistry;
  pool: WorkerPool;
  directory: WorkerDirectory;
  tracing: Tracing;
  metrics: PipelineMetrics;
  tenants: TenantRegistry;
  cache: ResultCache;
  log: PipelineLogger;
  teardowns: Teardowns;
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
  /** Requests pulled per model: splits the consumers' pending, counts what is in flight. */
  private readonly backlog = new ModelBacklog();
  private readonly drained = new Subject<void>();
  private subscription: Subscription | undefined;
  private stopping: Promise<void> | undefined;

  readonly config: SluiceConfig;
  readonly nc: NatsConnection;
  readonly js: JetStreamClient;
  readonly jsm: JetStreamManager;
  readonly registry: ModelRegistry;
  readonly pool: WorkerPool;
  readonly directory: WorkerDirectory;
  readonly tracing: Tracing;
  readonly metrics: PipelineMetrics;
  readonly tenants: TenantRegistry;
  /** The result cache (bucket `infer_cache`). */
  readonly cache: ResultCache;
  private readonly log: PipelineLogger;
  /** Undo what {@link start} started, last first; {@link stop} runs them after draining. */
  private readonly teardowns: Teardowns;

  private constructor(parts: PipelineParts) {
    this.config = parts.config;
    this.nc = parts.nc;
    this.js = parts.js;
    this.jsm = parts.jsm;
    this.registry = parts.registry;
    this.pool = parts.pool;
    this.directory = parts.directory;
    this.tracing = parts.tracing;
    this.metrics = parts.metrics;
    this.tenants = parts.tenants;
    this.cache = parts.cache;
    this.log = parts.log;
    this.teardowns = parts.teardowns;
  }

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

  /**
   * Connects (unless given a connection), creates the streams and consumers, opens the
   * registries and the worker pool, and starts pulling. When a step fails, everything the earlier
   * steps started is stopped again before the error is thrown.
   */
  static async start(config: SluiceConfig, opts: PipelineStartOptions = {}): Promise<PipelineService> {
    const log = opts.logger ?? consoleLogger;
    const t = config.telemetry;
    const teardowns = new Teardowns();
    try {
      const tracing =
        opts.tracing ??
        startTracing({
          serviceName: t.serviceName || SERVICE_PIPELINE,
          ...(t.tracesEndpoint ? { tracesEndpoint: t.tracesEndpoint } : {}),
          onWarning: (m) => log.warn(`tracing: ${m}`),
        });
      if (!opts.tracing) teardowns.add("tracing", () => tracing.shutdown());
      const metrics = new PipelineMetrics({ priorities: config.pipeline.priorities });
      metrics.trackTracing(() => tracing.stats());
      const nc = opts.nc ?? (await connectNats(config.servers, "sluice-pipeline"));
      if (!opts.nc) teardowns.add("connection", () => nc.drain().catch(() => nc.close()));
      const jsm = await jetstreamManager(nc);
      await ensureStreams(jsm, config.streams);
      // One shared durable consumer per priority (tenant lanes come and go beside them).
      await ensureConsumers(jsm, config.consumer, config.pipeline.priorities);
      const fleet = await openFleet(nc, {
        config,
        log,
        seedModels: true,
        logPoolInfo: true,
        tracing,
        onBatch: (b) => metrics.batchDispatched(b),
        ...(opts.connectWorker ? { connectWorker: opts.connectWorker } : {}),
      });
      teardowns.add("workers", () => fleet.stop());
      const tenants = await TenantRegistry.open(nc, {
        replicas: config.streams.replicas,
        seed: config.tenants,
        onInvalid: (key, err) => log.warn(`tenant registry: ignoring '${key}': ${err.message}`),
      });
      teardowns.add("tenant registry", () => tenants.stop());
      const cache = await ResultCache.open(nc, {
        table: fleet.registry!.table,
        replicas: config.streams.replicas,
        maxAgeMs: config.streams.cacheMaxAgeMs,
        maxBytes: config.streams.cacheMaxBytes,
        metrics: new CacheMetrics(metrics.registry),
      });
      const svc = new PipelineService({
        config,
        nc,
        js: jetstream(nc),
        jsm,
        registry: fleet.registry!,
        pool: fleet.pool,
        directory: fleet.directory,
        tracing,
        metrics,
        tenants,
        cache,
        log,
        teardowns,
      });
      await svc.run();
      if (t.metricsPort >= 0) {
        try {
          const server = await MetricsServer.start({ port: t.metricsPort, host: t.metricsHost, metrics, ready: () => svc.ready });
          svc.metricsServer = server;
          teardowns.add("metrics server", () => server.stop());
          log.info(`metrics on http://${t.metricsHost}:${server.port}/metrics`);
        } catch (err) {
          // Telemetry never stops the pipeline: serve without the endpoint and say so.
          log.warn(`metrics endpoint not started: ${(err as Error).message}`);
        }
      }
      return svc;
    } catch (err) {
      await teardowns.run().catch((e: unknown) => log.warn(`cleaning up a failed start: ${(e as Error)?.message ?? e}`));
      throw err;
    }
  }

  private async run(): Promise<void> {
    const { pipeline: p, consumer: c } = this.config;
    this.cancels.listen(this.nc);
    this.teardowns.add("cancel listener", () => this.cancels.stop());
    this.pool.signalFor = (job) => this.cancels.track(job.tenant, job.id);
    const lanes: GateLane[] = [];
    const termReason = honoursTermReason(this.nc.info?.version);
    for (const priority of p.priorities) {
      this.stats.unsettled[priority] = 0;
      this.stats.maxUnsettled[priority] = 0;
      const consumer = await this.js.consumers.get(STREAM_REQUESTS, durableName(c, priority));
      lanes.push({ key: priority, priority, source: new ConsumerPullSource(consumer, { termReason }) });
    }
    const onPullError = (priority: Priority, err: unknown): void => {
      this.stats.pullErrors++;
      this.metrics.pullFailed(priority);
      this.log.warn(`pull (${priority}) failed: ${(err as Error)?.message ?? err}`);
    };
    const workingIntervalMs = Math.max(100, Math.floor(c.ackWaitMs / 3));
    const fairShare = p.tenantLanes && p.fairShare === "tokens" ? new TokenFairShare() : undefined;
    const source$ = p.tenantLanes
      ? laneIntake({
          nc: this.nc,
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
          onHeldChange: (priority, subject, delta) => this.backlog.held(priority, subject, delta),
          drain: this.drainSignal,
          ...(fairShare ? { fairShare } : {}),
        })
      : creditGate({
          lanes,
          maxUnsettled: p.maxInFlight,
          weights: p.priorityWeights,
          expiresMs: p.pullExpiresMs,
          workingIntervalMs,
          onPullError: (lane, err) => onPullError(lane.priority, err),
          onUnsettledChange: (priority, n) => this.noteUnsettled(priority, n),
          onHeldChange: (priority, subject, delta) => this.backlog.held(priority, subject, delta),
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
      retryDelayMs: retryDelays({ retryBaseMs: pp.retryBaseMs, retryMaxMs: pp.retryMaxMs }),
      onSweepError: (err) => this.log.warn(`payload sweep failed: ${(err as Error)?.message ?? err}`),
    });
    this.payloads = payloads;
    payloads.start();
    this.teardowns.add("payload sweeper", () => payloads.stop());
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
        generations: this.metrics,
        isCancelled: (tenant, id) => this.cancels.isCancelled(tenant, id),
        tenantLimits: this.tenants.limiter,
        tenantMaxWaitMs: pp.tenantMaxWaitMs,
        cache: this.cache,
        ...(fairShare ? { fairShare } : {}),
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
    this.teardowns.add("request path", () => this.subscription?.unsubscribe());
    this.subscription = settled$.subscribe({
      error: (err: unknown) => this.log.error(`pipeline stopped on an error: ${(err as Error)?.stack ?? err}`),
      complete: () => this.drained.next(),
    });
    // Backlog per priority: the work consumers' pending and ack-pending (the tenant lanes' sums);
    // the pending split by model by this process's recent mix, and its exact in-flight per model.
    this.metrics.onCollect(async () => {
      this.metrics.setWorkers(this.pool.snapshot());
      const sums = new Map<Priority, { pending: number; ackPending: number }>(p.priorities.map((pr) => [pr, { pending: 0, ackPending: 0 }]));
      for await (const ci of this.jsm.consumers.list(STREAM_REQUESTS)) {
        for (const pr of p.priorities) {
          const mine = ci.name === durableName(c, pr) || ci.name.startsWith(laneConsumerPrefix(c.durablePrefix, pr));
          if (!mine) continue;
          const sum = sums.get(pr)!;
          sum.pending += ci.num_pending;
          sum.ackPending += ci.num_ack_pending;
        }
      }
      for (const [pr, sum] of sums) this.metrics.setConsumerState(pr, sum.pending, sum.ackPending, this.backlog.pendingByModel(pr, sum.pending));
      this.metrics.setModelInflight(this.backlog.inflightByModel());
    });
    this.running = true;
    this.log.info(
      `pipeline consuming ${p.priorities.join(", ")} (one consumer per priority${p.tenantLanes ? ", and a lane for a tenant while it floods" : ""}; at most ${p.maxInFlight} in flight)`,
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
      this.settledSubject.complete();
      this.running = false;
      // Every teardown runs, even when one fails (the first failure is thrown after all ran).
      await this.teardowns.run();
    })();
    return this.stopping;
  }
}
