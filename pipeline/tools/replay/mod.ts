/**
 * Replay: re-runs recorded requests from `INFER_REQ` through the same pipeline code as live
 * traffic ({@link inferencePipeline}) and compares each new result with the recorded one.
 *
 * ```
 * INFER_REQ ─ ordered consumer (selection) ─ pace ─ credits ─▶ inferencePipeline ─▶ infer.replay.<session>.res.<tenant>.<id>
 *                                                                    │ route: --version, else the recorded version, else the registry
 *                                   INFER_RES (last_by_subj) ────────┴─▶ compare: equal | different | missing | error
 * ```
 *
 * - **Never live.** Requests are read with an ephemeral ordered consumer (the durable
 *   consumers of the live pipeline are not touched), results (and the chunks of streamed
 *   requests) go to `infer.replay.<session>.>` on core NATS, never to `infer.res` or
 *   `infer.tok`; live cancels and shadow copies do not apply. Deliveries are wrappers whose
 *   ack/nak/term do nothing to the stream: a nak with a delay re-runs the request after the
 *   delay, at most `maxReruns` times (there is no redelivery to count on).
 * - **Counted first.** A headers-only pass counts the selection (and lists it for a dry run)
 *   before anything runs; the replay pass reads the same range again.
 * - **Bounded.** At most `maxInFlight` requests are in the pipeline at once; the backlog waits
 *   in the stream, as it does live.
 * - **Traced apart.** Each replayed request runs under a new `traceparent` (a new trace); the
 *   original travels in the result header `Infer-Replay-Of-Traceparent` as the link.
 *
 * ```ts
 * const report = await replay(nc, {
 *   selection: { since: new Date(Date.now() - 15 * 60_000), models: ["llama3-8b"] },
 *   version: "v2",
 *   onResult: (item) => console.log(item.verdict, item.id),
 * });
 * console.log(report.counts, report.different);
 * ```
 */
export { replay } from "./run.js";
export {
  DEFAULT_MAX_RERUNS,
  DEFAULT_PROGRESS_INTERVAL_MS,
  formatPace,
  parsePace,
  parseTimeSpec,
  ReplayError,
  type Pace,
  type ReplayCounts,
  type ReplayItem,
  type ReplayOptions,
  type ReplayProgress,
  type ReplayReport,
} from "./options.js";
export { countSelection, filterSubjectOf, validateSelection, type ReplaySelection, type SelectedRequest, type SelectionCount } from "./selection.js";
export { compareResults, type Comparison, type ResultView, type Verdict } from "./compare.js";
