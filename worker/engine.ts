/**
 * What a worker serves requests with: the small interface that real engines (vLLM,
 * DeepSpeed-MII, ...) and the simulated one implement. Plain TypeScript values; the gRPC
 * server converts to and from the wire.
 */
import type { ErrorCode } from "../proto/wire.js";
import { CodedError } from "../proto/coded-error.js";

/** One request as the engine sees it. */
export interface EngineRequest {
  readonly id: string;
  readonly tenant: string;
  readonly model: string;
  readonly version: string;
  /** Text input; undefined when the request carries none. */
  readonly prompt?: string;
  /** Any other model input, as JSON. */
  readonly inputs?: unknown;
  /** Generation or model parameters, e.g. `{ max_tokens: 64 }`. */
  readonly parameters?: Readonly<Record<string, unknown>>;
  /** Absolute deadline, epoch ms. */
  readonly deadlineMs?: number;
  /** W3C trace context of the call, for engines that can join the trace. */
  readonly traceparent?: string;
}

/** Requests for one model version, run together. */
export interface EngineBatch {
  readonly model: string;
  readonly version: string;
  readonly requests: readonly EngineRequest[];
  /** W3C trace context of the call, for engines that can join the trace. */
  readonly traceparent?: string;
}

export interface EngineUsage {
  prompt_tokens: number;
  completion_tokens: number;
}

export interface EngineOutput {
  text?: string;
  /** Any other output, as JSON. */
  data?: unknown;
}

export interface EngineItemError {
  readonly code: ErrorCode;
  readonly message: string;
}

/** The answer for one item of a batch: its output, or its own error. */
export type EngineItemResult =
  | { readonly ok: true; readonly output: EngineOutput; readonly usage: EngineUsage }
  | {
      readonly ok: false;
      readonly error: EngineItemError;
      /** The item never ran (for example its deadline had passed when the batch started). */
      readonly notStarted?: boolean;
    };

/** One piece of a generation. */
export interface EngineToken {
  readonly text: string;
}

/**
 * A generation in progress. Iterate it once for the tokens; after the iteration has finished,
 * {@link usage} is final. Ending the iteration early (break) stops the generation, as aborting
 * its signal does.
 */
export interface EngineGeneration extends AsyncIterable<EngineToken> {
  /** Usage so far; final once the iteration has finished. */
  usage(): EngineUsage;
}

/** An engine's load (the `WorkerLoad` message of the wire). */
export interface EngineLoad {
  /** Requests waiting to be admitted. */
  readonly waiting: number;
  /** Requests admitted (prefilling or decoding). */
  readonly running: number;
  /** Share of the KV cache in use, 0 to 1. */
  readonly kvUsage: number;
  /** KV cache capacity in tokens, when known. */
  readonly kvCapacityTokens?: number;
  /** Hashes of the prefix blocks held (proto/prefix-blocks.ts), when asked for and known. */
  readonly prefixBlocks?: readonly string[];
  /** Tokens per block of `prefixBlocks`. */
  readonly blockTokens?: number;
}

export interface Engine {
  /**
   * Runs a batch. Resolves with one result per request, in the order of the batch; a request
   * that fails on its own gets an error result and does not fail the others. Rejects when the
   * batch as a whole cannot run (an {@link EngineError} with a code when it knows one), or with
   * the signal's reason once the signal aborts.
   */
  infer(batch: EngineBatch, signal: AbortSignal): Promise<EngineItemResult[]>;
  /**
   * Starts one generation. An error of the request itself is thrown from the iteration as an
   * {@link EngineError}; aborting the signal stops the generation at once and the iteration
   * throws the signal's reason.
   */
  generate(request: EngineRequest, signal: AbortSignal): EngineGeneration;
  /**
   * The engine's current load, for the pipeline's routing. Optional: an engine without it makes
   * its worker answer `GetLoad` with UNIMPLEMENTED, and the pipeline routes by what it knows.
   * Rejects when the load cannot be read (the worker then answers UNAVAILABLE).
   */
  load?(options: { prefixBlocks: boolean }, signal: AbortSignal): Promise<EngineLoad>;
  /** How many items the engine can take at once (the worker's registered capacity). */
  readonly capacity: number;
  /** Stops the engine: work still queued or running fails. Safe to call twice. */
  close(): Promise<void>;
}

/** An engine failure with the error code it maps to (docs/protocol.md, "Error codes"). */
export class EngineError extends CodedError<ErrorCode> {
  override readonly name: string = "EngineError";
}

/** The engine was closed while the work was queued or running, or before it was asked. */
export class EngineClosedError extends EngineError {
  override readonly name: string = "EngineClosedError";
  constructor() {
    super("UNAVAILABLE", "engine closed");
  }
}
