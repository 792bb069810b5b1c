/**
 * `traceparent` on an HTTP request is continued: the gateway's publish, the pipeline's spans and
 * the worker's spans all join the caller's trace, exported over OTLP to a real receiver.
 */
import { expect } from "chai";
import { PipelineService } from "../../pipeline/service.js";
import { silentLogger } from "../../pipeline/support/logger.js";
import { SERVICE_GATEWAY } from "../../pipeline/gateway/server.js";
import { SERVICE_PIPELINE, SERVICE_WORKER, startTracing, traceEngine, type Tracing } from "../../pipeline/telemetry/mod.js";
import { SimulatedEngine } from "../../worker/engines/simulated.js";
import { WorkerServer } from "../../worker/server.js";
import { OtlpReceiver } from "../support/otlp-receiver.js";
import { useNats } from "../support/nats.js";
import { testConfig } from "../support/stack.js";
import { post, startGateway } from "./support.js";

describe("HTTP gateway: trace context", function () {
  this.timeout(120_000);
  const nats = useNats();
  let receiver: OtlpReceiver;
  const tracings: Tracing[] = [];
  const stops: Array<() => Promise<unknown>> = [];

  before(async () => {
    receiver = await OtlpReceiver.start();
  });
  after(async () => {
    for (const f of stops.reverse()) await f().catch(() => undefined);
    for (const t of tracings) await t.shutdown();
    await receiver?.stop();
  });

  const tracing = (serviceName: string): Tracing => {
    const t = startTracing({ serviceName, tracesEndpoint: `${receiver.url}/v1/traces`, scheduledDelayMs: 50 });
    tracings.push(t);
    return t;
  };

  it("one trace from the HTTP caller through the gateway, the pipeline and the worker", async () => {
    const engine = new SimulatedEngine({ base_ms: 0, per_item_ms: 0 });
    const worker = await WorkerServer.start({ engine: traceEngine(engine, tracing(SERVICE_WORKER)) });
    stops.push(() => engine.close(), () => worker.stop());
    const config = testConfig(nats.url, {
      models: { echo: { versions: { v1: { weight: 100 } } } },
      workers: [{ model: "echo", version: "v1", endpoint: worker.endpoint }],
    });
    const pipeline = await PipelineService.start(config, { logger: silentLogger, tracing: tracing(SERVICE_PIPELINE) });
    stops.push(() => pipeline.stop());
    const { gw, nc } = await startGateway(nats.url, {}, tracing(SERVICE_GATEWAY));
    stops.push(() => nc.close(), () => gw.stop());

    const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
    const parent = "00f067aa0ba902b7";
    const r = await post(gw, "/chat/completions", { model: "echo", messages: [{ role: "user", content: "traced" }] }, { traceparent: `00-${traceId}-${parent}-01` });
    expect(r.status).to.equal(200);
    // Every span of the path, the request's own (ended last, when it is settled) included.
    const wanted: Array<[string, string]> = [
      [SERVICE_GATEWAY, "send infer.req"],
      [SERVICE_PIPELINE, "receive infer.req"],
      [SERVICE_PIPELINE, "send infer.res"],
      [SERVICE_WORKER, "SERVER"],
    ];
    const spans = await receiver.waitForSpans(
      (all) => wanted.every(([service, what]) => all.some((x) => x.traceId === traceId && x.serviceName === service && (x.name === what || x.kind === what))),
      30_000,
    );
    const inTrace = spans.filter((s) => s.traceId === traceId);
    const send = inTrace.find((s) => s.serviceName === SERVICE_GATEWAY && s.name === "send infer.req")!;
    expect(send.parentSpanId).to.equal(parent);
    expect(send.kind).to.equal("PRODUCER");
    const receive = inTrace.find((s) => s.name === "receive infer.req")!;
    expect(receive.parentSpanId).to.equal(send.spanId);
    expect(inTrace.some((s) => s.serviceName === SERVICE_WORKER && s.kind === "SERVER")).to.equal(true);
    expect(inTrace.some((s) => s.name === "send infer.res")).to.equal(true);
  });
});
