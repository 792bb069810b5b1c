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
import type { ErrorCode } from "../../proto/wire.js";
import {
  EngineClosedError,
  EngineError,
  type Engine,
  type EngineBatch,
  type EngineGeneration,
  type EngineItemError,
  type EngineItemResult,
  type EngineRequest,
  type EngineToken,
  type EngineUsage,
} from "../engine.js";

/** Items in flight to the server at once, by default. */
export const DEFAULT_VLLM_CAPACITY = 64;
/** Longest wait for an answer (for a stream: for the answer and between chunks), by default. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 120_000;
/** Longest wait for a health check. */
export const DEFAULT_HEALTH_TIMEOUT_MS = 2_000;
/** Longest piece of a server's error body quoted in an error message. */
export const MAX_ERROR_DETAIL_CHARS = 500;

// ---------------------------------------------------------------------------------------------
// HTTP plumbing shared with the DeepSpeed-MII adapter.
// ---------------------------------------------------------------------------------------------

/** The server answered with an HTTP error status. */
export class HttpStatusError extends EngineError {
  override readonly name: string = "HttpStatusError";
  constructor(
    code: ErrorCode,
    readonly status: number,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
  }
}

/** The error code an HTTP error status maps to (see the module comment for why). */
export function errorCodeForStatus(status: number): ErrorCode {
  switch (status) {
    case 400:
    case 413:
    case 422:
      return "INVALID_ARGUMENT";
    case 404:
      return "NOT_FOUND";
    case 408:
    case 429:
    case 502:
    case 503:
    case 504:
      return "UNAVAILABLE";
    default:
      return "INTERNAL";
  }
}

/**
 * The message in an error body: vLLM's `{"error": {"message"}}` or older
 * `{"object": "error", "message"}`, Flask's `{"message"}`, FastAPI's `{"detail"}`, an HTML
 * error page's text, or the text itself; clipped to {@link MAX_ERROR_DETAIL_CHARS}.
 */
export function errorDetail(body: string): string {
  const trimmed = body.trim();
  if (trimmed === "") return "";
  let parsed: unknown;
  try {
    parsed = JSON.parse(trimmed);
  } catch {
    parsed = undefined;
  }
  const fromJson = parsed === undefined ? undefined : messageOf(parsed);
  const text = fromJson ?? trimmed.replace(/<[^>]*>/g, " ");
  const oneLine = text.replace(/\s+/g, " ").trim();
  return oneLine.length > MAX_ERROR_DETAIL_CHARS ? `${oneLine.slice(0, MAX_ERROR_DETAIL_CHARS)}...` : oneLine;
}

function messageOf(value: unknown): string | undefined {
  if (typeof value === "string") return value;
  if (!isRecord(value)) return undefined;
  const error = value["error"];
  if (isRecord(error) && typeof error["message"] === "string") return error["message"];
  if (typeof error === "string") return error;
  if (typeof value["message"] === "string") return value["message"];
  const detail = value["detail"];
  if (typeof detail === "string") return detail;
  if (detail !== undefined) return JSON.stringify(detail);
  return undefined;
}

/** The reason a signal was aborted with, as an Error (AbortSignal allows any value). */
export function abortReason(signal: AbortSignal): Error {
  const reason: unknown = signal.reason;
  return reason instanceof Error ? reason : new EngineError("CANCELLED", `aborted: ${String(reason)}`, { cause: reason });
}

/** A network error with its causes, e.g. `fetch failed: connect ECONNREFUSED 127.0.0.1:9 (ECONNREFUSED)`. */
function describeNetworkError(err: unknown): string {
  const parts: string[] = [];
  let e: unknown = err;
  for (let depth = 0; depth < 4 && e !== undefined && e !== null; depth++) {
    if (e instanceof Error) {
      const code = (e as { code?: unknown }).code;
      parts.push(typeof code === "string" && !e.message.includes(code) ? `${e.message} (${code})` : e.message);
      e = e.cause;
    } else {
      parts.push(typeof e === "string" ? e : JSON.stringify(e));
      break;
    }
  }
  return parts.join(": ");
}

/**
 * Counts items in flight: `acquire(n)` waits (first come, first served) until `n` slots are
 * free. Waiting ends early when the signal aborts.
 */
export class Slots {
  private free: number;
  private readonly waiting: Array<{ n: number; grant: () => void }> = [];

  constructor(readonly capacity: number) {
    this.free = capacity;
  }

  /** Slots in use. */
  get used(): number {
    return this.capacity - this.free;
  }

  /** Resolves with a release function (safe to call twice) once `n` slots are free. */
  acquire(n: number, signal: AbortSignal): Promise<() => void> {
    const want = Math.min(Math.max(1, n), this.capacity);
    if (signal.aborted) return Promise.reject(abortReason(signal));
    const release = this.releaser(want);
    if (this.waiting.length === 0 && this.free >= want) {
      this.free -= want;
      return Promise.resolve(release);
    }
    return new Promise<() => void>((resolve, reject) => {
      const entry = {
        n: want,
        grant: (): void => {
          signal.removeEventListener("abort", onAbort);
          resolve(release);
        },
      };
      const onAbort = (): void => {
        const at = this.waiting.indexOf(entry);
        if (at >= 0) this.waiting.splice(at, 1);
        reject(abortReason(signal));
        // The head may have been what kept smaller requests behind it waiting.
        this.grant();
      };
      signal.addEventListener("abort", onAbort, { once: true });
      this.waiting.push(entry);
    });
  }

  private releaser(n: number): () => void {
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.free += n;
      this.grant();
    };
  }

  private grant(): void {
    for (let head = this.waiting[0]; head && head.n <= this.free; head = this.waiting[0]) {
      this.waiting.shift();
      this.free -= head.n;
      head.grant();
    }
  }
}

type StopWhy = "caller" | "closed" | "timeout";

/**
 * One HTTP exchange: aborted at once when the caller's signal aborts, when the engine closes,
 * or when its timer runs out; {@link failure} turns whatever was thrown into the error to
 * report.
 */
class Exchange {
  private readonly controller = new AbortController();
  private why: StopWhy | undefined;
  private timer: NodeJS.Timeout | undefined;
  private readonly onCaller = (): void => this.stop("caller");
  private readonly onClosing = (): void => this.stop("closed");

  constructor(
    private readonly what: string,
    private readonly caller: AbortSignal,
    private readonly closing: AbortSignal,
    private readonly timeoutMs: number,
  ) {
    if (caller.aborted) this.stop("caller");
    else if (closing.aborted) this.stop("closed");
    caller.addEventListener("abort", this.onCaller, { once: true });
    closing.addEventListener("abort", this.onClosing, { once: true });
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** (Re)starts the timer. */
  arm(): void {
    this.disarm();
    if (this.why !== undefined) return;
    this.timer = setTimeout(() => this.stop("timeout"), this.timeoutMs);
    this.timer.unref();
  }

  disarm(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  /** The error to report for `err`, thrown while the exchange ran. */
  failure(err: unknown): Error {
    switch (this.why) {
      case "caller":
        return abortReason(this.caller);
      case "closed":
        return new EngineClosedError();
      case "timeout":
        return new EngineError("DEADLINE_EXCEEDED", `${this.what}: no answer within ${this.timeoutMs} ms`, { cause: err });
      case undefined:
        if (err instanceof EngineError) return err;
        return new EngineError("UNAVAILABLE", `${this.what}: ${describeNetworkError(err)}`, { cause: err });
    }
  }

  /** Ends the exchange; a response still being received is dropped. */
  dispose(): void {
    this.disarm();
    this.caller.removeEventListener("abort", this.onCaller);
    this.closing.removeEventListener("abort", this.onClosing);
    // A no-op once the body has been read; otherwise it closes the connection.
    this.controller.abort(new Error(`${this.what}: exchange finished`));
  }

  private stop(why: StopWhy): void {
    if (this.why !== undefined || this.controller.signal.aborted) return;
    this.why = why;
    this.disarm();
    this.controller.abort(new Error(`${this.what}: ${why}`));
  }
}

export interface HttpEngineClientOptions {
  /** Names the server in error messages, e.g. `vLLM`. */
  readonly label: string;
  /** `http(s)://host:port`, optionally with a path prefix; no trailing slash needed. */
  readonly baseUrl: string;
  /** Sent with every request (for example `Authorization`). */
  readonly headers?: Readonly<Record<string, string>>;
  /** Items in flight at once. */
  readonly capacity: number;
  readonly requestTimeoutMs: number;
}

export interface HttpCallOptions {
  readonly signal: AbortSignal;
  /** Items this call carries: slots it holds while it runs. */
  readonly weight?: number;
  /** Extra headers of this call. */
  readonly headers?: Readonly<Record<string, string>>;
}

/** JSON over HTTP to one inference server, bounded in concurrency and time. */
export class HttpEngineClient {
  readonly label: string;
  readonly baseUrl: string;
  readonly capacity: number;
  readonly requestTimeoutMs: number;
  private readonly headers: Readonly<Record<string, string>>;
  private readonly slots: Slots;
  /** Aborted by close(): ends every exchange and every wait for a slot. */
  private readonly closing = new AbortController();

  constructor(opts: HttpEngineClientOptions) {
    this.label = opts.label;
    this.baseUrl = normalizeBaseUrl(opts.baseUrl);
    this.capacity = positiveInteger("capacity", opts.capacity);
    this.requestTimeoutMs = positiveNumber("requestTimeoutMs", opts.requestTimeoutMs);
    this.headers = { ...opts.headers };
    this.slots = new Slots(this.capacity);
  }

  get closed(): boolean {
    return this.closing.signal.aborted;
  }

  /** Items in flight now. */
  get inFlight(): number {
    return this.slots.used;
  }

  /** Ends every exchange in flight and every wait; later calls fail. Safe to call twice. */
  close(): void {
    if (!this.closed) this.closing.abort(new EngineClosedError());
  }

  /** POSTs JSON and resolves with the JSON of a 2xx answer; rejects with an {@link EngineError}. */
  async postJson(path: string, body: unknown, opts: HttpCallOptions): Promise<unknown> {
    const what = `${this.label} POST ${path}`;
    const ex = this.exchange(what, opts.signal, this.requestTimeoutMs);
    let release: (() => void) | undefined;
    try {
      release = await this.slots.acquire(opts.weight ?? 1, ex.signal);
      ex.arm();
      const res = await fetch(this.baseUrl + path, this.init("POST", body, opts.headers, ex.signal));
      const text = await res.text();
      if (!res.ok) throw statusError(what, res.status, res.statusText, text);
      return parseJson(text, `${what}: malformed answer`);
    } catch (err) {
      throw ex.failure(err);
    } finally {
      ex.dispose();
      release?.();
    }
  }

  /**
   * POSTs JSON and yields the `data` of each server-sent event of the answer. Leaving the loop
   * early drops the connection at once.
   */
  async *postEvents(path: string, body: unknown, opts: HttpCallOptions): AsyncGenerator<string, void, undefined> {
    const what = `${this.label} POST ${path}`;
    const ex = this.exchange(what, opts.signal, this.requestTimeoutMs);
    let release: (() => void) | undefined;
    try {
      release = await this.slots.acquire(opts.weight ?? 1, ex.signal);
      ex.arm();
      const res = await fetch(this.baseUrl + path, this.init("POST", body, opts.headers, ex.signal));
      if (!res.ok) throw statusError(what, res.status, res.statusText, await res.text());
      if (!res.body) throw new EngineError("INTERNAL", `${what}: answer has no body`);
      const reader = res.body.getReader();
      const decoder = new SseDecoder();
      for (;;) {
        ex.arm();
        const { done, value } = await reader.read();
        // The consumer may take its time with a chunk: that is not the server being slow.
        ex.disarm();
        if (done) break;
        for (const data of decoder.push(value)) yield data;
      }
      for (const data of decoder.end()) yield data;
    } catch (err) {
      throw ex.failure(err);
    } finally {
      ex.dispose();
      release?.();
    }
  }

  /** GETs a path; resolves with the status and body, or rejects as {@link postJson} does. */
  /** Whether `GET path` answers 200 (false too when the server cannot be reached). */
  async healthy(path: string, signal?: AbortSignal): Promise<boolean> {
    try {
      const { status } = await this.get(path, { timeoutMs: DEFAULT_HEALTH_TIMEOUT_MS, ...(signal ? { signal } : {}) });
      return status === 200;
    } catch (err) {
      if (signal?.aborted) throw err;
      return false;
    }
  }

  async get(path: string, opts: { signal?: AbortSignal; timeoutMs?: number } = {}): Promise<{ status: number; body: string }> {
    const what = `${this.label} GET ${path}`;
    const ex = this.exchange(what, opts.signal ?? new AbortController().signal, opts.timeoutMs ?? this.requestTimeoutMs);
    try {
      ex.arm();
      const res = await fetch(this.baseUrl + path, { method: "GET", headers: { ...this.headers }, signal: ex.signal });
      return { status: res.status, body: await res.text() };
    } catch (err) {
      throw ex.failure(err);
    } finally {
      ex.dispose();
    }
  }

  private exchange(what: string, signal: AbortSignal, timeoutMs: number): Exchange {
    return new Exchange(what, signal, this.closing.signal, timeoutMs);
  }

  private init(method: string, body: unknown, headers: Readonly<Record<string, string>> | undefined, signal: AbortSignal): RequestInit {
    return {
      method,
      headers: { "Content-Type": "application/json", Accept: "application/json", ...this.headers, ...headers },
      body: JSON.stringify(body),
      signal,
    };
  }
}

function statusError(what: string, status: number, statusText: string, body: string): HttpStatusError {
  const detail = errorDetail(body);
  const head = `${what}: HTTP ${status}${statusText ? ` ${statusText}` : ""}`;
  return new HttpStatusError(errorCodeForStatus(status), status, detail ? `${head}: ${detail}` : head);
}

function parseJson(text: string, what: string): unknown {
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new EngineError("INTERNAL", `${what}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
}

function normalizeBaseUrl(raw: string): string {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new TypeError(`baseUrl must be an http(s) URL, got '${raw}'`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new TypeError(`baseUrl must be an http(s) URL, got '${raw}'`);
  }
  if (url.search || url.hash) throw new TypeError(`baseUrl takes no query or fragment, got '${raw}'`);
  return url.href.replace(/\/+$/, "");
}

/**
 * Decodes a `text/event-stream` body fed in arbitrary pieces: lines may end in CRLF, LF or CR
 * and be split anywhere (a UTF-8 character, a CRLF), `:` lines are comments, the fields of an
 * event end at a blank line, several `data:` lines of one event are joined with LF, and fields
 * other than `data` are ignored.
 */
export class SseDecoder {
  private readonly utf8 = new TextDecoder("utf-8");
  /** The line received so far (it has no line end yet). */
  private line = "";
  /** The previous piece ended in CR: a LF starting this one belongs to it. */
  private skipLf = false;
  private data: string[] = [];

  /** Feeds bytes; returns the data of every event they complete. */
  push(bytes: Uint8Array): string[] {
    const out: string[] = [];
    this.feed(this.utf8.decode(bytes, { stream: true }), out);
    return out;
  }

  /** The end of the stream: returns the data of an event left without its blank line, if any. */
  end(): string[] {
    const out: string[] = [];
    this.feed(this.utf8.decode(), out);
    if (this.line !== "") this.field(this.line);
    this.line = "";
    // Lenient where the format says to drop it: a server that ends right after its last
    // data line still meant it.
    if (this.data.length > 0) out.push(this.data.join("\n"));
    this.data = [];
    return out;
  }

  private feed(text: string, out: string[]): void {
    let at = 0;
    if (this.skipLf && text.length > 0) {
      if (text.charCodeAt(0) === 0x0a) at = 1;
      this.skipLf = false;
    }
    const ends = /[\r\n]/g;
    while (at < text.length) {
      ends.lastIndex = at;
      const m = ends.exec(text);
      if (!m) {
        this.line += text.slice(at);
        return;
      }
      const line = this.line + text.slice(at, m.index);
      this.line = "";
      at = m.index + 1;
      if (m[0] === "\r") {
        if (at < text.length) {
          if (text.charCodeAt(at) === 0x0a) at++;
        } else {
          this.skipLf = true;
        }
      }
      if (line === "") {
        if (this.data.length > 0) out.push(this.data.join("\n"));
        this.data = [];
      } else {
        this.field(line);
      }
    }
  }

  private field(line: string): void {
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    if (name !== "data") return;
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    this.data.push(value);
  }
}

// ---------------------------------------------------------------------------------------------
// Parameters.
// ---------------------------------------------------------------------------------------------

/**
 * Checks one parameter and writes what it becomes into the request body; returns what is wrong
 * with it, or undefined.
 */
export type ParameterRule = (name: string, value: unknown, body: Record<string, unknown>) => string | undefined;

/** Checks request parameters against `rules` and maps them to body fields. */
export function mapParameters(
  parameters: Readonly<Record<string, unknown>> | undefined,
  rules: Readonly<Record<string, ParameterRule>>,
  server: string,
): { ok: true; body: Record<string, unknown> } | { ok: false; message: string } {
  const body: Record<string, unknown> = {};
  if (!parameters) return { ok: true, body };
  for (const [name, value] of Object.entries(parameters)) {
    const rule = Object.hasOwn(rules, name) ? rules[name] : undefined;
    if (!rule) {
      return { ok: false, message: `parameter '${name}' is not supported by ${server} (supported: ${Object.keys(rules).join(", ")})` };
    }
    // null reads as "the server's default", as leaving it out does.
    if (value === null || value === undefined) continue;
    const problem = rule(name, value, body);
    if (problem !== undefined) return { ok: false, message: `parameter '${name}' ${problem}` };
  }
  return { ok: true, body };
}

/** An integer, >= `min` when given, written as `to`. */
export function integerParameter(min?: number, to?: string): ParameterRule {
  const wanted = min === undefined ? "an integer" : `an integer >= ${min}`;
  return (name, value, body) => {
    if (typeof value !== "number" || !Number.isSafeInteger(value) || (min !== undefined && value < min)) {
      return `must be ${wanted}, got ${JSON.stringify(value)}`;
    }
    body[to ?? name] = value;
    return undefined;
  };
}

/** A finite number in a range, written as `to`. */
export function numberParameter(range: { min?: number; minExclusive?: boolean; max?: number }, to?: string): ParameterRule {
  const { min, max, minExclusive } = range;
  const bounds: string[] = [];
  if (min !== undefined) bounds.push(`${minExclusive ? ">" : ">="} ${min}`);
  if (max !== undefined) bounds.push(`<= ${max}`);
  const wanted = bounds.length === 0 ? "a number" : `a number ${bounds.join(" and ")}`;
  return (name, value, body) => {
    const ok =
      typeof value === "number" &&
      Number.isFinite(value) &&
      (min === undefined || (minExclusive ? value > min : value >= min)) &&
      (max === undefined || value <= max);
    if (!ok) return `must be ${wanted}, got ${JSON.stringify(value)}`;
    body[to ?? name] = value;
    return undefined;
  };
}

/** A boolean, written as `to`. */
export function booleanParameter(to?: string): ParameterRule {
  return (name, value, body) => {
    if (typeof value !== "boolean") return `must be true or false, got ${JSON.stringify(value)}`;
    body[to ?? name] = value;
    return undefined;
  };
}

/** A string or a list of strings (stop sequences), written as `to`. */
export function stringsParameter(to?: string): ParameterRule {
  return (name, value, body) => {
    const ok = typeof value === "string" || (Array.isArray(value) && value.every((s) => typeof s === "string"));
    if (!ok) return `must be a string or a list of strings, got ${JSON.stringify(value)}`;
    body[to ?? name] = value;
    return undefined;
  };
}

/** Accepted only as `only` (and then not sent: it is what the server does anyway). */
export function onlyParameter(only: number | string | boolean, why: string): ParameterRule {
  return (_name, value) => (value === only ? undefined : `must be ${JSON.stringify(only)} (${why}), got ${JSON.stringify(value)}`);
}

/** `n`: each request gets one answer. */
export const ONE_ANSWER = onlyParameter(1, "one output per request");

/** vLLM's sampling parameters this adapter passes on (vLLM `CompletionRequest` field names). */
export const VLLM_PARAMETERS: Readonly<Record<string, ParameterRule>> = {
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

/** JSON of a parameter body with its keys sorted: equal parameters, equal keys. */
export function parameterKey(body: Readonly<Record<string, unknown>>): string {
  return JSON.stringify(Object.keys(body).sort().map((k) => [k, body[k]]));
}

// ---------------------------------------------------------------------------------------------
// Running a batch as HTTP calls.
// ---------------------------------------------------------------------------------------------

/** An item of a batch ready to go: its place in the batch and what its call needs of it. */
export interface PreparedItem<P> {
  readonly index: number;
  readonly request: EngineRequest;
  readonly payload: P;
}

export type Preparation<P> = { readonly ok: true; readonly payload: P; readonly key: string } | { readonly ok: false; readonly error: EngineItemError };

/** How an adapter turns a batch into calls. */
export interface BatchCalls<P> {
  /** Checks a request; items with equal keys may share one call. */
  prepare(request: EngineRequest): Preparation<P>;
  /** Most items one call carries; 1: every item alone. */
  readonly maxItemsPerCall: number;
  /** Runs one call; resolves with one result per item, in order; rejects when the call failed as a whole. */
  call(items: readonly PreparedItem<P>[], signal: AbortSignal): Promise<EngineItemResult[]>;
}

/**
 * Runs a batch as calls (see the module comment for the rules): one result per request, in
 * order; rejects with the signal's reason after an abort, {@link EngineClosedError} after
 * close, or the common error when every call failed UNAVAILABLE (or every one timed out).
 */
export async function runBatch<P>(batch: EngineBatch, signal: AbortSignal, calls: BatchCalls<P>, client: HttpEngineClient): Promise<EngineItemResult[]> {
  if (client.closed) throw new EngineClosedError();
  if (signal.aborted) throw abortReason(signal);
  const results: Array<EngineItemResult | undefined> = new Array<EngineItemResult | undefined>(batch.requests.length);
  const groups = new Map<string, PreparedItem<P>[]>();
  const startedAtMs = Date.now();
  batch.requests.forEach((request, index) => {
    if (request.deadlineMs !== undefined && request.deadlineMs > 0 && request.deadlineMs <= startedAtMs) {
      results[index] = {
        ok: false,
        notStarted: true,
        error: { code: "DEADLINE_EXCEEDED", message: `deadline passed before request '${request.id}' started` },
      };
      return;
    }
    const prepared = calls.prepare(request);
    if (!prepared.ok) {
      results[index] = { ok: false, notStarted: true, error: prepared.error };
      return;
    }
    const group = groups.get(prepared.key);
    const item = { index, request, payload: prepared.payload };
    if (group) group.push(item);
    else groups.set(prepared.key, [item]);
  });

  let answered = 0;
  const failures: EngineError[] = [];
  const run = async (items: readonly PreparedItem<P>[]): Promise<void> => {
    try {
      const out = await calls.call(items, signal);
      answered++;
      items.forEach((item, i) => {
        results[item.index] = out[i] ?? { ok: false, error: { code: "INTERNAL", message: `no result for request '${item.request.id}'` } };
      });
    } catch (err) {
      // The whole batch rejects below.
      if (signal.aborted || client.closed) return;
      const e = err instanceof EngineError ? err : new EngineError("INTERNAL", err instanceof Error ? err.message : String(err), { cause: err });
      if (items.length > 1 && e instanceof HttpStatusError && (e.code === "INVALID_ARGUMENT" || e.code === "INTERNAL")) {
        // One bad prompt fails a whole prompt list: ask again one by one, so only it fails.
        await Promise.all(items.map((item) => run([item])));
        return;
      }
      failures.push(e);
      for (const item of items) results[item.index] = { ok: false, error: { code: e.code, message: e.message } };
    }
  };
  const pending: Promise<void>[] = [];
  for (const group of groups.values()) {
    for (let at = 0; at < group.length; at += calls.maxItemsPerCall) pending.push(run(group.slice(at, at + calls.maxItemsPerCall)));
  }
  await Promise.all(pending);

  if (signal.aborted) throw abortReason(signal);
  if (client.closed) throw new EngineClosedError();
  const first = failures[0];
  if (
    first &&
    answered === 0 &&
    (first.code === "UNAVAILABLE" || first.code === "DEADLINE_EXCEEDED") &&
    failures.every((f) => f.code === first.code)
  ) {
    throw first;
  }
  return results.map(
    (r, i) => r ?? { ok: false, error: { code: "INTERNAL", message: `no result for request '${batch.requests[i]?.id ?? ""}'` } },
  );
}

/**
 * Splits `total` over `weights` in proportion, in whole numbers that add up to `total`
 * (largest remainder); equal shares when every weight is 0.
 */
export function apportion(total: number, weights: readonly number[]): number[] {
  if (weights.length === 0) return [];
  const sum = weights.reduce((a, w) => a + Math.max(0, w), 0);
  const w = sum > 0 ? weights.map((x) => Math.max(0, x)) : weights.map(() => 1);
  const wsum = sum > 0 ? sum : weights.length;
  const exact = w.map((x) => (total * x) / wsum);
  const shares = exact.map(Math.floor);
  let left = total - shares.reduce((a, s) => a + s, 0);
  const order = exact.map((x, i) => [x - Math.floor(x), i] as const).sort((a, b) => b[0] - a[0] || a[1] - b[1]);
  for (const [, i] of order) {
    if (left <= 0) break;
    shares[i] = (shares[i] ?? 0) + 1;
    left--;
  }
  return shares;
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** A token count from a usage field (absent or null: 0). */
export function tokenCount(value: unknown): number {
  return typeof value === "number" && Number.isFinite(value) && value >= 0 ? Math.floor(value) : 0;
}

function positiveInteger(name: string, value: number): number {
  if (!Number.isInteger(value) || value < 1) throw new RangeError(`${name} must be an integer >= 1, got ${value}`);
  return value;
}

function positiveNumber(name: string, value: number): number {
  if (!Number.isFinite(value) || value <= 0) throw new RangeError(`${name} must be a number > 0, got ${value}`);
  return value;
}

// ---------------------------------------------------------------------------------------------
// The vLLM engine.
// ---------------------------------------------------------------------------------------------

export interface VllmEngineOptions {
  /** Where `vllm serve` listens, e.g. `http://10.0.0.7:8000`; a trailing `/v1` is dropped. */
  readonly baseUrl: string;
  /** The model name vLLM serves (`--served-model-name`); default: the request's model. */
  readonly servedModel?: string;
  /** Sent as `Authorization: Bearer <apiKey>` (vLLM's `--api-key`). */
  readonly apiKey?: string;
  /** Use `/v1/chat/completions`, the prompt being one user message. */
  readonly chat?: boolean;
  /** Items in flight at once; default {@link DEFAULT_VLLM_CAPACITY}. */
  readonly capacity?: number;
  /** Default {@link DEFAULT_REQUEST_TIMEOUT_MS}. */
  readonly requestTimeoutMs?: number;
  /**
   * Parameters for requests that do not set them, checked like a request's. Note that vLLM's
   * completions default `max_tokens` is 16.
   */
  readonly defaultParameters?: Readonly<Record<string, unknown>>;
}

/** A generation of {@link VllmEngine}: also tells why it finished. */
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

/** A generation; `finishReason()` is the server's `finish_reason`, once it gave one. */
export type VllmGeneration = HttpGeneration;

interface VllmPayload {
  readonly prompt: string;
  readonly params: Readonly<Record<string, unknown>>;
}

export class VllmEngine implements Engine {
  readonly capacity: number;
  readonly chat: boolean;
  private readonly http: HttpEngineClient;
  private readonly servedModel: string | undefined;
  private readonly defaults: Readonly<Record<string, unknown>>;
  private readonly calls: BatchCalls<VllmPayload>;

  constructor(opts: VllmEngineOptions) {
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

  generate(request: EngineRequest, signal: AbortSignal): VllmGeneration {
    return generationOnce((usage, state) => this.stream(request, signal, usage, state));
  }

  /** Whether `GET /health` answers 200 (false too when the server cannot be reached). */
  health(signal?: AbortSignal): Promise<boolean> {
    return this.http.healthy("/health", signal);
  }

  /** Ends every call in flight (they fail with {@link EngineClosedError}). Safe to call twice. */
  async close(): Promise<void> {
    this.http.close();
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
    if (this.http.closed) throw new EngineClosedError();
    if (signal.aborted) throw abortReason(signal);
    if (request.deadlineMs !== undefined && request.deadlineMs > 0 && request.deadlineMs <= Date.now()) {
      throw new EngineError("DEADLINE_EXCEEDED", `deadline passed before request '${request.id}' started`);
    }
    const prepared = this.prepare(request);
    if (!prepared.ok) throw new EngineError(prepared.error.code, prepared.error.message);
    const { prompt, params } = prepared.payload;
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
