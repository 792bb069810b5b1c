/**
 * The HTTP side of an engine adapter: one client per server, with a bound on the calls in flight
 * ({@link Slots}), timeouts, health checks, JSON calls and event streams.
 */
import { EngineClosedError, EngineError } from "../engine.js";
import { abortReason, describeNetworkError, HttpStatusError, errorDetail, errorCodeForStatus } from "./errors.js";
import { positiveInteger, positiveNumber } from "./batch.js";
import { SseDecoder } from "./sse.js";

/** Longest wait for an answer (for a stream: for the answer and between chunks), by default. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 120_000;
/** Longest wait for a health check. */
const DEFAULT_HEALTH_TIMEOUT_MS = 2_000;
/**
 * Counts items in flight: `acquire(n)` waits (first come, first served) until `n` slots are
 * free. Waiting ends early when the signal aborts.
 */
class Slots {
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
    const { what, ex, res, end } = await this.openPost(path, body, opts);
    try {
      return parseJson(await res.text(), `${what}: malformed answer`);
    } catch (err) {
      throw ex.failure(err);
    } finally {
      end();
    }
  }

  /**
   * POSTs JSON and yields the `data` of each server-sent event of the answer. Leaving the loop
   * early drops the connection at once.
   */
  async *postEvents(path: string, body: unknown, opts: HttpCallOptions): AsyncGenerator<string, void, undefined> {
    const { what, ex, res, end } = await this.openPost(path, body, opts);
    try {
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
      end();
    }
  }

  /**
   * Takes the call's slots and POSTs; resolves with a 2xx answer to read, or rejects with an
   * {@link EngineError} (slots given back). The caller calls `end()` once it has read the answer.
   */
  private async openPost(path: string, body: unknown, opts: HttpCallOptions): Promise<{ what: string; ex: Exchange; res: Response; end: () => void }> {
    const what = `${this.label} POST ${path}`;
    const ex = this.exchange(what, opts.signal, this.requestTimeoutMs);
    let release: (() => void) | undefined;
    const end = (): void => {
      ex.dispose();
      release?.();
    };
    try {
      release = await this.slots.acquire(opts.weight ?? 1, ex.signal);
      ex.arm();
      const res = await fetch(this.baseUrl + path, this.init("POST", body, opts.headers, ex.signal));
      if (!res.ok) throw statusError(what, res.status, res.statusText, await res.text());
      return { what, ex, res, end };
    } catch (err) {
      const failure = ex.failure(err);
      end();
      throw failure;
    }
  }

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

  /** GETs a path; resolves with the status and body, or rejects as {@link postJson} does. */
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

export function parseJson(text: string, what: string): unknown {
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
