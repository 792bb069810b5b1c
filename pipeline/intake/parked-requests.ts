/**
 * Requests the tenant lanes hold back, each with its credit, until a lane's stage settles
 * (pending, closing) or the quiet time after a reconnect is over. A held request keeps its tenant
 * active for the token fair share (it waits, as a backlog does).
 */
import type { CreditedDelivery } from "./credited-delivery.js";
import type { GateLane } from "./gate-options.js";
import type { LaneFairShare } from "./lane-options.js";

export interface ParkedRequest {
  readonly lane: GateLane;
  readonly d: CreditedDelivery;
  readonly tenant: string;
}

export class ParkedRequests {
  private readonly byKey = new Map<string, ParkedRequest[]>();

  constructor(private readonly fairShare: LaneFairShare | undefined) {}

  get size(): number {
    return this.byKey.size;
  }

  /** The keys requests are parked under. */
  keys(): string[] {
    return [...this.byKey.keys()];
  }

  /** Holds a request under `k` (a tenant's lane, or the quiet time). */
  park(k: string, r: ParkedRequest): void {
    this.fairShare?.hold(r.tenant);
    const list = this.byKey.get(k) ?? [];
    list.push(r);
    this.byKey.set(k, list);
  }

  /** Hands the requests parked under `k` to `decide` again (those not settled meanwhile). */
  unpark(k: string, decide: (lane: GateLane, d: CreditedDelivery) => void): void {
    const list = this.byKey.get(k);
    if (!list) return;
    this.byKey.delete(k);
    for (const { lane, d, tenant } of list) {
      if (!d.settled) decide(lane, d);
      this.fairShare?.release(tenant);
    }
  }

  /** Naks every parked request (the queue gives them to someone else at once). */
  nakAll(): void {
    for (const list of this.byKey.values())
      for (const { d, tenant } of list) {
        d.nak();
        this.fairShare?.release(tenant);
      }
    this.byKey.clear();
  }
}
