/**
 * The token-weighted fair share in the running pipeline: the intake asks it how to hand out
 * credits between tenants ({@link VirtualTokenCounter.allocate}); the request path tells it when
 * a request is admitted (charged its estimate) and when it is settled (corrected by the tokens it
 * used, or refunded when it goes back to the queue, to be charged again when redelivered).
 *
 * ```ts
 * const fair = new TokenFairShare();
 * laneIntake({ ..., fairShare: fair });                 // lanes get credits by token counters
 * decoded$.pipe(tap((job) => fair.admitted(job)));      // charge
 * settled$.pipe(tap((s) => fair.settled(s)));           // correct
 * ```
 *
 * A tenant is active (its counter is not raised when it asks again) while it has a request
 * admitted and not settled, a lane with a backlog, or a request held by the intake (see
 * {@link TokenFairShare.hold}): counts, never time, so a backlogged tenant stays active however
 * slow the machine is.
 */
import type { Settled } from "../../operators/settle-outcome.js";
import type { Delivery, InferJob } from "../../operators/types.js";
import { estimateTokens, usedTokens } from "./token-cost.js";
import { VirtualTokenCounter, type CreditClaim, type VirtualTokenCounterOptions } from "./virtual-token-counter.js";

export class TokenFairShare {
  readonly counter: VirtualTokenCounter;
  /** What each unsettled request was charged (gone with its delivery). */
  private readonly charged = new WeakMap<Delivery, { tenant: string; tokens: number }>();

  constructor(opts: VirtualTokenCounterOptions = {}) {
    this.counter = new VirtualTokenCounter(opts);
  }

  /** See {@link VirtualTokenCounter.expectedCost}. */
  expectedCost(tenant: string): number {
    return this.counter.expectedCost(tenant);
  }

  /** Tokens given to a tenant so far (see {@link VirtualTokenCounter.counter}). */
  tokensOf(tenant: string): number {
    return this.counter.counter(tenant);
  }

  /** See {@link VirtualTokenCounter.hold}: something of the tenant waits (a lane's backlog, a held request). */
  hold(tenant: string): void {
    this.counter.hold(tenant);
  }

  /** See {@link VirtualTokenCounter.release}. */
  release(tenant: string): void {
    this.counter.release(tenant);
  }

  /** See {@link VirtualTokenCounter.expectedCostExcept}. */
  expectedCostExcept(tenants: ReadonlySet<string>): number {
    return this.counter.expectedCostExcept(tenants);
  }

  /** See {@link VirtualTokenCounter.setActive}. */
  setActive(tenants: Iterable<string>): void {
    this.counter.setActive(tenants);
  }

  /** See {@link VirtualTokenCounter.allocate}. */
  allocate(claims: readonly CreditClaim[], credits: number): number[] {
    return this.counter.allocate(claims, credits);
  }

  /** A request entered the pipeline: its tenant is charged the estimate. Never throws. */
  admitted(job: InferJob): void {
    if (job.shadow === true || this.charged.has(job.delivery)) return;
    try {
      const tokens = estimateTokens(job);
      this.counter.hold(job.tenant);
      this.counter.charge(job.tenant, tokens);
      this.charged.set(job.delivery, { tenant: job.tenant, tokens });
    } catch {
      // fairness never stops a request
    }
  }

  /** A request was settled: its charge becomes what it used (nothing if it goes back to the queue). */
  settled(s: Settled): void {
    const d = s.outcome.kind === "dead" ? s.outcome.delivery : s.outcome.job.delivery;
    const c = this.charged.get(d);
    if (!c) return;
    this.charged.delete(d);
    const o = s.outcome;
    const ran = s.action !== "nak" && o.kind === "result" && o.alreadyStored !== true ? usedTokens(s.result ?? o.result) : 0;
    this.counter.correct(c.tenant, c.tokens, ran ?? c.tokens);
    this.counter.release(c.tenant);
  }
}
