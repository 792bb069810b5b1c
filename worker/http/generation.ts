/** A generation over HTTP, with the server's finish reason. */
import { type EngineGeneration, type EngineToken, type EngineUsage } from "../engine.js";

/** A generation with a finish reason, as the HTTP engines return it. */
export interface HttpGeneration extends EngineGeneration {
  /** The server's finish reason (`stop`, `length`, ...), once it gave one. */
  finishReason(): string | undefined;
}

/**
 * Wraps a token producer as a generation that can be iterated once; `run` fills in the usage and
 * finish reason it is handed as it goes.
 */
export function generationOnce(
  run: (usage: EngineUsage, state: { finish: string | undefined }) => AsyncIterator<EngineToken>,
): HttpGeneration {
  const usage: EngineUsage = { prompt_tokens: 0, completion_tokens: 0 };
  const state: { finish: string | undefined } = { finish: undefined };
  let iterated = false;
  return {
    usage: () => ({ ...usage }),
    finishReason: () => state.finish,
    [Symbol.asyncIterator]: () => {
      if (iterated) throw new Error("a generation can be iterated only once");
      iterated = true;
      return run(usage, state);
    },
  };
}
