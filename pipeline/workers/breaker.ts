/**
 * The circuit breaker of one worker: after `ejectAfterFailures` consecutive failed calls it opens
 * (the worker is ejected) for a backoff that doubles with each ejection (with jitter); then one
 * probe call may go through (half-open), and its success closes it.
 */
import { backoffMs } from "../../operators/support/backoff.js";

export type BreakerState = "closed" | "open" | "half-open";

export interface BreakerOptions {
  readonly ejectAfterFailures: number;
  readonly ejectForMs: number;
  readonly maxEjectForMs: number;
  /** Random source of the backoff's jitter, in [0, 1) (tests pass their own). */
  readonly random?: () => number;
}

export class Breaker {
  private current: BreakerState = "closed";
  private consecutiveFailures = 0;
  private openUntil = 0;
  private ejections = 0;

  constructor(private readonly o: BreakerOptions) {}

  get state(): BreakerState {
    return this.current;
  }

  /** Consecutive failed calls. */
  get failures(): number {
    return this.consecutiveFailures;
  }

  /** May a call go at `now`? Open: once the ejection is over (a probe); half-open: only while nothing else is in flight. */
  allows(now: number, inFlight: number): boolean {
    if (this.current === "open") return now >= this.openUntil;
    if (this.current === "half-open") return inFlight === 0;
    return true;
  }

  /** A call goes: the first after an ejection is the probe. */
  calling(): void {
    if (this.current === "open") this.current = "half-open";
  }

  /** True while a probe is out. */
  get probing(): boolean {
    return this.current === "half-open";
  }

  /** A call succeeded; true when that closed the breaker (the worker is restored). */
  succeeded(): boolean {
    this.consecutiveFailures = 0;
    if (this.current === "closed") return false;
    this.current = "closed";
    this.ejections = 0;
    return true;
  }

  /** A call failed; the ejection time when that opened the breaker, else undefined. */
  failed(now: number): number | undefined {
    this.consecutiveFailures++;
    if (this.current !== "half-open" && this.consecutiveFailures < this.o.ejectAfterFailures) return undefined;
    const forMs = backoffMs(this.ejections, { baseMs: this.o.ejectForMs, maxMs: this.o.maxEjectForMs }, this.o.random);
    this.ejections++;
    this.current = "open";
    this.openUntil = now + forMs;
    return forMs;
  }
}
