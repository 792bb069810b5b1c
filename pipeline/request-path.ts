/**
 * The inference pipeline as one operator, from deliveries to settled outcomes: the same code
 * serves live traffic (`PipelineService`) and replays.
 *
 * ```
 * deliveries ─ decode ─ answered before? ─ admit (deadline) ─ route ─ give up? ─ cached? ─ shadow copies ─ batch ─ dispatch ─ store in cache ─┬─ settle ─▶ Settled
 *                                                                                                                    └─ shadow results
 * ```
 */
import { connect, filter, map, merge, mergeMap, pipe, share, tap, type Observable, type OperatorFunction } from "rxjs";
import { admitByDeadline } from "../operators/admit-by-deadline.js";
import { answerFromCache, type CachedAnswers } from "../operators/answer-from-cache.js";
import { batchByModelVersion } from "../operators/batch-by-model-version.js";
import { decodeRequest } from "../operators/decode-request.js";
import { dispatchBatch, type BatchDispatcher } from "../operators/dispatch-batch.js";
import { generateEach, type Chunk, type Generator } from "../operators/generate-each.js";
import { onJobs } from "../operators/on-jobs.js";
import { isOutcome } from "../operators/outcome.js";
import { admitByTenantLimits, DEFAULT_TENANT_MAX_WAIT_MS } from "../operators/admit-by-tenant-limits.js";
import { routeToVersion, type RouteDecision } from "../operators/route-to-version.js";
import { settleOutcomes, type ResultSink, type Settled } from "../operators/settle-outcome.js";
import { skipAnswered } from "../operators/skip-answered.js";
import { storeInCache, type AnswerStore } from "../operators/store-in-cache.js";
import { errorResult, type Delivery, type InferJob, type Outcome, type RoutedJob } from "../operators/types.js";
import { withShadowCopies } from "../operators/with-shadow-copies.js";
import type { ModelTable } from "./routing/registry.js";
import type { Tracing } from "./telemetry/types.js";
import type { TenantLimiter } from "./routing/tenant-limits.js";
import type { TokenFairShare } from "./intake/token-fair-share.js";
import { estimateTokens } from "./intake/token-cost.js";

export interface Dispatcher extends BatchDispatcher {
  hasIdleCapacity(key: string): boolean;
  readonly capacityFreed$: Observable<string>;
}

export interface PipelineSteps {
  table: ModelTable;
  dispatcher: Dispatcher;
  sink: ResultSink;
  /** Generations (streamed requests, generative models); without it they are batched too. */
  generator?: Generator;
  /** Publishes a chunk of a streamed request on `infer.tok.<tenant>.<id>`. */
  publishChunk?: (job: RoutedJob, chunk: Chunk) => Promise<void> | void;
  /** Generation timings (time to first token, time per output token); none when omitted. Must not throw. */
  generations?: { chunkPublished(job: RoutedJob): void; generationSettled(s: Settled): void };
  /** Per-tenant rate, token and concurrency limits. */
  tenantLimits?: TenantLimiter;
  tenantMaxWaitMs?: number;
  /** Cancelled requests are answered CANCELLED wherever they are. */
  isCancelled?: (tenant: string, id: string) => boolean;
  /** Version choice; the registry's (pinned, else weighted) by default. */
  route?: (job: InferJob) => RouteDecision;
  /** Shadow traffic; off when omitted. */
  shadow?: {
    maxInFlight: number;
    /** Publishes a shadow copy's outcome; must not reject. */
    publish: (o: Outcome) => Promise<void>;
    onSkipped?: () => void;
  };
  /** The result cache: deterministic requests of models with `cache` answered without a worker. Off when omitted. */
  cache?: CachedAnswers<RoutedJob> & AnswerStore;
  /** Token-weighted fair share: hears each admitted request (charged) and each settled one (corrected). */
  fairShare?: Pick<TokenFairShare, "admitted" | "settled">;
  /** Request spans: started after decoding, ended when settled. */
  tracing?: Tracing;
  /** Runs before decoding: reads bodies held in the object store (claim check); none when omitted. */
  resolveBodies?: OperatorFunction<Delivery, Delivery>;
  maxPayloadBytes: number;
  maxDeliver: number;
  publishConcurrency: number;
  /** How long a failed result publish is tried again in place (settleOutcomes' publishRetryMs); 0 when omitted. */
  publishRetryMs?: number;
  retryBaseMs: number;
  retryMaxMs: number;
}

export function inferencePipeline(steps: PipelineSteps): OperatorFunction<Delivery, Settled> {
  const { table } = steps;
  const route = steps.route ?? ((job: InferJob) => table.resolve(job.model, job.pinnedVersion, job.id));
  const generator = steps.generator;
  const generative = (job: RoutedJob): boolean => generator !== undefined && (job.stream || table.get(job.model)?.generate === true);
  const isCancelled = (job: InferJob): boolean => steps.isCancelled?.(job.tenant, job.id) === true;
  const shadowStep: OperatorFunction<RoutedJob, RoutedJob> = steps.shadow
    ? withShadowCopies({
        shadowVersionOf: (job) => table.get(job.model)?.shadow,
        maxInFlight: steps.shadow.maxInFlight,
        ...(steps.shadow.onSkipped ? { onSkipped: steps.shadow.onSkipped } : {}),
      })
    : (x) => x;
  // A chunk of a streamed request goes to its client; any generation's chunk (shadow copies
  // aside) is timed once it is out.
  const publishChunk = (job: RoutedJob, c: Chunk): Promise<void> | void => {
    if (job.shadow) return;
    const sent = job.stream ? steps.publishChunk?.(job, c) : undefined;
    const g = steps.generations;
    if (!g) return sent;
    if (sent instanceof Promise) return sent.then(() => g.chunkPublished(job));
    g.chunkPublished(job);
  };
  return (deliveries) => {
    // (Two pipes: RxJS types at most nine operators in one.)
    const admitted$ = deliveries.pipe(
      steps.resolveBodies ?? ((x: Observable<Delivery>) => x),
      decodeRequest({ maxPayloadBytes: steps.maxPayloadBytes }),
      tap((d) => {
        const t = steps.tracing;
        if (!t) return;
        if (d.ok) t.startRequest(d.job.delivery, d.job);
        else if (d.outcome.kind === "dead") t.startRequest(d.outcome.delivery);
        else t.startRequest(d.outcome.job.delivery, d.outcome.job);
      }),
      map((d): InferJob | Outcome => (d.ok ? d.job : d.outcome)),
      tap((x) => {
        if (!isOutcome(x)) steps.fairShare?.admitted(x);
      }),
    );
    const storedResult = steps.sink.storedResult?.bind(steps.sink);
    const routed$ = admitted$.pipe(
      // A redelivered request answered before (a crash, a lost ack) is not run again.
      onJobs(storedResult ? skipAnswered(storedResult) : (x: Observable<InferJob>) => x),
      onJobs(map((job: InferJob) => (isCancelled(job) ? cancelledOutcome(job) : job))),
      onJobs(admitByDeadline()),
      onJobs(steps.tenantLimits ? admitByTenantLimits(steps.tenantLimits, { maxWaitMs: steps.tenantMaxWaitMs ?? DEFAULT_TENANT_MAX_WAIT_MS }) : (x: Observable<InferJob>) => x),
      onJobs(routeToVersion(route)),
      onJobs(tap((job: RoutedJob) => steps.tracing?.requestOf(job.delivery)?.setJob(job))),
      onJobs(map((job: RoutedJob) => giveUpAfter(job, steps.maxDeliver, table.timeoutMs(job.model)))),
      onJobs(steps.cache ? answerFromCache(steps.cache) : (x: Observable<RoutedJob>) => x),
    );
    const outcomes$ = routed$.pipe(
      onJobs<RoutedJob, Outcome>(
        pipe(
          shadowStep,
          connect((routed: Observable<RoutedJob>) =>
            merge(
              routed.pipe(
                filter((job) => !generative(job)),
                batchByModelVersion({
                  settings: (key) => table.batchSettings(key.slice(0, key.indexOf("@"))),
                  hasIdleCapacity: (key) => steps.dispatcher.hasIdleCapacity(key),
                  capacityFreed$: steps.dispatcher.capacityFreed$,
                  holdWhileBusy: true,
                  // Shares counted in tokens: a batch's places go by tokens too, so what the
                  // intake admitted evenly by tokens reaches the device evenly.
                  ...(steps.fairShare ? { cost: jobTokens } : {}),
                }),
                dispatchBatch(steps.dispatcher, {
                  retryBaseMs: steps.retryBaseMs,
                  retryMaxMs: steps.retryMaxMs,
                  waitForWorkerMs: (model) => table.timeoutMs(model),
                  isCancelled,
                }),
              ),
              routed.pipe(
                filter(generative),
                generateEach(generator ?? noGenerator, {
                  retryBaseMs: steps.retryBaseMs,
                  retryMaxMs: steps.retryMaxMs,
                  waitForWorkerMs: (model) => table.timeoutMs(model),
                  publishChunk: (job, c) => publishChunk(job, c),
                }),
              ),
            ),
          ),
        ),
      ),
      steps.cache ? storeInCache(steps.cache) : (x: Observable<Outcome>) => x,
      share(),
    );
    const settled$ = outcomes$.pipe(
      filter((o) => o.kind === "dead" || o.job.shadow !== true),
      settleOutcomes(steps.sink, {
        maxDeliver: steps.maxDeliver,
        concurrency: steps.publishConcurrency,
        publishRetryMs: steps.publishRetryMs ?? 0,
        retryBaseMs: steps.retryBaseMs,
        retryMaxMs: steps.retryMaxMs,
      }),
      tap((s) => {
        steps.tracing?.settle(s);
        steps.tenantLimits?.releasedOutcome(s.outcome);
        steps.fairShare?.settled(s);
        steps.generations?.generationSettled(s);
      }),
    );
    const shadow = steps.shadow;
    if (!shadow) return settled$;
    const shadow$ = outcomes$.pipe(
      filter((o) => o.kind !== "dead" && o.job.shadow === true),
      mergeMap((o) => shadow.publish(o), steps.publishConcurrency),
      filter((): false => false),
    );
    return merge(settled$, shadow$) as Observable<Settled>;
  };
}

/**
 * A request delivered more often than allowed, long after it was published (twice the model's
 * timeout), is answered and dead-lettered instead of run again: a request that crashes the
 * pipeline each time must not loop forever. Requests waiting for a worker are naked on purpose
 * and stay younger than the model's timeout plus a retry delay, so they are not caught here.
 */
function giveUpAfter(job: RoutedJob, maxDeliver: number, timeoutMs: number): RoutedJob | Outcome {
  if (job.delivery.deliveryCount <= maxDeliver || Date.now() - job.delivery.storedAtMs < 2 * timeoutMs) return job;
  return {
    kind: "result",
    job,
    deadLetter: true,
    result: {
      id: job.id,
      status: "error",
      model: job.model,
      version: job.version,
      error: { code: "INTERNAL", message: `request was not completed after ${job.delivery.deliveryCount - 1} deliveries` },
    },
  };
}

function cancelledOutcome(job: InferJob): Outcome {
  return { kind: "result", job, result: errorResult(job, "CANCELLED", "cancelled by the client before it was served") };
}

/** Stands in when the pipeline has no generator (nothing is routed to it then). */
/** A job's estimated tokens, worked out once per delivery. */
const tokensOfDelivery = new WeakMap<Delivery, number>();
function jobTokens(job: RoutedJob): number {
  let n = tokensOfDelivery.get(job.delivery);
  if (n === undefined) tokensOfDelivery.set(job.delivery, (n = estimateTokens(job)));
  return n;
}

const noGenerator: Generator = { generate: () => Promise.reject(new Error("this pipeline runs no generations")) };
