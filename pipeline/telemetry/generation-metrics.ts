/**
 * The generation metrics: time to first token and time per output token, per model and version,
 * measured from the first token chunk of each generation in progress.
 */
import { Histogram, type Registry } from "prom-client";
import type { Settled } from "../../operators/settle-outcome.js";
import type { Delivery, RoutedJob } from "../../operators/types.js";

/** Stored (or pulled) to the first token chunk of a generation. */
const TTFT_SECONDS_BUCKETS: readonly number[] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
/** Mean time between output tokens of one generation. */
const TPOT_SECONDS_BUCKETS: readonly number[] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1];

/** The model and version labels (capped) of a generation. */
type ModelVersionLabels = (model: string, version: string | undefined) => { model: string; version: string };

export class GenerationMetrics {
  readonly ttftSeconds: Histogram<"model" | "version">;
  readonly tpotSeconds: Histogram<"model" | "version">;
  /** First-token time of each generation in progress (gone with its delivery). */
  private readonly firstTokenAt = new WeakMap<Delivery, number>();

  constructor(
    registers: Registry[],
    private readonly modelVersion: ModelVersionLabels,
  ) {
    this.ttftSeconds = new Histogram({
      name: "sluice_ttft_seconds",
      help: "Time to first token of a generation: from the request being stored (else pulled) to its first token chunk.",
      labelNames: ["model", "version"],
      buckets: [...TTFT_SECONDS_BUCKETS],
      registers,
    });
    this.tpotSeconds = new Histogram({
      name: "sluice_tpot_seconds",
      help: "Time per output token of a generation of more than one token: (result - first token) / (completion tokens - 1).",
      labelNames: ["model", "version"],
      buckets: [...TPOT_SECONDS_BUCKETS],
      registers,
    });
  }

  /**
   * A generation's chunk went out: the first one of its delivery is its time to first token.
   * Never throws.
   */
  chunkPublished(job: RoutedJob, nowMs: number = Date.now()): void {
    try {
      const d = job.delivery;
      if (this.firstTokenAt.has(d)) return;
      this.firstTokenAt.set(d, nowMs);
      const since = Number.isFinite(d.storedAtMs) && d.storedAtMs > 0 ? d.storedAtMs : d.pulledAtMs;
      if (!Number.isFinite(since)) return;
      this.ttftSeconds.observe(this.modelVersion(job.model, job.version), Math.max(0, nowMs - since) / 1000);
    } catch {
      // Telemetry never throws into the request path.
    }
  }

  /**
   * A request settled: when it was a generation that streamed its first token and ends in an
   * ok result of more than one completion token, its time per output token. Never throws.
   */
  generationSettled(s: Settled, nowMs: number = Date.now()): void {
    try {
      const o = s.outcome;
      if (o.kind === "dead") return;
      const first = this.firstTokenAt.get(o.job.delivery);
      if (first === undefined) return;
      this.firstTokenAt.delete(o.job.delivery);
      const r = s.result;
      const tokens = r?.usage?.completion_tokens;
      if (s.error !== undefined || r?.status !== "ok" || typeof tokens !== "number" || !(tokens > 1)) return;
      const tpot = (nowMs - first) / (tokens - 1);
      if (Number.isFinite(tpot)) this.tpotSeconds.observe(this.modelVersion(o.job.model, o.job.version ?? r.version), Math.max(0, tpot) / 1000);
    } catch {
      // Telemetry never throws into the request path.
    }
  }
}
