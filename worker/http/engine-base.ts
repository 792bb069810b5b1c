/**
 * What the engines over an HTTP server (vLLM, DeepSpeed-MII) share: the server they call, the
 * items in flight to it, batches through {@link runBatch}, and closing.
 */
import { EngineClosedError, EngineError, type EngineBatch, type EngineItemResult, type EngineRequest } from "../engine.js";
import { runBatch, type BatchCalls } from "./batch.js";
import type { HttpEngineClient } from "./client.js";
import { abortReason } from "./errors.js";

/** What every engine over an HTTP server is given, besides its own options. */
export interface HttpEngineOptions {
  /** Where the server listens, e.g. `http://10.0.0.7:8000`. */
  readonly baseUrl: string;
  /** Items in flight at once; each engine has its default. */
  readonly capacity?: number;
  /** Default `DEFAULT_REQUEST_TIMEOUT_MS` (worker/http/client.ts). */
  readonly requestTimeoutMs?: number;
  /** Parameters for requests that do not set them, checked like a request's. */
  readonly defaultParameters?: Readonly<Record<string, unknown>>;
}

export abstract class HttpBatchEngine<P> {
  protected abstract readonly http: HttpEngineClient;
  protected abstract readonly calls: BatchCalls<P>;

  /** Where requests go (the server root). */
  get baseUrl(): string {
    return this.http.baseUrl;
  }

  /** Items in flight to the server now. */
  get inFlight(): number {
    return this.http.inFlight;
  }

  infer(batch: EngineBatch, signal: AbortSignal): Promise<EngineItemResult[]> {
    return runBatch(batch, signal, this.calls, this.http);
  }

  /**
   * The payload of a generation about to start; throws an EngineError when it may not start
   * (the engine closed, the caller gone, the deadline passed) or the request is not valid.
   */
  protected generationPayload(request: EngineRequest, signal: AbortSignal): P {
    if (this.http.closed) throw new EngineClosedError();
    if (signal.aborted) throw abortReason(signal);
    if (request.deadlineMs !== undefined && request.deadlineMs > 0 && request.deadlineMs <= Date.now()) {
      throw new EngineError("DEADLINE_EXCEEDED", `deadline passed before request '${request.id}' started`);
    }
    const prepared = this.calls.prepare(request);
    if (!prepared.ok) throw new EngineError(prepared.error.code, prepared.error.message);
    return prepared.payload;
  }

  /** Ends every call in flight (they fail with EngineClosedError). Safe to call twice. */
  async close(): Promise<void> {
    this.http.close();
  }
}
