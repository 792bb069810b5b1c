/**
 * An {@link Engine} over vLLM's OpenAI-compatible HTTP server (`vllm serve`).
 *
 * Wire format, as vLLM's own source defines it (`vllm/entrypoints/openai/`: the request and
 * response models of `protocol.py`, the completion and chat serving classes, `api_server.py`),
 * for vLLM v0.10.1 and later, with the older error body understood as well:
 * - `POST /v1/completions` `{"model", "prompt": string | string[], "max_tokens", "temperature",
 *   "top_p", "stop", "seed", ...}` answers `{"object": "text_completion", "choices": [{"index",
 *   "text", "finish_reason", "stop_reason", ...}], "usage": {"prompt_tokens",
 *   "completion_tokens", "total_tokens"}}`. With a prompt list a choice's `index` is
 *   `prompt index * n + output index`, and `usage` is the sum over all prompts; with
 *   `"return_token_ids": true` (vLLM PR #22587, August 2025) every choice also carries
 *   `prompt_token_ids` and `token_ids`, which is how this adapter counts each item's usage.
 * - `POST /v1/chat/completions` `{"model", "messages": [{"role": "user", "content"}], ...}`
 *   answers `choices[].message.content` instead of `choices[].text`.
 * - `"stream": true` answers server-sent events, one `data: {json}` per chunk
 *   (`choices[].text`, or `choices[].delta.content` for chat), then, with
 *   `"stream_options": {"include_usage": true}`, a chunk with `"choices": []` and `usage`, then
 *   `data: [DONE]`. An error during the stream arrives as a `data:` event holding the error
 *   body, followed by `data: [DONE]`.
 * - Errors: HTTP 400 (validation), 404 (`"The model `x` does not exist."`), 500, 501, and 503
 *   from `/health` when the engine died; the body is `{"error": {"message", "type", "param",
 *   "code"}}` since v0.10.1 (PR #22099) and `{"object": "error", "message", "type", "param",
 *   "code"}` before. With `--api-key`, a wrong key gets 401 `{"error": "Unauthorized"}`.
 * - `GET /health` answers 200 with an empty body while the engine is alive.
 *
 * Decisions:
 * - Items of a batch that share their parameters go in one `/v1/completions` call with a prompt
 *   list (at most `capacity` prompts a call); items with other parameters go in calls of their
 *   own, all at once, at most `capacity` items in flight in all. In chat mode every item is a
 *   call of its own (chat takes one conversation a call); vLLM batches concurrent calls on the
 *   GPU anyway (continuous batching).
 * - Parameters are checked against a list of known ones; an unknown one fails its item with
 *   INVALID_ARGUMENT. vLLM would take it silently (its request models allow extra fields and
 *   only log them), so passing it on would answer a different question than the one asked.
 * - `inputs` fails the item with INVALID_ARGUMENT, with or without a prompt: this adapter
 *   serves text, and dropping part of a request silently is worse than refusing it.
 * - A prompt list that vLLM refuses (400) or fails (500) is asked again prompt by prompt, so
 *   one bad prompt (say, one over the context length) fails only its own item.
 * - When every call of a batch failed with UNAVAILABLE (or every one timed out), `infer`
 *   rejects as a whole, so the pipeline tries another worker at once; otherwise each item
 *   carries its own error.
 * - Status mapping: 400/413/422 INVALID_ARGUMENT; 404 NOT_FOUND; 408/429/502/503/504
 *   UNAVAILABLE (the server, or the proxy in front of it, is busy or away: retriable); any
 *   other status INTERNAL (401/403 mean this worker is misconfigured, not the request).
 *   A refused, reset or dropped connection is UNAVAILABLE; `requestTimeoutMs` passing is
 *   DEADLINE_EXCEEDED; the caller's abort is the signal's reason (CANCELLED, or the deadline).
 * - A generation's `requestTimeoutMs` bounds the wait for the answer and then every gap between
 *   chunks, not the whole generation, which may rightly take long.
 * - `output.data` carries `{"finish_reason": ...}` when the server gave one.
 */
import { EngineError, type Engine, type EngineItemError, type EngineItemResult, type EngineLoad, type EngineRequest, type EngineToken, type EngineUsage } from "../engine.js";
import { integerParameter, numberParameter, stringsParameter, booleanParameter, ONE_ANSWER, mapParameters, parameterKey, type ParameterRule } from "../http/parameters.js";
import { type HttpGeneration, generationOnce } from "../http/generation.js";
import { HttpEngineClient, DEFAULT_REQUEST_TIMEOUT_MS, parseJson } from "../http/client.js";
import { type BatchCalls, type Preparation, type PreparedItem, isRecord, tokenCount, apportion } from "../http/batch.js";
import { HttpBatchEngine, type HttpEngineOptions } from "../http/engine-base.js";
import { HttpStatusError, errorCodeForStatus } from "../http/errors.js";
import { vllmLoadFromMetrics } from "./vllm-metrics.js";

/** Items in flight to the server at once, by default. */
const DEFAULT_VLLM_CAPACITY = 64;

// ---------------------------------------------------------------------------------------------
// HTTP plumbing shared with the DeepSpeed-MII adapter.
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Parameters.
// ---------------------------------------------------------------------------------------------

/** vLLM's sampling parameters this adapter passes on (vLLM `CompletionRequest` field names). */
const VLLM_PARAMETERS: Readonly<Record<string, ParameterRule>> = {
  max_tokens: integerParameter(1),
  temperature: numberParameter({ min: 0 }),
  top_p: numberParameter({ min: 0, minExclusive: true, max: 1 }),
  top_k: integerParameter(-1),
  min_p: numberParameter({ min: 0, max: 1 }),
  presence_penalty: numberParameter({ min: -2, max: 2 }),
  frequency_penalty: numberParameter({ min: -2, max: 2 }),
  repetition_penalty: numberParameter({ min: 0, minExclusive: true }),
  stop: stringsParameter(),
  seed: integerParameter(),
  min_tokens: integerParameter(0),
  ignore_eos: booleanParameter(),
  n: ONE_ANSWER,
};

// ---------------------------------------------------------------------------------------------
// Running a batch as HTTP calls.
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// The vLLM engine.
// ---------------------------------------------------------------------------------------------

/**
 * `baseUrl`: where `vllm serve` listens, e.g. `http://10.0.0.7:8000` (a trailing `/v1` is
 * dropped); `capacity`: default {@link DEFAULT_VLLM_CAPACITY}; `defaultParameters`: note that
 * vLLM's completions default `max_tokens` is 16.
 */
export interface VllmEngineOptions extends HttpEngineOptions {
  /** The model name vLLM serves (`--served-model-name`); default: the request's model. */
  readonly servedModel?: string;
  /** Sent as `Authorization: Bearer <apiKey>` (vLLM's `--api-key`). */
  readonly apiKey?: string;
  /** Use `/v1/chat/completions`, the prompt being one user message. */
  readonly chat?: boolean;
}

/** A generation; `finishReason()` is the server's `finish_reason`, once it gave one. */
export type VllmGeneration = HttpGeneration;

interface VllmPayload {
  readonly prompt: string;
  readonly params: Readonly<Record<string, unknown>>;
}

export class VllmEngine extends HttpBatchEngine<VllmPayload> implements Engine {
  readonly capacity: number;
  readonly chat: boolean;
  protected readonly http: HttpEngineClient;
  private readonly servedModel: string | undefined;
  private readonly defaults: Readonly<Record<string, unknown>>;
  protected readonly calls: BatchCalls<VllmPayload>;

  constructor(opts: VllmEngineOptions) {
    super();
    const headers: Record<string, string> = {};
    if (opts.apiKey) headers["Authorization"] = `Bearer ${opts.apiKey}`;
    this.http = new HttpEngineClient({
      label: "vLLM",
      baseUrl: typeof opts.baseUrl === "string" ? opts.baseUrl.replace(/\/v1\/*$/, "") : opts.baseUrl,
      headers,
      capacity: opts.capacity ?? DEFAULT_VLLM_CAPACITY,
      requestTimeoutMs: opts.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
    });
    this.capacity = this.http.capacity;
    this.chat = opts.chat === true;
    this.servedModel = opts.servedModel || undefined;
    this.defaults = { ...opts.defaultParameters };
    const checked = mapParameters(this.defaults, VLLM_PARAMETERS, "vLLM");
    if (!checked.ok) throw new TypeError(`defaultParameters: ${checked.message}`);
    this.calls = {
      prepare: (request) => this.prepare(request),
      maxItemsPerCall: this.chat ? 1 : this.capacity,
      call: (items, signal) => (this.chat ? this.chatCall(items, signal) : this.completionCall(items, signal)),
    };
  }

  generate(request: EngineRequest, signal: AbortSignal): VllmGeneration {
    return generationOnce((usage, state) => this.stream(request, signal, usage, state));
  }

  /**
   * The server's load from its Prometheus endpoint (`GET /metrics`): requests waiting and
   * running, KV cache usage. Rejects with an {@link EngineError} (UNAVAILABLE) when the page
   * cannot be read or lacks those metrics. vLLM's block hashes are its own: no prefix blocks.
   */
  async load(_options: { prefixBlocks: boolean }, signal: AbortSignal): Promise<EngineLoad> {
    const { status, body } = await this.http.get("/metrics", { signal });
    if (status !== 200) throw new EngineError("UNAVAILABLE", `vLLM GET /metrics answered ${status}`);
    try {
      return vllmLoadFromMetrics(body, this.servedModel);
    } catch (err) {
      throw new EngineError("UNAVAILABLE", err instanceof Error ? err.message : String(err), { cause: err });
    }
  }

  /** Whether `GET /health` answers 200 (false too when the server cannot be reached). */
  health(signal?: AbortSignal): Promise<boolean> {
    return this.http.healthy("/health", signal);
  }

  private prepare(request: EngineRequest): Preparation<VllmPayload> {
    const problem = textOnly(request);
    if (problem) return { ok: false, error: { code: "INVALID_ARGUMENT", message: problem } };
    const mapped = mapParameters({ ...this.defaults, ...request.parameters }, VLLM_PARAMETERS, "vLLM");
    if (!mapped.ok) return { ok: false, error: { code: "INVALID_ARGUMENT", message: `request '${request.id}': ${mapped.message}` } };
    return {
      ok: true,
      payload: { prompt: request.prompt ?? "", params: mapped.body },
      key: `${this.modelFor(request)}\n${parameterKey(mapped.body)}`,
    };
  }

  private modelFor(request: EngineRequest): string {
    return this.servedModel ?? request.model;
  }

  private async completionCall(items: readonly PreparedItem<VllmPayload>[], signal: AbortSignal): Promise<EngineItemResult[]> {
    const first = items[0];
    if (!first) return [];
    const several = items.length > 1;
    const body: Record<string, unknown> = {
      model: this.modelFor(first.request),
      prompt: several ? items.map((i) => i.payload.prompt) : first.payload.prompt,
      ...first.payload.params,
    };
    // The usage of a prompt list is one sum; token ids tell each prompt's share.
    if (several) body["return_token_ids"] = true;
    const answer = await this.http.postJson("/v1/completions", body, { signal, weight: items.length, headers: traceHeaders(first.request) });
    const choices = choicesOf(answer, "/v1/completions");
    const usages = several ? itemUsages(items, choices, answer) : [usageOf(isRecord(answer) ? answer["usage"] : undefined)];
    return items.map((item, i) => {
      const choice = choices.get(i);
      const text = choice?.["text"];
      if (typeof text !== "string") {
        return { ok: false, error: { code: "INTERNAL", message: `vLLM returned no completion for request '${item.request.id}'` } };
      }
      return answerOf(item.request, text, choice?.["finish_reason"], usages[i] ?? { prompt_tokens: 0, completion_tokens: 0 });
    });
  }

  private async chatCall(items: readonly PreparedItem<VllmPayload>[], signal: AbortSignal): Promise<EngineItemResult[]> {
    const item = items[0];
    if (!item) return [];
    const body = { model: this.modelFor(item.request), messages: [{ role: "user", content: item.payload.prompt }], ...item.payload.params };
    const answer = await this.http.postJson("/v1/chat/completions", body, { signal, headers: traceHeaders(item.request) });
    const choice = choicesOf(answer, "/v1/chat/completions").get(0);
    const message = choice?.["message"];
    if (!isRecord(message)) {
      return [{ ok: false, error: { code: "INTERNAL", message: `vLLM returned no message for request '${item.request.id}'` } }];
    }
    const content = message["content"];
    const text = typeof content === "string" ? content : "";
    return [answerOf(item.request, text, choice?.["finish_reason"], usageOf(isRecord(answer) ? answer["usage"] : undefined))];
  }

  private async *stream(
    request: EngineRequest,
    signal: AbortSignal,
    usage: EngineUsage,
    state: { finish: string | undefined },
  ): AsyncGenerator<EngineToken, void, undefined> {
    const { prompt, params } = this.generationPayload(request, signal);
    const path = this.chat ? "/v1/chat/completions" : "/v1/completions";
    const body: Record<string, unknown> = this.chat
      ? { model: this.modelFor(request), messages: [{ role: "user", content: prompt }], ...params }
      : { model: this.modelFor(request), prompt, ...params };
    body["stream"] = true;
    body["stream_options"] = { include_usage: true };

    let done = false;
    let reported = false;
    let pieces = 0;
    for await (const data of this.http.postEvents(path, body, { signal, headers: traceHeaders(request) })) {
      if (data === "[DONE]") {
        done = true;
        break;
      }
      const event = parseJson(data, `vLLM POST ${path}: malformed stream event`);
      if (!isRecord(event)) continue;
      const failure = streamError(event, path);
      if (failure) throw failure;
      if (isRecord(event["usage"])) {
        reported = true;
        usage.prompt_tokens = tokenCount(event["usage"]["prompt_tokens"]);
        usage.completion_tokens = tokenCount(event["usage"]["completion_tokens"]);
      }
      const choices = event["choices"];
      if (!Array.isArray(choices)) continue;
      for (const choice of choices) {
        if (!isRecord(choice) || (choice["index"] ?? 0) !== 0) continue;
        const delta = choice["delta"];
        const text = this.chat ? (isRecord(delta) ? delta["content"] : undefined) : choice["text"];
        const finish = choice["finish_reason"];
        if (typeof finish === "string") {
          state.finish = finish;
          const refused = finishError(request, finish);
          if (refused) throw new EngineError(refused.code, refused.message);
        }
        if (typeof text === "string" && text !== "") {
          pieces++;
          if (!reported) usage.completion_tokens = pieces;
          yield { text };
        }
      }
    }
    if (!done) throw new EngineError("UNAVAILABLE", `vLLM POST ${path}: the stream ended before [DONE]`);
  }
}

function textOnly(request: EngineRequest): string | undefined {
  if (request.inputs !== undefined) {
    return `request '${request.id}': this engine serves text; 'inputs' is not supported, send 'prompt'`;
  }
  if (request.prompt === undefined || request.prompt === "") return `request '${request.id}' has no prompt`;
  return undefined;
}

function traceHeaders(request: EngineRequest): Record<string, string> {
  // vLLM joins the caller's trace when it runs with --otlp-traces-endpoint.
  return request.traceparent ? { traceparent: request.traceparent } : {};
}

/** The choices of an answer by index. */
function choicesOf(answer: unknown, path: string): Map<number, Record<string, unknown>> {
  const choices = isRecord(answer) ? answer["choices"] : undefined;
  if (!Array.isArray(choices)) throw new EngineError("INTERNAL", `vLLM POST ${path}: answer has no choices`);
  const byIndex = new Map<number, Record<string, unknown>>();
  for (const choice of choices) {
    if (isRecord(choice) && typeof choice["index"] === "number" && Number.isInteger(choice["index"])) byIndex.set(choice["index"], choice);
  }
  return byIndex;
}

function usageOf(value: unknown): EngineUsage {
  if (!isRecord(value)) return { prompt_tokens: 0, completion_tokens: 0 };
  return { prompt_tokens: tokenCount(value["prompt_tokens"]), completion_tokens: tokenCount(value["completion_tokens"]) };
}

/**
 * Each item's usage in a prompt-list answer: from the choices' token ids when the server sent
 * them, else the summed usage split in proportion to the prompt and output lengths (an
 * estimate, for servers older than `return_token_ids`).
 */
function itemUsages(items: readonly PreparedItem<VllmPayload>[], choices: Map<number, Record<string, unknown>>, answer: unknown): EngineUsage[] {
  const exact = items.map((_, i) => {
    const c = choices.get(i);
    const promptIds = c?.["prompt_token_ids"];
    const outputIds = c?.["token_ids"];
    return Array.isArray(promptIds) && Array.isArray(outputIds) ? { prompt_tokens: promptIds.length, completion_tokens: outputIds.length } : undefined;
  });
  if (exact.every((u): u is EngineUsage => u !== undefined)) return exact;
  const total = usageOf(isRecord(answer) ? answer["usage"] : undefined);
  const prompts = apportion(total.prompt_tokens, items.map((i) => i.payload.prompt.length));
  const outputs = apportion(
    total.completion_tokens,
    items.map((_, i) => {
      const text = choices.get(i)?.["text"];
      return typeof text === "string" ? text.length : 0;
    }),
  );
  return items.map((_, i) => ({ prompt_tokens: prompts[i] ?? 0, completion_tokens: outputs[i] ?? 0 }));
}

/** A finish reason that means the request did not complete. */
function finishError(request: EngineRequest, finish: unknown): EngineItemError | undefined {
  if (finish === "abort") return { code: "UNAVAILABLE", message: `vLLM aborted request '${request.id}'` };
  if (finish === "error") return { code: "INTERNAL", message: `vLLM failed request '${request.id}'` };
  return undefined;
}

function answerOf(request: EngineRequest, text: string, finish: unknown, usage: EngineUsage): EngineItemResult {
  const failed = finishError(request, finish);
  if (failed) return { ok: false, error: failed };
  return {
    ok: true,
    output: typeof finish === "string" ? { text, data: { finish_reason: finish } } : { text },
    usage,
  };
}

/** The error an event of a stream carries, in either of vLLM's error bodies. */
function streamError(event: Record<string, unknown>, path: string): EngineError | undefined {
  const nested = event["error"];
  const body = isRecord(nested) ? nested : event["object"] === "error" ? event : undefined;
  if (!body) return undefined;
  const status = typeof body["code"] === "number" ? body["code"] : 500;
  const message = typeof body["message"] === "string" ? body["message"] : "error";
  return new HttpStatusError(errorCodeForStatus(status), status, `vLLM POST ${path}: error in the stream (${status}): ${message}`);
}
