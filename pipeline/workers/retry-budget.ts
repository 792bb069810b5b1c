/**
 * The pool's retry budget: retries allowed as a fraction of the calls counted over a sliding
 * window, plus a floor per second, so that a failing fleet is not hit with a storm of retries.
 */

/** The window over which calls and retries are counted. */
const RETRY_BUDGET_WINDOW_MS = 10_000;

export class RetryBudget {
  private since = Date.now();
  private calls = 0;
  private retries = 0;

  constructor(
    private readonly ratio: number,
    private readonly minPerSecond: number,
  ) {}

  /** Counts one call (a batch dispatched). */
  noteCall(): void {
    this.calls++;
  }

  /** Takes one retry from the budget; false when it is spent. */
  take(): boolean {
    const now = Date.now();
    if (now - this.since > RETRY_BUDGET_WINDOW_MS) {
      this.since = now;
      this.calls = 0;
      this.retries = 0;
    }
    const seconds = Math.max(1, (now - this.since) / 1000);
    const allowed = this.calls * this.ratio + seconds * this.minPerSecond;
    if (this.retries >= allowed) return false;
    this.retries++;
    return true;
  }
}
