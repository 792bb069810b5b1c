/**
 * A batch of large requests crosses gRPC as messages within the worker's limit: the client
 * sends it in consecutive parts of at most WORKER_CLIENT_MAX_BATCH_BYTES of inputs (a request
 * larger than that alone), so four 20 MB prompts (80 MB, over the 64 MiB message limit) are
 * answered, each with its own output, in order.
 */
import { expect } from "chai";
import { WorkerClient, WORKER_CLIENT_MAX_BATCH_BYTES } from "../../pipeline/workers/mod.js";
import { startWorker, type TestWorker } from "../support/stack.js";

describe("worker client: a batch of large requests", function () {
  this.timeout(120_000);
  let worker: TestWorker;
  let client: WorkerClient;
  before(async () => {
    worker = await startWorker();
    client = new WorkerClient(worker.server.endpoint);
  });
  after(async () => {
    client?.close();
    await worker?.stop();
  });

  it("answers four 20 MB prompts of one batch, each with its own output, in parts under the limit", async () => {
    const prompts = [0, 1, 2, 3].map((i) => String.fromCharCode(97 + i).repeat(20 * 1024 * 1024));
    const r = await client.infer({ model: "echo", version: "v1", requests: prompts.map((prompt, i) => ({ id: `r${i}`, prompt })) });
    expect(r.results).to.have.length(4);
    r.results.forEach((x, i) => expect(x.output?.text === prompts[i], `r${i}`).to.equal(true));
    const calls = worker.engine.calls.filter((c) => c.kind === "infer");
    expect(calls.map((c) => c.ids)).to.deep.equal([["r0"], ["r1"], ["r2"], ["r3"]]);
    expect(WORKER_CLIENT_MAX_BATCH_BYTES).to.be.lessThan(40 * 1024 * 1024);
  });

  it("keeps a batch of small requests one call", async () => {
    const before = worker.engine.calls.length;
    const r = await client.infer({ model: "echo", version: "v1", requests: [0, 1, 2].map((i) => ({ id: `s${i}`, prompt: `p${i}` })) });
    expect(r.results.map((x) => x.output?.text)).to.deep.equal(["p0", "p1", "p2"]);
    expect(worker.engine.calls.slice(before).map((c) => c.ids)).to.deep.equal([["s0", "s1", "s2"]]);
  });
});
