/**
 * A 3-node JetStream cluster on loopback, streams with 3 replicas. The node that leads the
 * request stream, and that the pipeline is connected to, is SIGKILLed under load: the stream and
 * its consumers elect new leaders on the other two nodes, the pipeline reconnects to one of them,
 * and every request is answered (none lost; see the known-bug case for duplicates).
 */
import { expect } from "chai";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { ensureStreams } from "../../pipeline/intake/jetstream.js";
import { STREAM_REQUESTS } from "../../proto/wire.js";
import { PipelineService } from "../../pipeline/service.js";
import { silentLogger } from "../../pipeline/support/logger.js";
import { models, startWorker, testConfig, type TestWorker } from "../support/stack.js";
import { reportLine, SteadyLoad, TestCluster, until } from "./harness.js";

describe("fault: a cluster node killed under load (streams with 3 replicas)", function () {
  this.timeout(120_000);
  let cluster: TestCluster | undefined;
  let worker: TestWorker | undefined;
  let pipeline: PipelineService | undefined;
  let pipelineNc: NatsConnection | undefined;
  let load: SteadyLoad | undefined;

  before(async function () {
    this.timeout(60_000);
    cluster = await TestCluster.start(3);
    worker = await startWorker({ base_ms: 2, per_item_ms: 0.05 });
  });

  after(async function () {
    this.timeout(60_000);
    await load?.close();
    await pipeline?.stop(2_000);
    await pipelineNc?.close().catch(() => undefined);
    await worker?.stop();
    await cluster?.stop();
  });

  it("answers every request exactly once: none lost, none twice", async () => {
    const c = cluster!;
    const config = testConfig(c.urls[0]!, {
      streams: { replicas: 3 },
      models: models(["echo"]),
      workers: [{ model: "echo", version: "v1", endpoint: worker!.server.endpoint }],
      consumer: { ackWaitMs: 3_000 },
    });
    // Create the streams first to learn which node leads the request stream.
    const admin = await connect({ servers: c.urls, name: "faults-admin" });
    let victim: number;
    try {
      const jsm = await jetstreamManager(admin);
      await ensureStreams(jsm, config.streams);
      const info = await jsm.streams.info(STREAM_REQUESTS);
      expect(info.config.num_replicas).to.equal(3);
      const leader = info.cluster?.leader ?? "";
      expect(leader, "the request stream's leader").to.match(/^n[123]$/);
      victim = Number(leader.slice(1)) - 1;
    } finally {
      await admin.close();
    }
    const survivors = c.urls.filter((_, i) => i !== victim);

    // The pipeline is connected to the victim first (and knows the others).
    pipelineNc = await connect({
      servers: [c.urls[victim]!, ...survivors],
      noRandomize: true,
      name: "sluice-pipeline",
      maxReconnectAttempts: -1,
      reconnectTimeWait: 250,
    });
    pipeline = await PipelineService.start(config, { nc: pipelineNc, logger: silentLogger });

    // Clients are on the survivors, so what they see is the pipeline's doing, not their own reconnects.
    load = await SteadyLoad.open({ servers: survivors, tenant: "nodekill", model: "echo", count: 1_200, rate: 150 });
    const publishing = load.start();
    expect(await until(() => load!.answeredSeen >= 200, 20_000), "answers before the kill").to.equal(true);
    await c.nodes[victim]!.kill();
    await publishing;
    const r = await load.finish(60_000);
    reportLine("cluster-node-kill", r);
    // The pipeline did lose its node and carried on from another one.
    expect(pipelineNc.getServer()).to.not.equal(new URL(c.urls[victim]!).host);
    expect(r.sent).to.equal(1_200);
    expect(r.lost).to.equal(0);
    // Result publishes in flight when the node died got no acknowledgement, but had reached the
    // clients: they are stored (infer.kept) without being sent again.
    expect(r.duplicated, "results a client received twice").to.equal(0);
    expect(r.conflicting).to.equal(0);
  });
});
