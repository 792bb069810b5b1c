/** Where the pipeline and its tools say what they do. */
export interface PipelineLogger {
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
}

export const consoleLogger: PipelineLogger = {
  info: (m) => console.log(`[sluice] ${m}`),
  warn: (m) => console.warn(`[sluice] ${m}`),
  error: (m) => console.error(`[sluice] ${m}`),
};

export const silentLogger: PipelineLogger = { info: () => undefined, warn: () => undefined, error: () => undefined };
