/**
 * The request path's stages as RxJS operators, each in its own file; they know nothing of NATS,
 * gRPC or the process around them.
 */
export { admitByDeadline, type AdmitByDeadlineOptions } from "./admit-by-deadline.js";
export { admitByTenantLimits, type AdmitByTenantLimitsOptions, type TenantGate } from "./admit-by-tenant-limits.js";
export { batchByModelVersion, type BatchByModelVersionOptions } from "./batch-by-model-version.js";
export { decodeRequest, type DecodeOptions, type Decoded } from "./decode-request.js";
export { dispatchBatch, DispatchError, type BatchDispatcher, type DispatchBatchOptions } from "./dispatch-batch.js";
export { generateEach, type GenerateEachOptions, type Generator } from "./generate-each.js";
export { onJobs } from "./on-jobs.js";
export { routeToVersion, type RouteDecision } from "./route-to-version.js";
export { settleOutcomes, type ResultSink, type Settled, type SettleOutcomesOptions } from "./settle-outcome.js";
export { skipAnswered, type SkipAnsweredOptions } from "./skip-answered.js";
export { withShadowCopies, type WithShadowCopiesOptions } from "./with-shadow-copies.js";
export type { Batch, Delivery, InferJob, InferResult, Outcome, RoutedJob } from "./types.js";
