/**
 * The workers layer: the gRPC client of one worker, the pool that chooses a worker for each
 * batch (health, breaker, retries, routing policy), the directory of registered workers, and
 * the fleet that opens them together.
 */
export {
  WorkerClient,
  HEALTH_CHECK_TIMEOUT_MS,
  WORKER_CLIENT_MAX_BATCH_BYTES,
  WORKER_CLIENT_MAX_RECEIVE_MESSAGE_BYTES,
  type WorkerClientOptions,
} from "./client.js";
export { WorkerCallError, toWorkerCallError } from "./call-error.js";
export type {
  HealthStatus,
  WorkerBatch,
  WorkerBatchResult,
  WorkerCallOptions,
  WorkerChunk,
  WorkerGenerateRequest,
  WorkerItemResult,
  WorkerLoadReport,
  WorkerRequest,
} from "./worker-messages.js";
export { WorkerPool } from "./pool.js";
export type { PoolEvent, WorkerConnection, WorkerPoolOptions, WorkerSnapshot } from "./pool-options.js";
