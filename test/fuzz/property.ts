/** fast-check runs with a fixed seed and a short failure report (counterexamples can be huge). */
import fc from "fast-check";

/** Longest failure report kept: enough for the seed, the path and the start of the counterexample. */
const MAX_REPORT_CHARS = 4_000;

/** Runs a property like `fc.assert`, but throws an error whose message is cut to a readable size. */
export function checkProperty<Ts>(property: fc.IProperty<Ts>, params: fc.Parameters<Ts> & { seed: number; numRuns: number }): void {
  const details = fc.check(property, { ...params });
  if (!details.failed) return;
  const err = new Error(cut(fc.defaultReportMessage(details) ?? "property failed"));
  if (details.errorInstance !== undefined) err.cause = details.errorInstance;
  throw err;
}

/** Like {@link checkProperty} for async properties. */
export async function checkAsyncProperty<Ts>(property: fc.IAsyncProperty<Ts>, params: fc.Parameters<Ts> & { seed: number; numRuns: number }): Promise<void> {
  const details = await fc.check(property, { ...params });
  if (!details.failed) return;
  const err = new Error(cut(fc.defaultReportMessage(details) ?? "property failed"));
  if (details.errorInstance !== undefined) err.cause = details.errorInstance;
  throw err;
}


function cut(s: string): string {
  return s.length > MAX_REPORT_CHARS ? `${s.slice(0, MAX_REPORT_CHARS)}… (${s.length - MAX_REPORT_CHARS} more characters)` : s;
}
