/**
 * A result larger than the largest message the broker takes goes through the object store
 * (claim check), whatever the configured threshold: answered whole, run once. (A result that
 * cannot be sent at all is answered INTERNAL at once: settle-outcome's unit tests.)
 */
import { expect } from "chai";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { InferenceClient } from "../../pipeline/client/client.js";
import { NatsServer } from "../../pipeline/dev/nats-server.js";
import type { PipelineService } from "../../pipeline/service.js";
import { models, startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

const MAX_PAYLOAD = 64 * 1024;

describe("a request and result larger than the broker's max_payload", function () {
  this.timeout(60_000);
  let server: NatsServer;
  let nc: NatsConnection;
  let worker: TestWorker;
  let pipeline: PipelineService;

  before(async () => {
    server = await NatsServer.start({ config: `max_payload: ${MAX_PAYLOAD}` });
    worker = await startWorker();
    pipeline = await startPipeline(
      testConfig(server.url, { models: models(["echo"]), workers: [{ model: "echo", version: "v1", endpoint: worker.server.endpoint }] }),
    );
    nc = await connect({ servers: server.url });
  });
  after(async () => {
    await nc?.close();
    await pipeline?.stop(1_000);
    await worker?.stop();
    await server?.stop();
  });

  it("answers it whole through the object store, once, and keeps serving", async () => {
    const client = new InferenceClient(nc, "big");
    // The request and its echo are under the default threshold (256 KiB) but over max_payload.
    const prompt = "x".repeat(MAX_PAYLOAD + 1000);
    const r = await client.infer("echo", { prompt }, { timeoutMs: 20_000 });
    expect(r.output?.text === prompt).to.equal(true);
    // Run once on the worker, not again and again.
    expect(worker.engine.calls.filter((c) => c.kind === "infer").length).to.equal(1);
    // A normal request right after is served.
    expect((await client.infer("echo", { prompt: "small" }, { timeoutMs: 20_000 })).output?.text).to.equal("small");
    await client.close();
  });
});
