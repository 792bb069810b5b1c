/**
 * The pipeline as a library (`"sluice/pipeline"`): start and stop a {@link PipelineService}
 * in a process of your own, with its configuration.
 */
export { PipelineService, type PipelineStartOptions, type PipelineStats } from "./service.js";
export {
  ConfigError,
  DEFAULT_NATS_URL,
  defaultConfig,
  loadConfig,
  validateConfig,
  type LoadConfigOptions,
  type SluiceConfig,
  type SluiceConfigInput,
} from "./config.js";
export { connectNats } from "./connection.js";
export { consoleLogger, silentLogger, type PipelineLogger } from "./support/logger.js";
