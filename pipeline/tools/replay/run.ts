/** The replay run: reads the selection, paces and injects it into the pipeline, and reports a verdict per request. */
import { nuid, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JsMsg } from "@nats-io/jetstream";
import { Subject } from "rxjs";
import type { RouteDecision } from "../../../operators/route-to-version.js";
import type { Settled } from "../../../operators/settle-outcome.js";
import type { Delivery, ErrorInfo, InferJob, InferResult } from "../../../operators/types.js";
import { H, VERSION_RE, replaySubjects } from "../../../proto/wire.js";
import { inferencePipeline } from "../../request-path.js";
import { defaultConfig } from "../../config.js";
import { silentLogger } from "../../support/logger.js";
import { openFleet } from "../../workers/fleet.js";
import { headerValue } from "../../support/headers.js";
import { ByteGate } from "../../payloads/byte-gate.js";
import { originalDelivery, resolveRequestBodies } from "../../payloads/resolve-requests.js";
import { PayloadStore } from "../../payloads/store.js";
import { DEFAULT_MAX_RERUNS, DEFAULT_PROGRESS_INTERVAL_MS, ReplayError, type ReplayItem, type ReplayOptions, type ReplayReport } from "./options.js";
import { countSelection, matcher, newTraceparent, readRequests, subjectParts, validateSelection, type ReadRange } from "./selection.js";
import { compareResults, viewOf } from "./compare.js";
import { ReplayDelivery, ReplayResultSink, recordOf, type ReplayRecord } from "./delivery.js";
import { pause, recordedResult, replayHeaders, warmUp, type Prepared } from "./prepare.js";

/** Recorded results looked up ahead of the request being injected (lookups overlap the pipeline). */
const LOOKAHEAD = 256;

/**
 * Replays a selection of recorded requests (see the module comment). Resolves with the report
 * once every selected request has a verdict; rejects with a ReplayError when it cannot start.
 * Uses `nc` and leaves it open.
 */
export async function replay(nc: NatsConnection, options: ReplayOptions): Promise<ReplayReport> {
  const s = options.selection;
  validateSelection(s);
  if (options.version !== undefined && !VERSION_RE.test(options.version)) {
    throw new ReplayError("INVALID_ARGUMENT", `version '${options.version}' must be 1-64 of A-Z a-z 0-9 . _ -`);
  }
  const session = options.session ?? nuid.next();
  const sink = new ReplayResultSink(nc, session);
  const config = options.config ?? defaultConfig();
  const pace = options.pace ?? { kind: "max" };
  if (pace.kind === "rate" && !(pace.perSecond > 0)) throw new ReplayError("INVALID_ARGUMENT", "pace must be above 0 per second");
  const maxReruns = Math.max(0, Math.floor(options.maxReruns ?? DEFAULT_MAX_RERUNS));
  const maxInFlight = Math.max(1, Math.floor(options.maxInFlight ?? config.pipeline.maxInFlight));
  const log = options.logger ?? silentLogger;
  const signal = options.signal;
  const started = Date.now();

  const counted = await countSelection(nc, s, options.onMatch);
  const report: ReplayReport = {
    session,
    selected: counted.count,
    firstSeq: counted.firstSeq,
    lastSeq: counted.lastSeq,
    done: 0,
    counts: { equal: 0, different: 0, missing: 0, error: 0 },
    reruns: 0,
    different: [],
    errors: [],
    version: options.version,
    pace,
    elapsedMs: 0,
    dryRun: options.dryRun === true,
    aborted: false,
  };
  try {
    options.onSelected?.(counted);
  } catch {
    // a listener's failure is its own
  }
  if (options.dryRun || counted.firstSeq === undefined || counted.lastSeq === undefined) {
    report.elapsedMs = Date.now() - started;
    return report;
  }
  const range: ReadRange = { fromSeq: counted.firstSeq, toSeq: counted.lastSeq };

  const js = jetstream(nc);
  const jsm = await jetstreamManager(nc);
  const payloadStore = new PayloadStore(js);
  // The same registry and worker directory as live, with a pool of its own: the replay reaches
  // the same workers, but its batches and breakers do not mix with live traffic.
  const fleet = await openFleet(nc, {
    config,
    log,
    logPrefix: "replay ",
    ...(options.table ? { table: options.table } : {}),
    ...(options.connectWorker ? { connectWorker: options.connectWorker } : {}),
  });
  const { table, pool, directory } = fleet;
  let progressTimer: NodeJS.Timeout | undefined;
  /** Requests waiting out a nak's delay before their re-run. */
  const reruns = new Map<NodeJS.Timeout, ReplayRecord>();
  let onAbort: (() => void) | undefined;
  try {
    await warmUp(nc, directory, config.pipeline.workerTtlMs);

    // Credits: a request holds one from its injection to its verdict, re-runs included.
    let inFlight = 0;
    let firstInjectedAt: number | undefined;
    let failure: { error: unknown } | undefined;
    const waiters = new Set<{ ready: () => boolean; resolve: () => void }>();
    const wake = (): void => {
      for (const w of waiters)
        if (w.ready()) {
          waiters.delete(w);
          w.resolve();
        }
    };
    const until = (ready: () => boolean): Promise<void> =>
      ready() ? Promise.resolve() : new Promise<void>((resolve) => waiters.add({ ready, resolve }));

    const progress = (finished: boolean): void => {
      const elapsedMs = Date.now() - started;
      // The rate counts from the first injection, not from the count and the start-up.
      const runningMs = firstInjectedAt !== undefined ? Date.now() - firstInjectedAt : 0;
      try {
        options.onProgress?.({
          session,
          selected: report.selected,
          done: report.done,
          inFlight,
          counts: { ...report.counts },
          reruns: report.reruns,
          elapsedMs,
          perSecond: runningMs > 0 ? Math.round((report.done / runningMs) * 10_000) / 10 : 0,
          finished,
        });
      } catch {
        // a listener's failure is its own
      }
    };
    if (options.onProgress) {
      progressTimer = setInterval(() => progress(false), options.progressIntervalMs ?? DEFAULT_PROGRESS_INTERVAL_MS);
      progressTimer.unref();
    }

    const idOf = (rec: ReplayRecord): string => rec.id ?? `#${rec.seq}`;
    const failed = (rec: ReplayRecord, code: ErrorInfo["code"], message: string, more: Partial<InferResult> = {}): InferResult => ({
      id: idOf(rec),
      ...(rec.model !== undefined ? { model: rec.model } : {}),
      ...more,
      status: "error",
      error: { code, message },
    });

    const finalize = (rec: ReplayRecord, replayed: InferResult): void => {
      const original = rec.recorded ? viewOf(rec.recorded) : undefined;
      const mine = viewOf(replayed);
      const cmp = compareResults(original, mine);
      const item: ReplayItem = {
        id: idOf(rec),
        seq: rec.seq,
        time: new Date(rec.originalStoredAtMs).toISOString(),
        tenant: rec.tenant ?? null,
        model: rec.model ?? null,
        original: original ?? null,
        replayed: mine,
        verdict: cmp.verdict,
        ...(cmp.similarity ? { similarity: cmp.similarity } : {}),
        ...(cmp.diff ? { diff: cmp.diff } : {}),
        original_traceparent: rec.originalTraceparent ?? null,
        traceparent: rec.traceparent,
        reruns: rec.reruns,
      };
      report.done++;
      report.counts[cmp.verdict]++;
      if (cmp.verdict === "different") report.different.push(item.id);
      if (cmp.verdict === "error") report.errors.push(item.id);
      try {
        options.onResult?.(item);
      } catch {
        // a listener's failure is its own
      }
      inFlight--;
      wake();
    };

    /** Re-runs still waiting for their delay when the replay is stopped end as errors. */
    const dropReruns = (): void => {
      for (const [t, rec] of reruns) {
        clearTimeout(t);
        finalize(rec, failed(rec, "CANCELLED", `the replay stopped before re-run ${rec.reruns}`));
      }
      reruns.clear();
    };
    if (signal) {
      onAbort = () => {
        dropReruns();
        wake();
      };
      signal.addEventListener("abort", onAbort, { once: true });
    }

    const deliveries = new Subject<Delivery>();

    /** What became of one settled attempt: a verdict, or a re-run after the nak's delay. */
    const onSettled = (st: Settled): void => {
      const o = st.outcome;
      const d = originalDelivery(o.kind === "dead" ? o.delivery : o.job.delivery);
      if (!(d instanceof ReplayDelivery)) return;
      const rec = d.record;
      if (st.action !== "nak") {
        if (st.result) return finalize(rec, st.result);
        if (rec.replayed) return finalize(rec, rec.replayed);
        const why: ErrorInfo = o.kind === "dead" ? o.error : { code: "INTERNAL", message: "settled without a result" };
        return finalize(rec, failed(rec, why.code, `dead-lettered: ${why.message}`));
      }
      if (rec.reruns < maxReruns && !signal?.aborted) {
        rec.reruns++;
        report.reruns++;
        const t = setTimeout(() => {
          reruns.delete(t);
          deliveries.next(new ReplayDelivery(rec, rec.reruns + 1));
        }, d.settlement?.delayMs ?? 0);
        reruns.set(t, rec);
        return;
      }
      const last: ErrorInfo =
        o.kind === "retry" && o.lastResort.error
          ? o.lastResort.error
          : { code: "UNAVAILABLE", message: st.error !== undefined ? `publishing the result failed: ${(st.error as Error)?.message ?? st.error}` : "retry asked" };
      const version = o.kind !== "dead" ? o.job.version : undefined;
      finalize(rec, failed(rec, last.code, `${last.message} (gave up after ${rec.reruns} re-run${rec.reruns === 1 ? "" : "s"})`, version ? { version } : {}));
    };

    const route = (job: InferJob): RouteDecision => {
      if (options.version !== undefined) return { ok: true, version: options.version };
      const v = recordOf(job.delivery)?.recorded?.version;
      if (v !== undefined && VERSION_RE.test(v)) return { ok: true, version: v };
      return table.resolve(job.model, job.pinnedVersion, job.id);
    };

    const pipelineDone = new Promise<void>((resolve) => {
      deliveries
        .pipe(
          inferencePipeline({
            table,
            dispatcher: pool,
            sink,
            route,
            // Streamed requests and generative models take the Generate path, as live; their
            // chunks go to the session's subjects.
            generator: pool,
            publishChunk: (job, c) => {
              nc.publish(replaySubjects.tokens(session, job.tenant, job.id), JSON.stringify({ id: job.id, seq: c.seq, text: c.text }));
            },
            maxPayloadBytes: config.pipeline.maxPayloadBytes,
            // Bodies held in the object store are read as live (never noted or written: read only).
            resolveBodies: resolveRequestBodies({
              read: (tenant, key, digest) => payloadStore.read(tenant, key, { maxBytes: config.payloads.maxObjectBytes, digest }),
              gate: new ByteGate(config.payloads.memoryBytes),
              maxDeliver: maxReruns + 1,
              retryDelayMs: () => config.pipeline.retryBaseMs,
            }),
            // The last allowed re-run ends in the pipeline's own last-resort answer.
            maxDeliver: maxReruns + 1,
            publishConcurrency: config.pipeline.publishConcurrency,
            retryBaseMs: config.pipeline.retryBaseMs,
            retryMaxMs: config.pipeline.retryMaxMs,
          }),
        )
        .subscribe({
          next: onSettled,
          error: (error: unknown) => {
            failure = { error };
            wake();
            resolve();
          },
          complete: () => resolve(),
        });
    });

    // Pacing: when each request may go, relative to the first one.
    let firstStoredAt: number | undefined;
    let pacedFrom = 0;
    let index = 0;
    const paceFor = async (storedAtMs: number): Promise<void> => {
      if (firstStoredAt === undefined) {
        firstStoredAt = storedAtMs;
        pacedFrom = Date.now();
      }
      const at =
        pace.kind === "original"
          ? pacedFrom + (storedAtMs - firstStoredAt)
          : pace.kind === "rate"
            ? pacedFrom + (index * 1000) / pace.perSecond
            : 0;
      index++;
      await pause(at - Date.now(), signal);
    };

    const stopped = (): boolean => signal?.aborted === true || failure !== undefined;
    const matches = matcher(s);
    const queue: Prepared[] = [];
    const prepare = (msg: JsMsg): void => {
      const parts = subjectParts(msg.subject);
      const p: Prepared = {
        msg,
        tenant: parts.tenant,
        model: parts.model,
        id: headerValue(msg.headers, H.msgId),
        recorded: undefined,
        ready: Promise.resolve(),
      };
      (p as { ready: Promise<void> }).ready = recordedResult(jsm, payloadStore, p.tenant, p.id).then(
        (r) => void (p.recorded = r),
        (err: unknown) => log.warn(`replay: cannot look up the recorded result of '${p.id}': ${(err as Error)?.message ?? err}`),
      );
      queue.push(p);
    };
    const injectNext = async (): Promise<void> => {
      const p = queue.shift()!;
      await p.ready;
      await paceFor(p.msg.info.timestampNanos / 1e6);
      await until(() => inFlight < maxInFlight || stopped());
      if (stopped()) return;
      const now = Date.now();
      const originalTraceparent = headerValue(p.msg.headers, H.traceparent);
      const traceparent = newTraceparent(originalTraceparent);
      const rec: ReplayRecord = {
        seq: p.msg.seq,
        subject: p.msg.subject,
        data: p.msg.data,
        headers: replayHeaders(p.msg, session, traceparent, now),
        id: p.id,
        tenant: p.tenant,
        model: p.model,
        originalStoredAtMs: p.msg.info.timestampNanos / 1e6,
        originalTraceparent,
        traceparent,
        recorded: p.recorded,
        injectedAtMs: now,
        reruns: 0,
        replayed: undefined,
      };
      inFlight++;
      firstInjectedAt ??= now;
      deliveries.next(new ReplayDelivery(rec, 1));
    };

    try {
      for await (const m of readRequests(js, s, range, false)) {
        if (stopped()) break;
        if (!matches(m)) continue;
        prepare(m);
        if (queue.length >= LOOKAHEAD) await injectNext();
      }
      while (queue.length > 0 && !stopped()) await injectNext();
    } finally {
      // Lookups still running are let finish (they only log), so nothing runs after the return.
      await Promise.all(queue.map((p) => p.ready));
      queue.length = 0;
    }
    if (signal?.aborted) dropReruns();
    await until(() => inFlight === 0 || failure !== undefined);
    deliveries.complete();
    await pipelineDone;
    if (failure !== undefined) throw failure.error;
    await nc.flush();
    report.aborted = signal?.aborted === true && report.done < report.selected;
    report.elapsedMs = Date.now() - started;
    progress(true);
    return report;
  } finally {
    if (onAbort) signal?.removeEventListener("abort", onAbort);
    if (progressTimer) clearInterval(progressTimer);
    for (const t of reruns.keys()) clearTimeout(t);
    await fleet.stop();
  }
}
