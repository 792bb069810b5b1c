/**
 * The small HTTP server of the pipeline's metrics: `/metrics` (the Prometheus exposition),
 * `/healthz` and `/readyz` probes.
 *
 * ```ts
 * const server = await MetricsServer.start({ port: 9464, metrics, ready: () => svc.ready });
 * await server.stop();
 * ```
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { DEFAULT_METRICS_HOST, DEFAULT_METRICS_PORT, type MetricsSource } from "./metrics.js";
import { CodedError } from "../../proto/coded-error.js";

export interface MetricsServerOptions {
  /** Default {@link DEFAULT_METRICS_PORT}; 0 picks a free port (see {@link MetricsServer.port}). */
  port?: number;
  /** Default {@link DEFAULT_METRICS_HOST}. */
  host?: string;
  metrics: MetricsSource;
  /** `/readyz` answers 200 while this returns true; always ready when omitted. */
  ready?: () => boolean;
}

export type MetricsServerErrorCode = "BIND_FAILED";

export class MetricsServerError extends CodedError<MetricsServerErrorCode> {
  override readonly name = "MetricsServerError";
}

const PATHS = new Set(["/metrics", "/healthz", "/readyz"]);

/**
 * Serves `/metrics` (the exposition format), `/healthz` (200 while the process runs),
 * `/readyz` (200 when ready, else 503); 404 elsewhere, 405 for methods other than GET and HEAD.
 */
export class MetricsServer {
  private stopping: Promise<void> | undefined;

  private constructor(
    private readonly server: Server,
    readonly host: string,
    readonly port: number,
  ) {}

  static async start(opts: MetricsServerOptions): Promise<MetricsServer> {
    const host = opts.host ?? DEFAULT_METRICS_HOST;
    const server = createServer((req, res) => {
      handle(req, res, opts).catch(() => {
        // handle() answers every error itself; this only keeps a broken socket quiet.
        if (!res.headersSent) res.writeHead(500);
        res.end();
      });
    });
    server.keepAliveTimeout = 5_000;
    const port = await new Promise<number>((resolve, reject) => {
      const onError = (err: Error): void => {
        reject(new MetricsServerError("BIND_FAILED", `cannot serve metrics on ${host}:${opts.port ?? DEFAULT_METRICS_PORT}: ${err.message}`, { cause: err }));
      };
      server.once("error", onError);
      server.listen(opts.port ?? DEFAULT_METRICS_PORT, host, () => {
        server.removeListener("error", onError);
        resolve((server.address() as AddressInfo).port);
      });
    });
    return new MetricsServer(server, host, port);
  }

  /** `http://host:port` (a wildcard host is reached on loopback). */
  get url(): string {
    const host = this.host === "0.0.0.0" ? "127.0.0.1" : this.host === "::" ? "[::1]" : this.host.includes(":") ? `[${this.host}]` : this.host;
    return `http://${host}:${this.port}`;
  }

  /** Stops listening and closes open connections. Safe to call twice. */
  stop(): Promise<void> {
    this.stopping ??= new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
    return this.stopping;
  }
}

async function handle(req: IncomingMessage, res: ServerResponse, opts: MetricsServerOptions): Promise<void> {
  const path = (req.url ?? "/").split("?")[0] ?? "/";
  const head = req.method === "HEAD";
  const reply = (status: number, body: string, contentType = "text/plain; charset=utf-8"): void => {
    res.writeHead(status, { "Content-Type": contentType, "Cache-Control": "no-store" });
    res.end(head ? undefined : body);
  };
  if (!PATHS.has(path)) return reply(404, "not found\n");
  if (req.method !== "GET" && !head) {
    res.setHeader("Allow", "GET, HEAD");
    return reply(405, "method not allowed\n");
  }
  if (path === "/healthz") return reply(200, "ok\n");
  if (path === "/readyz") {
    let ready: boolean;
    try {
      ready = opts.ready ? opts.ready() === true : true;
    } catch {
      ready = false;
    }
    return ready ? reply(200, "ready\n") : reply(503, "not ready\n");
  }
  try {
    const text = await opts.metrics.exposition();
    reply(200, text, opts.metrics.contentType);
  } catch (err) {
    reply(500, `cannot collect metrics: ${err instanceof Error ? err.message : String(err)}\n`);
  }
}
