/**
 * Token-weighted fair share between tenants, after the Virtual Token Counter (Sheng et al.,
 * "Fairness in Serving Large Language Models", OSDI 2024; AIBrix's `vtc-basic`).
 *
 * Each tenant has a counter of the device tokens it was given: a request adds its estimated
 * tokens when it is admitted (prompt plus `max_tokens`) and the estimate is corrected by the
 * tokens it really used when it ends. Credits go to the tenant with the lowest counter first, so
 * a tenant whose prompts are ten times longer gets a tenth of the requests, and the same share of
 * tokens. A tenant that comes back after being idle starts at the lowest counter of the tenants
 * with work, not below it: idle time is not saved up to be spent as a burst later.
 *
 * Pure: no clock, no I/O. The intake asks {@link VirtualTokenCounter.allocate} how to hand out
 * credits; the pipeline reports admissions and completions.
 *
 * ```ts
 * const vtc = new VirtualTokenCounter();
 * vtc.setActive(["a", "b"]);                                          // tenants with work
 * vtc.allocate([{ tenant: "a", want: 8 }, { tenant: "b", want: 8 }], 4); // [2, 2] at first
 * vtc.charge("a", 4_064);                                              // admitted: its estimate
 * vtc.correct("a", 4_064, 4_010);                                      // ended: what it used
 * ```
 */

/** A tenant asking for credits. */
export interface CreditClaim {
  readonly tenant: string;
  /** Most credits it can use now (its queued requests); 0: it has work but cannot take more now. */
  readonly want: number;
  /** Credits it holds that have not brought a request yet (their tokens are projected). */
  readonly outstanding?: number;
  /**
   * It has more work than its outstanding credits but cannot take credits now (one pull at a
   * time): while it is the lowest, nobody else is given credits either (they are not spent
   * ahead of its turn; it asks again once its pull is done).
   */
  readonly blocked?: boolean;
}

export interface VirtualTokenCounterOptions {
  /** Tokens a request is assumed to cost before a tenant's first one is seen. */
  defaultRequestTokens?: number;
  /** Weight of the newest request in a tenant's mean request cost (exponential moving average). */
  meanWeight?: number;
  /** Counters kept for tenants without work, at most; the lowest are dropped first. */
  maxIdleTenants?: number;
  /**
   * Credits a tenant whose requests have not been seen yet gets at once: its first requests
   * tell what they cost before it is given more (a tenant with huge prompts cannot take a large
   * share on its first allocation).
   */
  firstCredits?: number;
}

/** See {@link VirtualTokenCounterOptions.defaultRequestTokens}. */
export const DEFAULT_REQUEST_TOKENS = 256;
/** See {@link VirtualTokenCounterOptions.meanWeight}. */
const DEFAULT_MEAN_WEIGHT = 0.2;
/** See {@link VirtualTokenCounterOptions.maxIdleTenants}. */
const DEFAULT_MAX_IDLE_TENANTS = 10_000;
/** See {@link VirtualTokenCounterOptions.firstCredits}. */
const DEFAULT_FIRST_CREDITS = 2;

interface TenantCount {
  /** Tokens given (estimates, corrected as requests end). */
  tokens: number;
  /** Mean tokens of its recent requests; undefined before the first. */
  mean: number | undefined;
}

export class VirtualTokenCounter {
  private readonly counts = new Map<string, TenantCount>();
  /** Tenants with work at the last allocation. */
  private active = new Set<string>();
  /** What keeps each tenant active, for {@link hold} and {@link release}. */
  private readonly holds = new Map<string, number>();
  private readonly defaultTokens: number;
  private readonly meanWeight: number;
  private readonly maxIdle: number;
  private readonly firstCredits: number;
  /** Sum and number of the tenants' mean request costs (kept as they change: reads are O(1), not O(tenants)). */
  private meanSum = 0;
  private meanCount = 0;

  constructor(opts: VirtualTokenCounterOptions = {}) {
    this.defaultTokens = positive(opts.defaultRequestTokens ?? DEFAULT_REQUEST_TOKENS, "defaultRequestTokens");
    this.meanWeight = opts.meanWeight ?? DEFAULT_MEAN_WEIGHT;
    if (!(this.meanWeight > 0 && this.meanWeight <= 1)) throw new RangeError(`meanWeight must be in (0, 1], got ${this.meanWeight}`);
    this.maxIdle = opts.maxIdleTenants ?? DEFAULT_MAX_IDLE_TENANTS;
    this.firstCredits = Math.max(1, Math.floor(opts.firstCredits ?? DEFAULT_FIRST_CREDITS));
  }

  /** Tokens given to a tenant so far (0 for one never seen). */
  counter(tenant: string): number {
    return this.counts.get(tenant)?.tokens ?? 0;
  }

  /** What the next request of a tenant is expected to cost. */
  expectedCost(tenant: string): number {
    return this.counts.get(tenant)?.mean ?? this.meanOfAll() ?? this.defaultTokens;
  }

  /** What a request of a tenant not in `tenants` is expected to cost (the mean over the others). */
  expectedCostExcept(tenants: ReadonlySet<string>): number {
    // O(excepted tenants): the sum over all, less theirs.
    let sum = this.meanSum;
    let n = this.meanCount;
    for (const t of tenants) {
      const mean = this.counts.get(t)?.mean;
      if (mean === undefined) continue;
      sum -= mean;
      n--;
    }
    return n > 0 ? Math.max(0, sum / n) : (this.meanOfAll() ?? this.defaultTokens);
  }

  /** A request of `tenant` was admitted with this many estimated tokens. */
  charge(tenant: string, tokens: number): void {
    const t = Math.max(0, finite(tokens));
    const c = this.entry(tenant);
    c.tokens += t;
    const before = c.mean;
    c.mean = before === undefined ? t : before + this.meanWeight * (t - before);
    this.meanSum += c.mean - (before ?? 0);
    if (before === undefined) this.meanCount++;
  }

  /** A request charged `estimated` tokens ended having used `actual` (0: it never ran on a device). */
  correct(tenant: string, estimated: number, actual: number): void {
    const c = this.counts.get(tenant);
    if (!c) return;
    c.tokens = Math.max(0, c.tokens + Math.max(0, finite(actual)) - Math.max(0, finite(estimated)));
  }

  /**
   * Hands out `credits` among the claims (the credits of each, in the order of the claims), one at a time to the tenant whose counter, with the
   * tokens its outstanding and newly given credits are expected to bring, is lowest (ties: the
   * order of the claims), never more than a tenant wants, and no more than `firstCredits`
   * (outstanding ones included) to a tenant whose cost is not known yet. It stops early when the
   * lowest is a tenant that cannot take credits now (`blocked`, or waiting for its first
   * requests): credits are not spent ahead of its turn. Say first which tenants have work
   * ({@link setActive}).
   */
  allocate(claims: readonly CreditClaim[], credits: number): number[] {
    const given = claims.map(() => 0);
    const heap = new MinHeap<{ projected: number; cost: number; room: number; order: number; barrier: boolean }>((a, b) =>
      a.projected !== b.projected ? a.projected < b.projected : a.order < b.order,
    );
    claims.forEach((c, order) => {
      const cost = this.expectedCost(c.tenant);
      const outstanding = Math.max(0, c.outstanding ?? 0);
      const known = this.counts.get(c.tenant)?.mean !== undefined;
      const room = Math.max(0, Math.min(Math.floor(c.want), known ? Number.POSITIVE_INFINITY : this.firstCredits - outstanding));
      // Waiting for its first requests to tell their cost holds its turn as a blocked one does.
      const barrier = room === 0 && (c.blocked === true || (!known && c.want > 0));
      if (room > 0 || barrier) heap.push({ projected: this.counter(c.tenant) + outstanding * cost, cost, room, order, barrier });
    });
    for (let left = Math.floor(credits); left > 0 && heap.size > 0; left--) {
      const top = heap.pop()!;
      if (top.barrier) break;
      given[top.order]!++;
      top.room--;
      top.projected += top.cost;
      if (top.room > 0) heap.push(top);
    }
    return given;
  }

  /**
   * The tenants with work now. One that had none at the last call is raised to the lowest
   * counter of those that kept working (or, when none did, of those coming back): it does not
   * come back with a share saved up while it was idle.
   */
  setActive(tenants: Iterable<string>): void {
    const now = new Set(tenants);
    let floor = Number.POSITIVE_INFINITY;
    for (const t of now) if (this.active.has(t)) floor = Math.min(floor, this.counter(t));
    if (floor === Number.POSITIVE_INFINITY) {
      // Nobody kept working: returning tenants start level with the lowest of them.
      for (const t of now) floor = Math.min(floor, this.counter(t));
    }
    for (const t of now) {
      if (this.active.has(t)) continue;
      const c = this.entry(t);
      if (c.tokens < floor) c.tokens = floor;
    }
    this.active = now;
    this.prune();
  }

  /**
   * Something of `tenant` waits or is worked on (a request admitted, a lane with a backlog): the
   * incremental form of {@link setActive}, one reason at a time. A tenant that had none is raised
   * to the lowest counter of the active tenants (none active: it keeps its own), so it does not
   * come back with a share saved up while it was idle. Use this or `setActive`, not both.
   */
  hold(tenant: string): void {
    const n = this.holds.get(tenant) ?? 0;
    this.holds.set(tenant, n + 1);
    if (n > 0) return;
    let floor = Number.POSITIVE_INFINITY;
    for (const t of this.active) floor = Math.min(floor, this.counter(t));
    const c = this.entry(tenant);
    if (floor !== Number.POSITIVE_INFINITY && c.tokens < floor) c.tokens = floor;
    this.active.add(tenant);
  }

  /** One reason given to {@link hold} is gone; with none left the tenant is idle. */
  release(tenant: string): void {
    const n = this.holds.get(tenant) ?? 0;
    if (n > 1) {
      this.holds.set(tenant, n - 1);
      return;
    }
    if (n === 0) return;
    this.holds.delete(tenant);
    this.active.delete(tenant);
    this.prune();
  }

  /** Whether the tenant has work (see {@link hold}). */
  isActive(tenant: string): boolean {
    return this.active.has(tenant);
  }

  private entry(tenant: string): TenantCount {
    let c = this.counts.get(tenant);
    if (!c) this.counts.set(tenant, (c = { tokens: 0, mean: undefined }));
    return c;
  }

  private meanOfAll(): number | undefined {
    return this.meanCount > 0 ? Math.max(0, this.meanSum / this.meanCount) : undefined;
  }

  /**
   * Idle tenants beyond the bound are forgotten, lowest counters first (they would be raised on
   * return anyway), down to an eighth below the bound, so that the sort is paid once per many
   * tenants, not on every release.
   */
  private prune(): void {
    const idle = this.counts.size - this.active.size;
    if (idle <= this.maxIdle) return;
    const keep = this.maxIdle - Math.floor(this.maxIdle / 8);
    const candidates = [...this.counts.entries()].filter(([t]) => !this.active.has(t)).sort((a, b) => a[1].tokens - b[1].tokens);
    for (const [t] of candidates.slice(0, idle - keep)) this.counts.delete(t);
    // Sum and count again over those kept (exact: no rounding carried over from the updates).
    this.meanSum = 0;
    this.meanCount = 0;
    for (const c of this.counts.values()) {
      if (c.mean === undefined) continue;
      this.meanSum += c.mean;
      this.meanCount++;
    }
  }
}

function finite(x: number): number {
  return Number.isFinite(x) ? x : 0;
}

function positive(x: number, name: string): number {
  if (!(Number.isFinite(x) && x > 0)) throw new RangeError(`${name} must be a number > 0, got ${x}`);
  return x;
}

/** A binary heap; `before(a, b)` is true when a comes out first. */
class MinHeap<T> {
  private readonly items: T[] = [];
  constructor(private readonly before: (a: T, b: T) => boolean) {}

  get size(): number {
    return this.items.length;
  }

  push(x: T): void {
    const a = this.items;
    a.push(x);
    for (let i = a.length - 1; i > 0; ) {
      const parent = (i - 1) >> 1;
      if (!this.before(a[i]!, a[parent]!)) break;
      [a[i], a[parent]] = [a[parent]!, a[i]!];
      i = parent;
    }
  }

  pop(): T | undefined {
    const a = this.items;
    const top = a[0];
    const last = a.pop();
    if (a.length > 0 && last !== undefined) {
      a[0] = last;
      for (let i = 0; ; ) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < a.length && this.before(a[l]!, a[m]!)) m = l;
        if (r < a.length && this.before(a[r]!, a[m]!)) m = r;
        if (m === i) break;
        [a[i], a[m]] = [a[m]!, a[i]!];
        i = m;
      }
    }
    return top;
  }
}
