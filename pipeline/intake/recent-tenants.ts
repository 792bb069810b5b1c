/**
 * The tenants a priority's shared consumer served lately: how many of the last `window` requests
 * each had (a flood is a tenant with more than half of them), and when each of the most recent
 * tenants was last served (whether a flood has peers that a lane would protect).
 */
import { PEERS_REMEMBERED } from "./lane-options.js";

export class RecentTenants {
  private readonly ring: string[] = [];
  private at = 0;
  private readonly count = new Map<string, number>();
  /** Last time served, oldest first (at most {@link PEERS_REMEMBERED} tenants). */
  private readonly lastSeen = new Map<string, number>();

  constructor(private readonly window: number) {}

  /** Whether `window` requests have been served yet. */
  get windowFull(): boolean {
    return this.ring.length >= this.window;
  }

  /** Notes a request of `tenant` served at `now`; returns the tenant's count in the window. */
  note(tenant: string, now: number): number {
    const out = this.ring[this.at];
    if (out !== undefined) this.count.set(out, (this.count.get(out) ?? 1) - 1);
    this.ring[this.at] = tenant;
    this.at = (this.at + 1) % this.window;
    const n = (this.count.get(tenant) ?? 0) + 1;
    this.count.set(tenant, n);
    this.lastSeen.delete(tenant);
    this.lastSeen.set(tenant, now);
    if (this.lastSeen.size > PEERS_REMEMBERED) this.lastSeen.delete(this.lastSeen.keys().next().value!);
    return n;
  }

  /** The tenants served within `withinMs` before `now`, the most recent first. */
  servedWithin(now: number, withinMs: number): string[] {
    const out: string[] = [];
    for (const [t, at] of [...this.lastSeen].reverse()) if (now - at <= withinMs) out.push(t);
    return out;
  }
}
