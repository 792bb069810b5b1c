/**
 * The worker side of sluice: a gRPC server that serves `infer.v1.Worker` over an engine, the
 * engine interface, and the simulated engine.
 */
export {
  EngineClosedError,
  EngineError,
  type Engine,
  type EngineBatch,
  type EngineGeneration,
  type EngineItemError,
  type EngineItemResult,
  type EngineLoad,
  type EngineOutput,
  type EngineRequest,
  type EngineToken,
  type EngineUsage,
} from "./engine.js";
export {
  DEFAULT_BASE_MS,
  DEFAULT_CALL_LOG_LIMIT,
  DEFAULT_CAPACITY,
  DEFAULT_PER_ITEM_MS,
  DEFAULT_TOKEN_INTERVAL_MS,
  DEFAULT_TTFT_MS,
  SimulatedEngine,
  type EngineCall,
  type SimulatedEngineCounters,
  type SimulatedEngineOptions,
} from "./engines/simulated.js";
export { countWords, simulatedOutputText, splitTokens } from "./engines/simulated-output.js";
export {
  DEFAULT_LLM_KV_TOKENS,
  DEFAULT_LLM_MAX_RUNNING,
  LlmSimEngine,
  realClock,
  type LlmSimClock,
  type LlmSimCounters,
  type LlmSimOptions,
  type LlmSequenceRecord,
} from "./engines/llm-sim.js";
export { WorkerServer } from "./server.js";
export {
  DEFAULT_STOP_GRACE_MS,
  DEFAULT_WORKER_HOST,
  WORKER_KEEPALIVE_TIME_MS,
  WORKER_KEEPALIVE_TIMEOUT_MS,
  WORKER_MAX_MESSAGE_BYTES,
  WorkerServerError,
  type WorkerCallContext,
  type WorkerServerErrorCode,
  type WorkerServerOptions,
} from "./server-options.js";
