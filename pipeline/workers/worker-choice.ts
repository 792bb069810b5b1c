/**
 * Worker choice: the route facts of a request (its prompt's blocks, its session) and the choice
 * among free workers by the model's routing policy, noting where the prompt's blocks went.
 */
import type { RoutedJob } from "../../operators/types.js";
import { BLOCK_TOKENS, estimateTokens, prefixBlockHashes } from "../../proto/prefix-blocks.js";
import { stableHash } from "../routing/registry.js";
import { DEFAULT_LOAD_INTERVAL_MS, LOAD_REPORT_STALE_INTERVALS, type PoolWorker, type RouteOf, type WorkerPoolOptions } from "./pool-options.js";
import type { PrefixIndex } from "./prefix-index.js";
import { chooseWorker, type Candidate, type RoutingPolicyName } from "./routing-policy.js";

/** The policy used when none is configured, or its lookup fails. */
const DEFAULT_POLICY: RoutingPolicyName = "least-loaded";

export class WorkerChoice {
  /** Choices made per key, for round-robin. */
  private readonly turns = new Map<string, number>();

  constructor(
    private readonly opts: Pick<WorkerPoolOptions, "routing" | "loadIntervalMs" | "routingTunables">,
    private readonly prefixes: PrefixIndex,
  ) {}

  policyOf(model: string): RoutingPolicyName {
    try {
      return this.opts.routing?.(model) ?? DEFAULT_POLICY;
    } catch {
      return DEFAULT_POLICY;
    }
  }

  /** The route facts of a request: its prompt's blocks, its session. */
  routeOf(job: RoutedJob): RouteOf {
    const prompt = job.prompt ?? (job.inputs !== undefined ? JSON.stringify(job.inputs) : "");
    return {
      model: job.model,
      promptTokens: estimateTokens(prompt),
      hashes: this.policyOf(job.model) === "prefix" ? prefixBlockHashes(prompt) : [],
      ...(job.session !== undefined ? { session: job.session } : {}),
    };
  }

  /**
   * Chooses among `workers` (all usable and free) by the model's policy, and notes where the
   * prompt's blocks and session went.
   */
  choose<W extends PoolWorker>(key: string, workers: readonly W[], route: RouteOf): W | undefined {
    if (workers.length === 0) return undefined;
    const policy = this.policyOf(route.model);
    const now = Date.now();
    const stale = (this.opts.loadIntervalMs ?? DEFAULT_LOAD_INTERVAL_MS) * LOAD_REPORT_STALE_INTERVALS;
    const sessionWorker = route.session !== undefined ? this.prefixes.sessionWorker(route.session) : undefined;
    const salt = route.hashes[0] ?? "";
    const candidates: Candidate[] = workers.map((w) => {
      const fresh = w.report && now - w.report.atMs <= stale ? w.report.load : undefined;
      return {
        inflight: w.items,
        capacity: w.capacity,
        ...(fresh ? { reported: fresh } : {}),
        cachedBlocks: route.hashes.length > 0 ? this.prefixes.matched(w.endpoint, route.hashes) : 0,
        sessionMatch: sessionWorker === w.endpoint,
        tiebreak: stableHash(salt + w.endpoint),
      };
    });
    const turn = this.turns.get(key) ?? 0;
    this.turns.set(key, turn + 1);
    const i = chooseWorker(policy, candidates, { promptTokens: route.promptTokens, blockTokens: BLOCK_TOKENS, turn }, this.opts.routingTunables);
    const w = i === undefined ? undefined : workers[i];
    if (w && (route.hashes.length > 0 || route.session !== undefined)) this.prefixes.record(w.endpoint, route.hashes, route.session);
    return w;
  }
}
