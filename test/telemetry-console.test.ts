/** `OTEL_TRACES_EXPORTER=console`: tracing on without a collector, one line per span. */
import { expect } from "chai";
import { context, SpanStatusCode, trace } from "@opentelemetry/api";
import { BasicTracerProvider, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-node";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { ConsoleLineExporter } from "../pipeline/telemetry/console-exporter.js";
import { resolveTracingConfig, startTracing } from "../pipeline/telemetry/telemetry.js";

describe("telemetry: the console exporter", () => {
  it("OTEL_TRACES_EXPORTER=console turns tracing on without an endpoint; none and unknown values do not", async () => {
    const on = resolveTracingConfig({ serviceName: "s", env: { OTEL_TRACES_EXPORTER: "console" } });
    expect(on).to.include({ enabled: true, exporter: "console", url: undefined });
    expect(resolveTracingConfig({ serviceName: "s", env: {} })).to.include({ enabled: false, exporter: "otlp" });
    expect(resolveTracingConfig({ serviceName: "s", env: { OTEL_TRACES_EXPORTER: "none", OTEL_EXPORTER_OTLP_ENDPOINT: "http://x" } }).enabled).to.equal(false);
    const odd = resolveTracingConfig({ serviceName: "s", env: { OTEL_TRACES_EXPORTER: "zipkin" } });
    expect(odd).to.include({ enabled: false, exporter: "otlp" });
    expect(odd.warnings.join("\n")).to.contain("unsupported OTEL_TRACES_EXPORTER 'zipkin'");
    const tracing = startTracing({ serviceName: "s", env: { OTEL_TRACES_EXPORTER: "console" } });
    expect(tracing.enabled).to.equal(true);
    await tracing.shutdown();
  });

  it("prints each span as one line: service, name, trace, span, parent, duration, status", async () => {
    const lines: string[] = [];
    const provider = new BasicTracerProvider({
      resource: resourceFromAttributes({ "service.name": "svc" }),
      spanProcessors: [new SimpleSpanProcessor(new ConsoleLineExporter((l) => lines.push(l)))],
    });
    const tracer = provider.getTracer("t");
    const outer = tracer.startSpan("outer");
    const inner = tracer.startSpan("inner", {}, trace.setSpan(context.active(), outer));
    inner.setStatus({ code: SpanStatusCode.ERROR, message: "boom" });
    inner.end();
    outer.end();
    await provider.shutdown();
    expect(lines).to.have.length(2);
    const [innerLine, outerLine] = lines as [string, string];
    const outerMatch = /^span svc outer trace=([0-9a-f]{32}) span=([0-9a-f]{16}) parent=- [0-9.]+ms OK$/.exec(outerLine);
    expect(outerMatch, outerLine).to.not.equal(null);
    expect(innerLine).to.match(new RegExp(`^span svc inner trace=${outerMatch![1]} span=[0-9a-f]{16} parent=${outerMatch![2]} [0-9.]+ms ERROR "boom"$`));
  });

  it("never throws into the host when the output fails, and refuses to export after shutdown", async () => {
    const failing = new ConsoleLineExporter(() => {
      throw new Error("stderr closed");
    });
    const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(failing)] });
    expect(() => provider.getTracer("t").startSpan("s").end()).not.to.throw();
    await provider.shutdown();
    await failing.shutdown();
    const codes: number[] = [];
    failing.export([], (r) => codes.push(r.code));
    expect(codes).to.deep.equal([1]);
  });
});
