/**
 * Callbacks: the answer of an async request POSTed to its `callback_url`, signed, and retried
 * with a growing delay (the shared backoff, with jitter) until the receiver answers 2xx, for at most
 * `callbackMaxAttempts` deliveries. A 4xx other than 408 and 429 is final.
 *
 * Signature (as Stripe's): header `X-Sluice-Signature: t=<unix seconds>,v1=<hex>` where hex is
 * HMAC-SHA256 with the gateway's `callbackSecret` over `<t>.<body>`. The receiver recomputes it
 * and compares in constant time; `t` lets it refuse old replays. Every delivery of one callback
 * carries the same `X-Request-Id` and body, so a receiver de-duplicates on the id.
 *
 * Pending callbacks live in the gateway process that accepted the request: a gateway stopped
 * before the result arrives loses them (the result stays readable with GET /v1/requests/{id}).
 */
import { createHmac, timingSafeEqual } from "node:crypto";
import { backoffMs } from "../../operators/support/backoff.js";
import type { GatewaySettings } from "./config.js";
import { HttpError } from "./errors.js";
import type { HttpAnswer } from "./present.js";

export const SIGNATURE_HEADER = "x-sluice-signature";
export const STATUS_HEADER = "x-sluice-status";
export const ATTEMPT_HEADER = "x-sluice-attempt";

/** `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`. */
export function signCallback(secret: string, body: string, unixSeconds = Math.floor(Date.now() / 1000)): string {
  const mac = createHmac("sha256", secret).update(`${unixSeconds}.${body}`).digest("hex");
  return `t=${unixSeconds},v1=${mac}`;
}

/** Checks a signature header against the body (for receivers, and the tests). */
export function verifyCallback(secret: string, body: string, header: string | undefined): boolean {
  const m = /^t=(\d+),v1=([0-9a-f]{64})$/.exec(header ?? "");
  if (!m) return false;
  const want = Buffer.from(createHmac("sha256", secret).update(`${m[1]}.${body}`).digest("hex"));
  const got = Buffer.from(m[2]!);
  return want.length === got.length && timingSafeEqual(want, got);
}

/** Delay before delivery `attempt` (2, 3, …): the shared backoff, base · 2^(attempt-2) capped, plus jitter. */
export function callbackDelayMs(attempt: number, baseMs: number, maxMs: number, random: () => number = Math.random): number {
  return backoffMs(attempt - 2, { baseMs, maxMs }, random);
}

/** A callback's URL, checked: http or https only. */
export function parseCallbackUrl(v: unknown): string {
  if (typeof v !== "string") throw new HttpError("INVALID_ARGUMENT", "'callback_url' must be a string", "callback_url");
  let u: URL;
  try {
    u = new URL(v);
  } catch {
    throw new HttpError("INVALID_ARGUMENT", `'callback_url' is not a URL: '${v.slice(0, 100)}'`, "callback_url");
  }
  if (u.protocol !== "http:" && u.protocol !== "https:") throw new HttpError("INVALID_ARGUMENT", "'callback_url' must be http or https", "callback_url");
  return u.href;
}

export interface CallbackOutcome {
  delivered: boolean;
  attempts: number;
}

export class Callbacks {
  private readonly pending = new Set<Promise<void>>();
  private readonly stopping = new AbortController();

  constructor(
    private readonly s: GatewaySettings,
    private readonly onOutcome: (o: CallbackOutcome) => void = () => undefined,
    private readonly onError: (message: string) => void = () => undefined,
  ) {}

  get size(): number {
    return this.pending.size;
  }

  /** Refuses (503) when callbacks cannot be taken: no secret, or too many pending. */
  checkAccepting(): void {
    if (!this.s.callbackSecret) throw new HttpError("INVALID_ARGUMENT", "this gateway has no callback secret (gateway.callbackSecret): callback_url is not available", "callback_url");
    if (this.stopping.signal.aborted) throw new HttpError("UNAVAILABLE", "the gateway is stopping");
    if (this.pending.size >= this.s.maxPendingCallbacks) throw new HttpError("UNAVAILABLE", `too many pending callbacks (${this.s.maxPendingCallbacks})`);
  }

  /** Waits for `answer` (the request's result), then delivers it to `url`. Never rejects. */
  schedule(url: string, id: string, answer: (signal: AbortSignal) => Promise<HttpAnswer>): void {
    const p = (async () => {
      try {
        const a = await answer(this.stopping.signal);
        this.onOutcome(await this.deliver(url, id, a));
      } catch (err) {
        if (!this.stopping.signal.aborted) this.onError(`callback for '${id}' not sent: ${(err as Error).message}`);
        this.onOutcome({ delivered: false, attempts: 0 });
      }
    })().finally(() => this.pending.delete(p));
    this.pending.add(p);
  }

  private async deliver(url: string, id: string, a: HttpAnswer): Promise<CallbackOutcome> {
    const body = JSON.stringify(a.body);
    for (let attempt = 1; attempt <= this.s.callbackMaxAttempts; attempt++) {
      if (attempt > 1) await this.sleep(callbackDelayMs(attempt, this.s.callbackRetryBaseMs, this.s.callbackRetryMaxMs));
      if (this.stopping.signal.aborted) return { delivered: false, attempts: attempt - 1 };
      try {
        const res = await fetch(url, {
          method: "POST",
          headers: {
            "content-type": "application/json",
            "x-request-id": id,
            [STATUS_HEADER]: String(a.status),
            [ATTEMPT_HEADER]: String(attempt),
            [SIGNATURE_HEADER]: signCallback(this.s.callbackSecret, body),
          },
          body,
          signal: AbortSignal.any([this.stopping.signal, AbortSignal.timeout(this.s.callbackTimeoutMs)]),
        });
        await res.arrayBuffer().catch(() => undefined);
        if (res.ok) return { delivered: true, attempts: attempt };
        if (res.status >= 400 && res.status < 500 && res.status !== 408 && res.status !== 429) {
          this.onError(`callback for '${id}' refused by ${url}: HTTP ${res.status}`);
          return { delivered: false, attempts: attempt };
        }
      } catch {
        // Not reached, or no answer in time: try again.
      }
    }
    this.onError(`callback for '${id}' not delivered to ${url} after ${this.s.callbackMaxAttempts} attempts`);
    return { delivered: false, attempts: this.s.callbackMaxAttempts };
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(done, ms);
      const signal = this.stopping.signal;
      function done(): void {
        clearTimeout(t);
        signal.removeEventListener("abort", done);
        resolve();
      }
      signal.addEventListener("abort", done, { once: true });
    });
  }

  /** Waits up to `graceMs` for pending callbacks, then abandons the rest. Safe to call twice. */
  async stop(graceMs: number): Promise<void> {
    if (this.pending.size > 0 && graceMs > 0) {
      let t: NodeJS.Timeout | undefined;
      await Promise.race([Promise.all(this.pending), new Promise((r) => (t = setTimeout(r, graceMs)))]);
      clearTimeout(t);
    }
    this.stopping.abort();
    await Promise.all(this.pending);
  }
}
