/**
 * Virtual time for engines that take a clock (LlmSimClock): timers run in time order when the
 * test says so, and `now()` jumps to each timer's time.
 */
import type { LlmSimClock } from "../../worker/engines/llm-sim.js";

export class VirtualClock implements LlmSimClock {
  private t = 0;
  private seq = 0;
  private readonly timers: Array<{ at: number; seq: number; fn: () => void }> = [];

  now(): number {
    return this.t;
  }

  setTimer(fn: () => void, ms: number): () => void {
    const timer = { at: this.t + Math.max(0, ms), seq: this.seq++, fn };
    this.timers.push(timer);
    return () => {
      const i = this.timers.indexOf(timer);
      if (i >= 0) this.timers.splice(i, 1);
    };
  }

  get pending(): number {
    return this.timers.length;
  }

  /** Runs the next `n` timers in time order (fewer when fewer are set), letting promises settle. */
  async runTimers(n: number): Promise<void> {
    for (let i = 0; i < n; i++) {
      await settle();
      if (!this.fireNext()) return;
    }
    await settle();
  }

  private fireNext(): boolean {
    if (this.timers.length === 0) return false;
    this.timers.sort((a, b) => a.at - b.at || a.seq - b.seq);
    const next = this.timers.shift()!;
    this.t = next.at;
    next.fn();
    return true;
  }

  /** Runs timers in time order (and lets promises settle after each) until none is left. */
  async runUntilIdle(maxTimers = 100_000): Promise<void> {
    for (let n = 0; n < maxTimers; n++) {
      await settle();
      if (!this.fireNext()) return;
    }
    throw new Error(`still ${this.timers.length} timers after ${maxTimers}`);
  }
}

/** Lets pending promise callbacks run. */
function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
