/** A gateway, a pipeline and simulated workers against a test nats-server, and an OpenAI SDK client. */
import OpenAI from "openai";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { hashApiKey } from "../../pipeline/gateway/auth.js";
import type { GatewaySettings } from "../../pipeline/gateway/config.js";
import { Gateway } from "../../pipeline/gateway/server.js";
import type { Tracing } from "../../pipeline/telemetry/mod.js";

export const KEYS = { acme: "sk-test-acme", other: "sk-test-other", limited: "sk-test-limited" } as const;
export const CALLBACK_SECRET = "test-callback-secret";

export async function startGateway(url: string, settings: Partial<GatewaySettings> = {}, tracing?: Tracing): Promise<{ gw: Gateway; nc: NatsConnection }> {
  const nc = await connect({ servers: url, name: "sluice-test-gateway" });
  const gw = await Gateway.start({
    nc,
    ...(tracing ? { tracing } : {}),
    settings: {
      host: "127.0.0.1",
      port: 0,
      apiKeys: Object.fromEntries(Object.entries(KEYS).map(([tenant, key]) => [hashApiKey(key), tenant])),
      callbackSecret: CALLBACK_SECRET,
      callbackRetryBaseMs: 10,
      callbackRetryMaxMs: 50,
      drainMs: 500,
      ...settings,
    },
    onError: () => undefined,
  });
  return { gw, nc };
}

export function sdk(gw: Gateway, key: string = KEYS.acme): OpenAI {
  return new OpenAI({ apiKey: key, baseURL: gw.baseUrl, maxRetries: 0 });
}

/** A POST with fetch, for what the SDK would not send (bad JSON, odd headers). */
export async function post(gw: Gateway, path: string, body: string | object, headers: Record<string, string> = {}, key: string = KEYS.acme): Promise<Response> {
  return fetch(`${gw.baseUrl}${path}`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}
