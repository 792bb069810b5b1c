/**
 * `OTEL_TRACES_EXPORTER=console`: each finished span as one line on stderr, so a user without a
 * collector can read a request's trace. stderr, not stdout: the CLI's stdout is its data (JSON
 * lines), and the SDK's own ConsoleSpanExporter prints multi-line objects to stdout.
 *
 *   span sluice-client send infer.req trace=4bf9…e736 span=00f0…02b7 parent=- 2.41ms OK
 */
import { SpanStatusCode } from "@opentelemetry/api";
import { ExportResultCode, type ExportResult } from "@opentelemetry/core";
import type { ReadableSpan, SpanExporter } from "@opentelemetry/sdk-trace-node";

/** Where the lines go; stderr by default. */
export type LineWriter = (line: string) => void;

export class ConsoleLineExporter implements SpanExporter {
  private stopped = false;
  constructor(private readonly write: LineWriter = (line) => process.stderr.write(`${line}\n`)) {}

  export(spans: ReadableSpan[], done: (result: ExportResult) => void): void {
    if (this.stopped) {
      done({ code: ExportResultCode.FAILED, error: new Error("exporter is shut down") });
      return;
    }
    try {
      for (const s of spans) this.write(spanLine(s));
      done({ code: ExportResultCode.SUCCESS });
    } catch (err) {
      // A closed stderr is not the host's problem.
      done({ code: ExportResultCode.FAILED, error: err instanceof Error ? err : new Error(String(err)) });
    }
  }

  /** Safe to call twice. */
  shutdown(): Promise<void> {
    this.stopped = true;
    return Promise.resolve();
  }

  forceFlush(): Promise<void> {
    return Promise.resolve();
  }
}

/** One span as one line: service, name, ids, duration, status. */
function spanLine(s: ReadableSpan): string {
  const ctx = s.spanContext();
  const service = String(s.resource.attributes["service.name"] ?? "-");
  const ms = (s.duration[0] * 1e3 + s.duration[1] / 1e6).toFixed(2);
  const status = s.status.code === SpanStatusCode.ERROR ? `ERROR${s.status.message ? ` ${JSON.stringify(s.status.message)}` : ""}` : "OK";
  const parent = s.parentSpanContext?.spanId ?? "-";
  return `span ${service} ${s.name} trace=${ctx.traceId} span=${ctx.spanId} parent=${parent} ${ms}ms ${status}`;
}
