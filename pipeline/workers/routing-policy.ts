/**
 * Which worker takes a request: pure functions over what the pool knows of each candidate (the
 * calls it has in flight there, the last load the worker reported, the prompt blocks it holds).
 *
 * - `prefix`: the lowest cost, where cost = prompt tokens the worker would have to prefill (the
 *   prompt less its leading blocks held there) + `loadWeightTokens` x its load in requests, less
 *   `sessionBonusTokens` on the worker the request's session last went to. Load is bounded: a
 *   worker above `(1 + boundedLoadEpsilon)` x the mean load is passed over while another is below
 *   it, so a hot prefix spreads instead of piling onto one worker.
 * - `least-loaded`: the lowest load against capacity.
 * - `round-robin`: each in turn.
 * A worker that reports overload (KV cache full with requests waiting) is passed over while one
 * that does not is left.
 */

export const ROUTING_POLICIES = ["prefix", "least-loaded", "round-robin"] as const;
export type RoutingPolicyName = (typeof ROUTING_POLICIES)[number];

/** Load weight: one request of load costs as much as prefilling this many tokens. */
export const DEFAULT_LOAD_WEIGHT_TOKENS = 256;
/** Bounded load: a worker may carry up to (1 + this) x the mean load before others go first (2x: a
 * tighter bound breaks the prefix affinity too often at the small loads of a few sequences each). */
const DEFAULT_BOUNDED_LOAD_EPSILON = 1;
/** The session's worker is preferred by this many tokens of cost. */
const DEFAULT_SESSION_BONUS_TOKENS = 512;
/** KV usage at which a worker with requests waiting counts as overloaded. */
const OVERLOAD_KV_USAGE = 0.98;

/** The latest load a worker reported. */
export interface ReportedLoad {
  readonly waiting: number;
  readonly running: number;
  /** 0 to 1. */
  readonly kvUsage: number;
}

export interface Candidate {
  /** Requests the pool has in flight on the worker. */
  readonly inflight: number;
  readonly capacity: number;
  /** Its last load report, while fresh. */
  readonly reported?: ReportedLoad;
  /** Leading blocks of the prompt the worker holds (the router's index, corrected by reports). */
  readonly cachedBlocks: number;
  /** The request's session last went to this worker. */
  readonly sessionMatch: boolean;
  /** A stable number for the worker (e.g. a hash of its endpoint), to break ties the same way everywhere. */
  readonly tiebreak: number;
}

export interface RouteRequest {
  readonly promptTokens: number;
  readonly blockTokens: number;
  /** Counts the choices made for round-robin. */
  readonly turn: number;
}

export interface RoutingTunables {
  readonly loadWeightTokens?: number;
  readonly boundedLoadEpsilon?: number;
  readonly sessionBonusTokens?: number;
}

/** A worker's load in requests: what the pool has in flight there, or what it reports, the larger. */
export function loadOf(c: Candidate): number {
  const reported = c.reported ? c.reported.running + c.reported.waiting : 0;
  return Math.max(c.inflight, reported);
}

export function isOverloaded(c: Candidate): boolean {
  return c.reported !== undefined && c.reported.waiting > 0 && c.reported.kvUsage >= OVERLOAD_KV_USAGE;
}

/** Prompt tokens the worker would have to prefill. */
export function prefillTokens(c: Candidate, req: RouteRequest): number {
  return Math.max(0, req.promptTokens - c.cachedBlocks * req.blockTokens);
}

/** The cost of sending the request to `c` under the `prefix` policy (lower is better). */
export function prefixCost(c: Candidate, req: RouteRequest, t: RoutingTunables = {}): number {
  const bonus = c.sessionMatch ? (t.sessionBonusTokens ?? DEFAULT_SESSION_BONUS_TOKENS) : 0;
  return prefillTokens(c, req) + (t.loadWeightTokens ?? DEFAULT_LOAD_WEIGHT_TOKENS) * loadOf(c) - bonus;
}

/**
 * Indices of the candidates within the load bound: load + 1 <= ceil((1 + epsilon) x mean load
 * after this request). Never empty for a non-empty list (the least loaded is always within).
 */
export function withinLoadBound(candidates: readonly Candidate[], epsilon = DEFAULT_BOUNDED_LOAD_EPSILON): number[] {
  if (candidates.length === 0) return [];
  const loads = candidates.map(loadOf);
  const mean = (loads.reduce((a, b) => a + b, 0) + 1) / candidates.length;
  const bound = Math.ceil((1 + epsilon) * mean);
  const within = loads.flatMap((l, i) => (l + 1 <= bound ? [i] : []));
  if (within.length > 0) return within;
  const least = Math.min(...loads);
  return loads.flatMap((l, i) => (l === least ? [i] : []));
}

/** Chooses a candidate by `policy`; returns its index, or undefined for an empty list. */
export function chooseWorker(policy: RoutingPolicyName, candidates: readonly Candidate[], req: RouteRequest, t: RoutingTunables = {}): number | undefined {
  if (candidates.length === 0) return undefined;
  // Overloaded workers only when every one is.
  let pool = candidates.flatMap((c, i) => (isOverloaded(c) ? [] : [i]));
  if (pool.length === 0) pool = candidates.map((_, i) => i);
  if (policy === "round-robin") return pool[req.turn % pool.length];
  if (policy === "least-loaded") {
    return argmin(pool, (i) => loadOf(candidates[i]!) / Math.max(1, candidates[i]!.capacity), candidates);
  }
  const inPool = pool.map((i) => candidates[i]!);
  const bounded = withinLoadBound(inPool, t.boundedLoadEpsilon).map((j) => pool[j]!);
  return argmin(bounded, (i) => prefixCost(candidates[i]!, req, t), candidates);
}

/** The index of the lowest score; ties to the lower load, then the lower tiebreak. */
function argmin(indices: readonly number[], score: (i: number) => number, candidates: readonly Candidate[]): number | undefined {
  let best: number | undefined;
  let bestScore = Infinity;
  for (const i of indices) {
    const s = score(i);
    if (best === undefined || s < bestScore || (s === bestScore && tieBefore(candidates[i]!, candidates[best]!))) {
      best = i;
      bestScore = s;
    }
  }
  return best;
}

function tieBefore(a: Candidate, b: Candidate): boolean {
  const la = loadOf(a);
  const lb = loadOf(b);
  return la < lb || (la === lb && a.tiebreak < b.tiebreak);
}
