/**
 * Load polling: each worker is asked for its load (`GetLoad`, with the prompt blocks it holds)
 * once a round; the pool routes by the last fresh report.
 */
import { BLOCK_TOKENS } from "../../proto/prefix-blocks.js";
import { LOAD_REPORT_RETRY_MS, type PoolWorker } from "./pool-options.js";
import type { PrefixIndex } from "./prefix-index.js";

/** One round of load reports from `workers`; the prompt blocks reported replace what `prefixes` knew of each. */
export async function pollLoad(workers: Iterable<PoolWorker>, prefixes: PrefixIndex): Promise<void> {
  const now = Date.now();
  await Promise.all(
    [...workers].map(async (w) => {
      if (!w.conn.load || w.draining || w.loadPending || now < w.noReportUntil) return;
      w.loadPending = true;
      const askedAtMs = Date.now();
      try {
        const report = await w.conn.load({ prefixBlocks: true });
        if (!report) {
          // An older worker, or an engine without load: routed by what the pool knows.
          w.report = undefined;
          w.noReportUntil = Date.now() + LOAD_REPORT_RETRY_MS;
          return;
        }
        w.report = { load: report, atMs: Date.now() };
        if (report.blockTokens === BLOCK_TOKENS && !w.draining) prefixes.replace(w.endpoint, report.prefixBlocks, askedAtMs);
      } catch {
        // No answer this time: the last report stands until it is stale.
      } finally {
        w.loadPending = false;
      }
    }),
  );
}
