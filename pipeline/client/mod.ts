/**
 * The client library, what `import ... from "sluice"` gives: publish inference requests and
 * await their results. Loads the NATS client and nothing of the pipeline's tracing or gRPC.
 */
export { DEFAULT_RESULT_TIMEOUT_MS, InferenceClient } from "./client.js";
export { InferenceError } from "./errors.js";
export type { ClientOptions, InferBody, InferOptions, StreamEvent } from "./options.js";
export type { InferResult, Timing, Usage } from "../../operators/types.js";
export { ERROR_CODES, PRIORITIES, type ErrorCode, type Priority } from "../../proto/wire.js";
