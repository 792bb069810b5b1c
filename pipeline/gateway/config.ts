/**
 * The gateway's settings (section `gateway` of the configuration file), with a named default for
 * each tunable.
 */

export interface GatewaySettings {
  /** HTTP port; 0 picks a free one. */
  port: number;
  host: string;
  /** Requests held open at once; beyond it the gateway answers 503 at once. */
  maxOpenRequests: number;
  /** Largest request body accepted; a larger one gets 413. */
  maxBodyBytes: number;
  /** How long a request waits for its result when it names no timeout (X-Sluice-Timeout-Ms). */
  defaultTimeoutMs: number;
  /** Longest X-Sluice-Timeout-Ms accepted. */
  maxTimeoutMs: number;
  /** API keys by the hex SHA-256 of the key: `{ "<sha256 hex>": "<tenant>" }`. Never keys in the clear. */
  apiKeys: Record<string, string>;
  /** Also look keys up in the KV bucket `infer_api_keys` (key: SHA-256 hex, value `{"tenant": …}`). */
  apiKeysBucket: boolean;
  /** Secret that signs callbacks (HMAC-SHA256); without one, `callback_url` is refused. */
  callbackSecret: string;
  /** Deliveries of one callback before it is given up. */
  callbackMaxAttempts: number;
  /** First delay between callback deliveries; doubles each time, with jitter. */
  callbackRetryBaseMs: number;
  callbackRetryMaxMs: number;
  /** Time for one callback delivery. */
  callbackTimeoutMs: number;
  /** Callbacks waiting for their result or their delivery at once; beyond it callback_url gets 503. */
  maxPendingCallbacks: number;
  /** How long an async request's record is kept (GET /v1/requests/{id}). */
  asyncRecordTtlMs: number;
  /** `Retry-After` seconds of a 429. */
  retryAfterSeconds: number;
  /** On stop (SIGTERM), how long open requests may finish before their connections are closed. */
  drainMs: number;
}

export const DEFAULT_GATEWAY_PORT = 8080;

export function defaultGatewaySettings(): GatewaySettings {
  return {
    port: DEFAULT_GATEWAY_PORT,
    host: "0.0.0.0",
    maxOpenRequests: 4096,
    maxBodyBytes: 1024 * 1024,
    defaultTimeoutMs: 60_000,
    maxTimeoutMs: 10 * 60_000,
    apiKeys: {},
    apiKeysBucket: true,
    callbackSecret: "",
    callbackMaxAttempts: 6,
    callbackRetryBaseMs: 500,
    callbackRetryMaxMs: 30_000,
    callbackTimeoutMs: 10_000,
    maxPendingCallbacks: 10_000,
    asyncRecordTtlMs: 24 * 60 * 60_000,
    retryAfterSeconds: 1,
    drainMs: 10_000,
  };
}

/** Throws an Error saying what is wrong with the settings. */
export function validateGatewaySettings(g: GatewaySettings): void {
  const int = (v: number, name: string, min: number): void => {
    if (!Number.isInteger(v) || v < min) throw new Error(`gateway.${name} must be an integer >= ${min}, got ${v}`);
  };
  int(g.port, "port", 0);
  if (g.port > 65535) throw new Error(`gateway.port must be a port, got ${g.port}`);
  int(g.maxOpenRequests, "maxOpenRequests", 1);
  int(g.maxBodyBytes, "maxBodyBytes", 1);
  int(g.defaultTimeoutMs, "defaultTimeoutMs", 1);
  int(g.maxTimeoutMs, "maxTimeoutMs", 1);
  int(g.callbackMaxAttempts, "callbackMaxAttempts", 1);
  int(g.callbackRetryBaseMs, "callbackRetryBaseMs", 0);
  int(g.callbackRetryMaxMs, "callbackRetryMaxMs", 0);
  int(g.callbackTimeoutMs, "callbackTimeoutMs", 1);
  int(g.maxPendingCallbacks, "maxPendingCallbacks", 1);
  int(g.asyncRecordTtlMs, "asyncRecordTtlMs", 1000);
  int(g.retryAfterSeconds, "retryAfterSeconds", 0);
  int(g.drainMs, "drainMs", 0);
  for (const [hash, tenant] of Object.entries(g.apiKeys)) {
    if (!/^[0-9a-f]{64}$/.test(hash)) throw new Error(`gateway.apiKeys: '${hash.slice(0, 12)}…' is not a SHA-256 hex digest (store hashes, never keys)`);
    if (typeof tenant !== "string" || !/^[a-z0-9_-]{1,64}$/.test(tenant)) throw new Error(`gateway.apiKeys: tenant '${String(tenant)}' must be 1-64 of a-z 0-9 _ -`);
  }
}
