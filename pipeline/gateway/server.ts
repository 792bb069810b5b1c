/**
 * `sluice gateway`: an HTTP server (node:http and a small route table) that speaks OpenAI's API
 * and sluice's native one, and turns each request into sluice requests on JetStream through
 * the client library. Stateless: run as many as you like behind a load balancer.
 *
 * ```ts
 * const gw = await Gateway.start({ servers: ["nats://127.0.0.1:4222"], settings });
 * console.log(gw.baseUrl);   // http://127.0.0.1:8080/v1
 * await gw.stop();           // drains open requests first
 * ```
 *
 * Bounded: at most `maxOpenRequests` requests are held at once, beyond it the answer is 503 at
 * once. One result subscription per tenant serves all that tenant's requests.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { performance } from "node:perf_hooks";
import type { NatsConnection } from "@nats-io/transport-node";
import { InferenceClient } from "../client/client.js";
import { connectNats } from "../connection.js";
import { ModelRegistry } from "../routing/registry.js";
import type { Tracing } from "../telemetry/mod.js";
import { ApiKeys } from "./auth.js";
import { Callbacks } from "./callbacks.js";
import { defaultGatewaySettings, validateGatewaySettings, type GatewaySettings } from "./config.js";
import { HttpError, sendError, toHttpError } from "./errors.js";
import * as h from "./handlers.js";
import { GatewayMetrics } from "./metrics.js";
import { AsyncRecords } from "./records.js";

export interface GatewayOptions {
  /** NATS servers; ignored when `nc` is given. */
  servers?: string | string[];
  /** A connection to use (not closed by stop()); a new one by default. */
  nc?: NatsConnection;
  settings?: Partial<GatewaySettings>;
  /** Spans for published requests, children of the HTTP request's `traceparent`. */
  tracing?: Tracing;
  metrics?: GatewayMetrics;
  /** Hears problems that have no caller to tell (callbacks given up, invalid keys in the bucket). */
  onError?: (message: string) => void;
}

/** Service name of the gateway's spans (OTEL_SERVICE_NAME overrides). */
export const SERVICE_GATEWAY = "sluice-gateway";

type Handler = (ctx: h.GatewayContext, call: h.HttpCall) => Promise<void>;

interface Route {
  method: "GET" | "POST";
  /** The pattern, as the metrics label. */
  name: string;
  re: RegExp;
  handler: Handler;
}

const ROUTES: readonly Route[] = [
  { method: "GET", name: "/v1/models", re: /^\/v1\/models$/, handler: h.listModels },
  { method: "GET", name: "/v1/models/{model}", re: /^\/v1\/models\/(?<model>[^/]+)$/, handler: h.getModel },
  { method: "POST", name: "/v1/chat/completions", re: /^\/v1\/chat\/completions$/, handler: h.chatCompletions },
  { method: "POST", name: "/v1/completions", re: /^\/v1\/completions$/, handler: h.completions },
  { method: "POST", name: "/v1/embeddings", re: /^\/v1\/embeddings$/, handler: h.embeddingsEndpoint },
  { method: "POST", name: "/v1/infer/{model}", re: /^\/v1\/infer\/(?<model>[^/]+)$/, handler: h.inferEndpoint },
  { method: "GET", name: "/v1/requests/{id}", re: /^\/v1\/requests\/(?<id>[^/]+)$/, handler: h.requestStatus },
];

export class Gateway implements h.GatewayContext {
  private open = 0;
  private draining = false;
  private stopped: Promise<void> | undefined;
  private readonly clients = new Map<string, InferenceClient>();
  private readonly idle = new Set<() => void>();

  private constructor(
    readonly settings: GatewaySettings,
    readonly server: Server,
    readonly nc: NatsConnection,
    private readonly ownsNc: boolean,
    private readonly registry: ModelRegistry,
    private readonly keys: ApiKeys,
    readonly records: AsyncRecords,
    readonly callbacks: Callbacks,
    readonly metrics: GatewayMetrics,
    private readonly tracing: Tracing | undefined,
  ) {}

  static async start(opts: GatewayOptions): Promise<Gateway> {
    const settings = { ...defaultGatewaySettings(), ...opts.settings };
    validateGatewaySettings(settings);
    const onError = opts.onError ?? ((m: string) => console.error(`sluice gateway: ${m}`));
    const nc = opts.nc ?? (await connectNats(opts.servers ?? [], "sluice-gateway"));
    const cleanup: Array<() => Promise<unknown>> = opts.nc ? [] : [() => nc.close()];
    try {
      const registry = await ModelRegistry.open(nc, { onInvalid: (key, err) => onError(`model '${key}': ${err.message}`) });
      cleanup.unshift(() => registry.stop());
      const keys = await ApiKeys.open(settings.apiKeys, settings.apiKeysBucket ? nc : undefined, (key, err) => onError(`API key entry ${key}: ${err.message}`));
      cleanup.unshift(() => keys.stop());
      const records = await AsyncRecords.open(nc, settings.asyncRecordTtlMs);
      const metrics = opts.metrics ?? new GatewayMetrics();
      const callbacks = new Callbacks(settings, (o) => metrics.callback(o.delivered, o.attempts), onError);
      const server = createServer({ keepAlive: true });
      // A tracing that records nothing is left out: the caller's traceparent is passed on as it is.
      const tracing = opts.tracing?.enabled ? opts.tracing : undefined;
      const gw = new Gateway(settings, server, nc, !opts.nc, registry, keys, records, callbacks, metrics, tracing);
      server.on("request", (req: IncomingMessage, res: ServerResponse) => gw.handle(req, res));
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(settings.port, settings.host, () => {
          server.off("error", reject);
          resolve();
        });
      });
      return gw;
    } catch (err) {
      for (const f of cleanup) await f().catch(() => undefined);
      throw err;
    }
  }

  get port(): number {
    return (this.server.address() as AddressInfo).port;
  }

  /** `http://<host>:<port>` (127.0.0.1 when listening on every interface). */
  get url(): string {
    const host = this.settings.host === "0.0.0.0" || this.settings.host === "::" ? "127.0.0.1" : this.settings.host;
    return `http://${host}:${this.port}`;
  }

  /** The OpenAI base URL: `<url>/v1`. */
  get baseUrl(): string {
    return `${this.url}/v1`;
  }

  get models(): h.GatewayContext["models"] {
    return this.registry.table;
  }

  /** Requests held open now. */
  get openRequests(): number {
    return this.open;
  }

  /** The client of a tenant (one per tenant, sharing the connection and one result subscription). */
  client(tenant: string): InferenceClient {
    let c = this.clients.get(tenant);
    if (!c) {
      c = new InferenceClient(this.nc, tenant, false, this.tracing);
      this.clients.set(tenant, c);
    }
    return c;
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const startedAt = performance.now();
    const path = (req.url ?? "/").split("?", 1)[0]!;
    const method = req.method ?? "GET";
    if (method === "GET" && this.probe(path, res)) return;
    const match = this.route(method, path);
    const routeName = match?.route.name ?? "unmatched";
    res.once("close", () => this.metrics.answered(routeName, method, res.statusCode, (performance.now() - startedAt) / 1000));
    if (this.draining || this.open >= this.settings.maxOpenRequests) {
      this.metrics.reject(this.draining ? "draining" : "over_bound");
      res.setHeader("connection", "close");
      sendError(res, new HttpError("UNAVAILABLE", this.draining ? "the gateway is shutting down" : `the gateway holds ${this.settings.maxOpenRequests} open requests; try again`), this.settings.retryAfterSeconds);
      req.resume();
      return;
    }
    this.open++;
    this.metrics.setOpen(this.open);
    const leaving = new AbortController();
    res.once("close", () => {
      if (!res.writableFinished) leaving.abort();
      this.open--;
      this.metrics.setOpen(this.open);
      if (this.open === 0) for (const f of this.idle) f();
    });
    void (async () => {
      try {
        if (!match) throw this.unmatched(method, path);
        const tenant = this.keys.tenantOf(req.headers);
        await match.route.handler(this, { req, res, tenant, params: match.params, signal: leaving.signal });
      } catch (err) {
        const e = toHttpError(err);
        if (res.headersSent) res.end();
        else sendError(res, e, this.settings.retryAfterSeconds);
      }
    })();
  }

  /** Health, readiness and metrics: no key, not counted as open requests. */
  private probe(path: string, res: ServerResponse): boolean {
    switch (path) {
      case "/healthz":
        h.sendJson(res, 200, { status: "ok" });
        return true;
      case "/readyz": {
        const ready = !this.draining && !this.nc.isClosed();
        h.sendJson(res, ready ? 200 : 503, { status: ready ? "ready" : "not ready" });
        return true;
      }
      case "/metrics":
        void this.metrics.text().then(
          (text) => {
            res.writeHead(200, { "content-type": this.metrics.registry.contentType });
            res.end(text);
          },
          (err: unknown) => h.sendJson(res, 500, { error: String(err) }),
        );
        return true;
      default:
        return false;
    }
  }

  private route(method: string, path: string): { route: Route; params: Record<string, string> } | undefined {
    for (const route of ROUTES) {
      if (route.method !== method) continue;
      const m = route.re.exec(path);
      if (m) return { route, params: Object.fromEntries(Object.entries(m.groups ?? {}).map(([k, v]) => [k, decodeURIComponent(v)])) };
    }
    return undefined;
  }

  private unmatched(method: string, path: string): HttpError {
    if (ROUTES.some((r) => r.re.test(path))) return new HttpError("METHOD_NOT_ALLOWED", `${method} is not allowed on ${path}`);
    return new HttpError("NOT_FOUND", `no route ${method} ${path}`);
  }

  /**
   * Stops: refuses new requests (503), lets open ones finish for up to `drainMs`, then closes
   * what is left, delivers pending callbacks for what remains of that time, and closes the
   * clients (and the connection it opened). Safe to call twice.
   */
  stop(): Promise<void> {
    this.stopped ??= (async () => {
      this.draining = true;
      const until = Date.now() + this.settings.drainMs;
      const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
      this.server.closeIdleConnections();
      if (this.open > 0) {
        let t: NodeJS.Timeout | undefined;
        await Promise.race([
          new Promise<void>((resolve) => this.idle.add(resolve)),
          new Promise<void>((resolve) => (t = setTimeout(resolve, this.settings.drainMs))),
        ]);
        clearTimeout(t);
      }
      this.server.closeAllConnections();
      await closed;
      await this.callbacks.stop(Math.max(0, until - Date.now()));
      for (const c of this.clients.values()) await c.close();
      await this.keys.stop();
      await this.registry.stop();
      if (this.ownsNc) await this.nc.drain().catch(() => undefined);
    })();
    return this.stopped;
  }
}
