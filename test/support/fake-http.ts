/** A fake HTTP server for the engine adapters' tests: records every request, answers with the test's handler. */
import { createServer, type IncomingHttpHeaders, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

export interface Recorded {
  readonly method: string;
  readonly url: string;
  readonly headers: IncomingHttpHeaders;
  readonly body: unknown;
}

export type Handler = (req: Recorded, res: ServerResponse) => void | Promise<void>;

export class FakeServer {
  readonly requests: Recorded[] = [];
  /** URLs of requests whose connection closed before the answer was complete. */
  readonly dropped: string[] = [];
  inFlight = 0;
  maxInFlight = 0;
  handler: Handler = (_req, res) => reply(res, 500, "no handler");

  private constructor(
    private readonly server: Server,
    readonly url: string,
  ) {}

  static async start(handler?: Handler): Promise<FakeServer> {
    const server = createServer();
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const fake = new FakeServer(server, `http://127.0.0.1:${(server.address() as AddressInfo).port}`);
    if (handler) fake.handler = handler;
    server.on("request", (req: IncomingMessage, res: ServerResponse) => {
      void fake.serve(req, res);
    });
    return fake;
  }

  /** Bodies of the requests to `path`, in arrival order. */
  bodies(path: string): unknown[] {
    return this.requests.filter((r) => r.url === path).map((r) => r.body);
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private async serve(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    const raw = Buffer.concat(chunks).toString("utf8");
    let body: unknown = raw;
    try {
      body = raw === "" ? undefined : JSON.parse(raw);
    } catch {
      // Not JSON: keep the text.
    }
    const recorded: Recorded = { method: req.method ?? "", url: req.url ?? "", headers: req.headers, body };
    this.requests.push(recorded);
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    res.on("close", () => {
      this.inFlight--;
      if (!res.writableFinished) this.dropped.push(recorded.url);
    });
    try {
      await this.handler(recorded, res);
    } catch (err) {
      if (!res.headersSent) reply(res, 500, String(err));
    }
  }
}

export function reply(res: ServerResponse, status: number, body: string, contentType = "application/json"): void {
  res.writeHead(status, { "Content-Type": contentType, "Content-Length": Buffer.byteLength(body) });
  res.end(body);
}
