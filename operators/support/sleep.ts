/**
 * Resolves after `ms` (on the next macrotask for 0 or less), or at once when `signal` aborts; it
 * never rejects (the caller checks `signal.aborted` when that matters). The timer never keeps
 * the process alive on its own.
 */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const timer = ms > 0 ? setTimeout(done, ms) : undefined;
    const immediate = ms > 0 ? undefined : setImmediate(done);
    timer?.unref();
    immediate?.unref();
    function done(): void {
      if (timer !== undefined) clearTimeout(timer);
      if (immediate !== undefined) clearImmediate(immediate);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}
