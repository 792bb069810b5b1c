/**
 * Calls waiting for a free worker slot, per model@version key: woken by priority rank, then in
 * arrival order; each re-checks for a slot when woken.
 */

/** The longest a timer may be set for (Node's limit). */
const MAX_TIMER_MS = 2_147_483_647;

interface Waiter {
  readonly rank: number;
  readonly seq: number;
  readonly wake: () => void;
}

export class SlotQueue {
  private readonly waiters = new Map<string, Waiter[]>();
  private seq = 0;

  /** Wakes every waiter of the key, highest priority first, then oldest. */
  wake(key: string): void {
    const list = this.waiters.get(key);
    if (!list || list.length === 0) return;
    this.waiters.delete(key);
    list.sort((a, b) => a.rank - b.rank || a.seq - b.seq);
    for (const w of list) w.wake();
  }

  /** Wakes every waiter of every key. */
  wakeAll(): void {
    for (const key of [...this.waiters.keys()]) this.wake(key);
  }

  /** Waits until `wake(key)`, the deadline or an abort; the caller then checks again. */
  wait(key: string, rank: number, deadlineMs: number, signal?: AbortSignal): Promise<void> {
    return new Promise<void>((resolve) => {
      let list = this.waiters.get(key);
      if (!list) this.waiters.set(key, (list = []));
      const entry: Waiter = { rank, seq: this.seq++, wake: (): void => done() };
      const done = (): void => {
        clearTimeout(t);
        signal?.removeEventListener("abort", done);
        const l = this.waiters.get(key);
        if (l) {
          const i = l.indexOf(entry);
          if (i >= 0) l.splice(i, 1);
        }
        resolve();
      };
      const t = setTimeout(done, Math.min(MAX_TIMER_MS, Math.max(1, deadlineMs - Date.now())));
      t.unref();
      signal?.addEventListener("abort", done, { once: true });
      list.push(entry);
    });
  }
}
