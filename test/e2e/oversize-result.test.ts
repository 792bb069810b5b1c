/**
 * A result larger than the largest message the broker takes can never be sent: the request is
 * answered INTERNAL with the reason, at once, instead of being run again and again.
 */
import { expect } from "chai";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { InferenceClient, InferenceError } from "../../pipeline/client/client.js";
import { NatsServer } from "../../pipeline/dev/nats-server.js";
import type { PipelineService } from "../../pipeline/service.js";
import { models, startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

const MAX_PAYLOAD = 64 * 1024;

describe("a result larger than the broker's max_payload", function () {
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

  it("answers INTERNAL saying so, once, and keeps serving", async () => {
    const client = new InferenceClient(nc, "big");
    // The request fits; its echo, wrapped in a result document, does not.
    const prompt = "x".repeat(MAX_PAYLOAD - 200);
    let err: unknown;
    try {
      await client.infer("echo", { prompt }, { timeoutMs: 20_000 });
    } catch (e) {
      err = e;
    }
    expect(err).to.be.instanceOf(InferenceError);
    expect((err as InferenceError).code).to.equal("INTERNAL");
    expect((err as InferenceError).message).to.match(/larger than the largest message the broker takes/);
    // Run once on the worker, not again and again.
    expect(worker.engine.calls.filter((c) => c.kind === "infer").length).to.equal(1);
    // A normal request right after is served.
    expect((await client.infer("echo", { prompt: "small" }, { timeoutMs: 20_000 })).output?.text).to.equal("small");
    await client.close();
  });
});
