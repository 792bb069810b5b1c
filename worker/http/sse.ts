/** Server-sent events, as engine servers stream their tokens. */
import { createParser, type EventSourceParser } from "eventsource-parser";

/**
 * Decodes a `text/event-stream` body fed in arbitrary pieces (eventsource-parser does the
 * format: CRLF, LF or CR line ends split anywhere, comments, multi-line data); returns the data
 * of each event as it completes.
 */
export class SseDecoder {
  private readonly utf8 = new TextDecoder("utf-8");
  private readonly parser: EventSourceParser;
  private out: string[] = [];

  constructor() {
    this.parser = createParser({ onEvent: (e) => this.out.push(e.data) });
  }

  /** Feeds bytes; returns the data of every event they complete. */
  push(bytes: Uint8Array): string[] {
    return this.take(this.utf8.decode(bytes, { stream: true }));
  }

  /**
   * The end of the stream: returns the data of an event left without its blank line, if any
   * (lenient where the format says to drop it: a server that ends right after its last data
   * line still meant it).
   */
  end(): string[] {
    return this.take(this.utf8.decode() + "\n\n");
  }

  private take(text: string): string[] {
    this.parser.feed(text);
    const out = this.out;
    this.out = [];
    return out;
  }
}
