/**
 * Benchmark scenarios: a simulated device, the model's batch settings, and the load as one or
 * more phases. Every system runs the same phases against the same kind of worker.
 */
import type { Priority, Route, Schedule } from "./load.js";

/** The simulated device: one batch at a time, each costing `baseMs + perItemMs × size`. */
export interface Device {
  readonly baseMs: number;
  readonly perItemMs: number;
}

export interface BatchSettings {
  readonly maxSize: number;
  readonly maxDelayMs: number;
}

/** One measured stretch of load; one row of the results per system. */
export interface Phase {
  readonly label: string;
  /** Offered load, requests/s, for a rate-driven phase; null for a burst. */
  readonly offeredRps: number | null;
  readonly schedule: Schedule;
}

export interface PlanOptions {
  readonly quick: boolean;
  /** `--requests N`: the size of each burst. */
  readonly requests?: number;
}

export interface Plan {
  readonly phases: Phase[];
  /** A sweep: stop a system's remaining phases once it is far past its capacity. */
  readonly stopWhenSaturated: boolean;
}

/** What earlier scenarios of this run measured, for scenarios that decide what to run. */
export interface EarlierRow {
  readonly scenario: string;
  readonly system: string;
  readonly throughput_rps: number;
}

export interface Scenario {
  readonly name: string;
  readonly description: string;
  readonly device: Device;
  readonly batch: BatchSettings;
  /** The models the requests go to (each served by the one worker); [`bench`] when omitted. */
  readonly models?: readonly string[];
  /** Where request n goes; every request to the first model, no priority, when omitted. */
  readonly route?: (n: number) => Route;
  /** Requests come from many tenants (`route` names them): results are heard for every tenant. */
  readonly manyTenants?: boolean;
  /** After the phases: how long to measure the system and nats-server idle, ms (0: not measured). */
  readonly idleMeasureMs?: number;
  /** Not run with --quick. */
  readonly skipInQuick?: boolean;
  plan(o: PlanOptions): Plan;
  /** Why a system is left out of this scenario, or undefined to run it. */
  skipSystem?(system: string, plan: Plan, earlier: readonly EarlierRow[]): string | undefined;
}

/** Sends awaiting their acknowledgement at once, for every schedule. */
export const PUBLISH_WINDOW = 1_000;
const BATCH: BatchSettings = { maxSize: 32, maxDelayMs: 5 };
const ZERO_COST: Device = { baseMs: 0, perItemMs: 0 };
const GPU_SIM: Device = { baseMs: 8, perItemMs: 0.5 };

/** Highest rate the device can reach: full batches back to back, requests/s. */
export function deviceMaxRps(d: Device, maxBatch: number): number {
  const batchMs = d.baseMs + d.perItemMs * maxBatch;
  return batchMs > 0 ? (maxBatch / batchMs) * 1_000 : Number.POSITIVE_INFINITY;
}

/** Time the device takes for a batch of one request, ms. */
export function deviceSingleMs(d: Device): number {
  return d.baseMs + d.perItemMs;
}

const burst = (count: number): Phase => ({
  label: `burst ${count}`,
  offeredRps: null,
  schedule: { kind: "burst", count, window: PUBLISH_WINDOW },
});

const sustained = (rate: number, seconds: number): Phase => ({
  label: `${rate}/s for ${seconds}s`,
  offeredRps: rate,
  schedule: { kind: "sustained", rate, seconds, window: PUBLISH_WINDOW },
});

/** The model of the single-model scenarios. */
export const DEFAULT_MODEL = "bench";
export const MIXED_MODELS = ["chat", "summarize", "classify"] as const;
/** Priorities of ten consecutive requests of the mixed scenario: 10% high, 60% normal, 30% low. */
const MIXED_PRIORITIES: readonly Priority[] = ["normal", "low", "normal", "high", "normal", "low", "normal", "normal", "low", "normal"];

/** Request n of the mixed scenario: models in turn, priorities interleaved as they arrive from many clients. */
export function mixedRoute(n: number): Route {
  return { model: MIXED_MODELS[n % MIXED_MODELS.length]!, priority: MIXED_PRIORITIES[n % MIXED_PRIORITIES.length]! };
}

/** Tenants of the many-tenants scenario; each sends `MANY_TENANTS_EACH` requests. */
export const MANY_TENANTS = 5_000;
export const MANY_TENANTS_EACH = 2;
/** How long the many-tenants scenario watches the processes idle afterwards. */
export const IDLE_MEASURE_MS = 30_000;

/** Request n of the many-tenants scenario: tenants in turn, so each tenant's requests are far apart in the stream. */
export function manyTenantsRoute(n: number): Route {
  return { model: DEFAULT_MODEL, tenant: `t${n % MANY_TENANTS}` };
}

/** Longest a raw-loop run of burst-100k may be expected to take before it is left out, s. */
const RAW_BURST_BUDGET_S = 90;

export const SCENARIOS: readonly Scenario[] = [
  {
    name: "zero-cost",
    description: "worker costs nothing: the overhead of the path itself (queue, pipeline, gRPC, result publish); one burst",
    device: ZERO_COST,
    batch: BATCH,
    plan: (o) => ({ phases: [burst(o.requests ?? (o.quick ? 5_000 : 20_000))], stopWhenSaturated: false }),
  },
  {
    name: "gpu-sim",
    description: `GPU-like device (${GPU_SIM.baseMs} ms + ${GPU_SIM.perItemMs} ms/item, batches of up to ${BATCH.maxSize}) saturated by a burst`,
    device: GPU_SIM,
    batch: BATCH,
    plan: (o) => ({ phases: [burst(o.requests ?? (o.quick ? 1_000 : 4_000))], stopWhenSaturated: false }),
  },
  {
    name: "mixed",
    description: `GPU-like device serving ${MIXED_MODELS.length} models, requests interleaved over them at priorities high (10%), normal (60%) and low (30%); one burst: how soon is high priority served?`,
    device: GPU_SIM,
    batch: BATCH,
    models: MIXED_MODELS,
    route: mixedRoute,
    plan: (o) => ({ phases: [burst(o.requests ?? (o.quick ? 1_500 : 3_000))], stopWhenSaturated: false }),
  },
  {
    name: "low-load",
    description: "GPU-like device at a trickle of 20 req/s: latency when idle against the device's own time for one request",
    device: GPU_SIM,
    batch: BATCH,
    plan: (o) => ({ phases: [sustained(20, o.quick ? 5 : 15)], stopWhenSaturated: false }),
  },
  {
    name: "load-sweep",
    description: "GPU-like device under rising steady load (step schedule); a system stops once far past its capacity (p99 over 5 s, or under half the offered rate served)",
    device: GPU_SIM,
    batch: BATCH,
    plan: (o) => ({
      phases: o.quick
        ? [100, 400, 1_200].map((r) => sustained(r, 2))
        : [100, 200, 400, 600, 800, 1_000, 1_200, 1_400].map((r) => sustained(r, 3)),
      stopWhenSaturated: true,
    }),
  },
  {
    name: "many-tenants",
    description: `${MANY_TENANTS} tenants x ${MANY_TENANTS_EACH} requests, zero-cost worker: rate against one tenant (zero-cost), consumers on INFER_REQ during and after, CPU of the system and nats-server idle afterwards`,
    device: ZERO_COST,
    batch: BATCH,
    route: manyTenantsRoute,
    manyTenants: true,
    idleMeasureMs: IDLE_MEASURE_MS,
    plan: (o) => ({ phases: [burst(o.requests ?? MANY_TENANTS * MANY_TENANTS_EACH)], stopWhenSaturated: false }),
    skipSystem: (system) => (system === "sluice" || system === "broker-echo" || system === "jetstream-raw" ? undefined : "NATS systems only (tenants are subject tokens)"),
  },
  {
    name: "burst-100k",
    description: "100,000 requests into an empty system, zero-cost worker: does memory stay flat while the backlog waits in JetStream?",
    device: ZERO_COST,
    batch: BATCH,
    skipInQuick: true,
    plan: (o) => ({ phases: [burst(o.requests ?? 100_000)], stopWhenSaturated: false }),
    skipSystem(system, plan, earlier) {
      if (system === "sluice") return undefined;
      const count = plan.phases[0]?.schedule.kind === "burst" ? plan.phases[0].schedule.count : 0;
      const zero = earlier.find((r) => r.scenario === "zero-cost" && r.system === system);
      if (!zero) return "its zero-cost throughput was not measured in this run (run zero-cost too to decide)";
      const estimateS = count / Math.max(1, zero.throughput_rps);
      if (estimateS > RAW_BURST_BUDGET_S) return `estimated ${estimateS.toFixed(0)} s at its zero-cost rate (budget ${RAW_BURST_BUDGET_S} s)`;
      return undefined;
    },
  },
];

/** Same bytes for every system: request n of a phase. */
export function requestBody(n: number): Uint8Array {
  return new TextEncoder().encode(JSON.stringify({ prompt: `bench request ${n}: write a haiku about queues`, parameters: { max_tokens: 16 } }));
}
