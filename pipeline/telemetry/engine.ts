/** The worker side: an engine wrapped so its batches and generations are traced. */
import { type Attributes } from "@opentelemetry/api";
import type { Engine, EngineBatch, EngineGeneration, EngineItemResult, EngineRequest, EngineToken } from "../../worker/engine.js";
import { type Tracing, type WorkerMethod, type ServerCallTrace, ATTR, type SpanHandle } from "./types.js";
import { codeOf } from "./span-attributes.js";

export interface TraceEngineOptions {
  /** The worker's id, recorded on its spans. */
  workerId?: string;
}

/**
 * Wraps an engine so that every call is traced on the worker: a SERVER span, child of the
 * call's trace context (which the worker server hands the engine), and an `engine` child span
 * around the engine's work. Calls the engine exactly as given; tracing never changes a result.
 *
 * ```ts
 * const worker = await WorkerServer.start({ engine: traceEngine(engine, tracing, { workerId }), workerId });
 * ```
 */
export function traceEngine(engine: Engine, tracing: Tracing, opts: TraceEngineOptions = {}): Engine {
  const serverCall = (method: WorkerMethod, traceparent: string | undefined, attributes: Attributes): ServerCallTrace =>
    tracing.startServerCall({ method, traceparent, workerId: opts.workerId }, attributes);
  return {
    get capacity(): number {
      return engine.capacity;
    },
    close: () => engine.close(),
    // The load report passes through untraced (it is polled, not a request).
    ...(engine.load ? { load: engine.load.bind(engine) } : {}),
    infer: async (batch: EngineBatch, signal: AbortSignal): Promise<EngineItemResult[]> => {
      const call = serverCall("Infer", batch.traceparent, {
        [ATTR.model]: batch.model,
        [ATTR.version]: batch.version,
        [ATTR.batchSize]: batch.requests.length,
      });
      const run = call.startEngine("infer", { [ATTR.batchSize]: batch.requests.length });
      try {
        const results = await engine.infer(batch, signal);
        const errors = Array.isArray(results) ? results.filter((r) => !r.ok).length : 0;
        run.setAttributes({ [ATTR.itemErrors]: errors });
        run.end();
        call.end();
        return results;
      } catch (err) {
        run.end(codeOf(err), err);
        call.end(codeOf(err), err);
        throw err;
      }
    },
    generate: (request: EngineRequest, signal: AbortSignal): EngineGeneration => {
      const call = serverCall("Generate", request.traceparent, { [ATTR.model]: request.model, [ATTR.version]: request.version, [ATTR.messageId]: request.id });
      const run = call.startEngine("generate");
      let generation: EngineGeneration;
      try {
        generation = engine.generate(request, signal);
      } catch (err) {
        run.end(codeOf(err), err);
        call.end(codeOf(err), err);
        throw err;
      }
      return tracedGeneration(generation, run, call);
    },
  };
}

function tracedGeneration(generation: EngineGeneration, run: SpanHandle, call: SpanHandle): EngineGeneration {
  return {
    usage: () => generation.usage(),
    [Symbol.asyncIterator]: async function* (): AsyncGenerator<EngineToken, void, undefined> {
      let tokens = 0;
      let status = "CANCELLED"; // unless it finishes or fails: the consumer left early
      let failure: unknown;
      try {
        for await (const token of generation) {
          if (tokens === 0) run.addEvent("first token");
          tokens++;
          yield token;
        }
        status = "ok";
      } catch (err) {
        status = codeOf(err);
        failure = err;
        throw err;
      } finally {
        run.setAttributes({ [ATTR.tokens]: tokens });
        run.end(status, failure);
        call.end(status, failure);
      }
    },
  };
}
