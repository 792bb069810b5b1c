/**
 * Prometheus counters of the result cache, registered in the pipeline's registry. Model labels
 * come from the registry (a request is looked up only once routed to a known model), so their
 * number is bounded by the models served.
 */
import { Counter, type Registry } from "prom-client";

/** What a lookup found: an answer, nothing (or an expired one), or an error (counted as a miss too). */
export type CacheLookupResult = "hit" | "miss" | "error";

export class CacheMetrics {
  readonly lookups: Counter<"model" | "result">;
  readonly stores: Counter<"model" | "status">;

  constructor(registry: Registry) {
    const registers = [registry];
    this.lookups = new Counter({
      name: "sluice_cache_lookups_total",
      help: "Result cache lookups, by model and result: hit (answered without a worker), miss, or error (a failed lookup, run as a miss).",
      labelNames: ["model", "result"],
      registers,
    });
    this.stores = new Counter({
      name: "sluice_cache_stores_total",
      help: "Answers written to the result cache, by model and status: ok or error (a failed write; the answer went out all the same).",
      labelNames: ["model", "status"],
      registers,
    });
  }

  lookup(model: string, result: CacheLookupResult): void {
    try {
      this.lookups.inc({ model, result });
    } catch {
      // telemetry never throws into the host
    }
  }

  stored(model: string, ok: boolean): void {
    try {
      this.stores.inc({ model, status: ok ? "ok" : "error" });
    } catch {
      // telemetry never throws into the host
    }
  }
}
