/**
 * Server-sent events as the HTML standard defines them and as OpenAI streams them: one
 * `data:` field per line of the payload, an empty line ending each event, `data: [DONE]` last.
 * Writes wait for the socket to drain, so a slow reader holds the stream back instead of
 * growing a buffer.
 */
import type { ServerResponse } from "node:http";

const SSE_HEADERS: Readonly<Record<string, string>> = {
  "content-type": "text/event-stream; charset=utf-8",
  "cache-control": "no-cache",
  connection: "keep-alive",
  // Proxies such as nginx would otherwise hold events back.
  "x-accel-buffering": "no",
};

/** The wire form of one event carrying `data` (a JSON value, or a string as it is). */
export function formatEvent(data: unknown): string {
  const text = typeof data === "string" ? data : JSON.stringify(data);
  // A payload line break ends a field: each line gets its own `data:` field.
  return text
    .split(/\r\n|\r|\n/)
    .map((line) => `data: ${line}\n`)
    .join("")
    .concat("\n");
}

export class SseWriter {
  private opened = false;

  constructor(private readonly res: ServerResponse) {}

  get started(): boolean {
    return this.opened;
  }

  /** Sends the 200 and the event-stream headers (with `extra`), once. */
  open(extra: Record<string, string> = {}): void {
    if (this.opened) return;
    this.opened = true;
    this.res.writeHead(200, { ...SSE_HEADERS, ...extra });
    this.res.flushHeaders();
  }

  /** Sends one event; resolves when the socket can take more (at once unless it is full). */
  async send(data: unknown): Promise<void> {
    this.open();
    if (this.res.destroyed) return;
    if (this.res.write(formatEvent(data))) return;
    await new Promise<void>((resolve) => {
      const done = (): void => {
        this.res.off("drain", done);
        this.res.off("close", done);
        resolve();
      };
      this.res.once("drain", done);
      this.res.once("close", done);
    });
  }

  /** Sends `data: [DONE]` and ends the response. */
  async done(): Promise<void> {
    await this.send("[DONE]");
    this.res.end();
  }
}
