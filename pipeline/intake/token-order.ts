/**
 * Which tenant lanes get the next credits, by the Virtual Token Counter rule (Sheng et al.,
 * "Fairness in Serving Large Language Models", OSDI 2024): each credit goes to the backlogged
 * lane whose tenant was given the fewest tokens, counting the tokens its outstanding credits are
 * expected to bring. Pure: the counters come in, credits come out.
 *
 * ```
 * counters: long 8,000  short 7,600    costs: long 400  short 40    4 credits
 * projected short: 7,640 7,680 … 8,000 → short takes credits until it passes long's 8,000
 * ```
 *
 * Fair by what was given, not by what is held: a lane whose requests finish sooner (or that
 * another stage favours) does not get more tokens for it, since the counters only grow with what
 * each tenant was admitted. Nothing here depends on time.
 */

/** One lane asking for credits. */
export interface CounterClaim {
  readonly key: string;
  /** Tokens its tenant was given so far (charged at admission, corrected by usage). */
  readonly counter: number;
  /** Expected tokens of one of its requests (> 0). */
  readonly cost: number;
  /** Credits out in its pulls that have brought nothing yet (their tokens are projected). */
  readonly requested: number;
}

/**
 * The credits of each claim (in the order of the claims): one at a time to the lowest projected
 * counter (`counter + (requested + given) × cost`); ties go to the earlier claim.
 */
export function byLowestCounter(claims: readonly CounterClaim[], credits: number): number[] {
  const given = claims.map(() => 0);
  if (claims.length === 0) return given;
  const cost = claims.map((c) => (Number.isFinite(c.cost) && c.cost > 0 ? c.cost : 1));
  const projected = claims.map((c, i) => (Number.isFinite(c.counter) ? c.counter : 0) + Math.max(0, c.requested) * cost[i]!);
  for (let left = Math.floor(credits); left > 0; left--) {
    let low = 0;
    for (let i = 1; i < claims.length; i++) if (projected[i]! < projected[low]!) low = i;
    given[low]!++;
    projected[low]! += cost[low]!;
  }
  return given;
}

/** The claims' keys, lowest projected counter first (who is owed the most). */
export function lowestFirst(claims: readonly CounterClaim[]): string[] {
  const projected = (c: CounterClaim): number => c.counter + Math.max(0, c.requested) * (c.cost > 0 ? c.cost : 1);
  return [...claims].sort((a, b) => projected(a) - projected(b)).map((c) => c.key);
}
