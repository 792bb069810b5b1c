/**
 * The claim check under infra/nats/accounts.conf: a tenant writes and reads large bodies in its
 * own bucket (infer_payloads_<tenant>) end to end through the pipeline, and is denied another
 * tenant's objects: reading them, writing into them, or naming them in a request.
 */
import { expect } from "chai";
import { headers as natsHeaders, nuid } from "@nats-io/transport-node";
import { jetstream } from "@nats-io/jetstream";
import { InferenceClient } from "../../pipeline/client/client.js";
import { PayloadStore } from "../../pipeline/payloads/store.js";
import { BODY_REF_HEADER, BODY_SIZE_HEADER } from "../../pipeline/payloads/names.js";
import { PipelineService } from "../../pipeline/service.js";
import { silentLogger } from "../../pipeline/support/logger.js";
import { models, startWorker, testConfig, type TestWorker } from "../support/stack.js";
import { startSecuredServer, UserConnection, type SecuredServer } from "./accounts.js";

const big = (n: number, c: string): string => c.repeat(n);

describe("security: large bodies in per-tenant object store buckets", function () {
  this.timeout(120_000);
  let secured: SecuredServer;
  let worker: TestWorker;
  let pipelineConn: UserConnection;
  let pipeline: PipelineService;
  let acme: UserConnection;
  let globex: UserConnection;
  let acmeClient: InferenceClient;
  const acmeId = `acme-big-${nuid.next()}`;

  before(async function () {
    this.timeout(60_000);
    secured = await startSecuredServer();
    worker = await startWorker({ base_ms: 1 });
    pipelineConn = await UserConnection.open(secured, "pipeline");
    const config = testConfig(secured.server.url, {
      models: models(["echo"]),
      workers: [{ model: "echo", version: "v1", endpoint: worker.server.endpoint }],
      payloads: { sweepIntervalMs: 0 },
    });
    pipeline = await PipelineService.start(config, { nc: pipelineConn.nc, logger: silentLogger });
    acme = await UserConnection.open(secured, "tenant-acme");
    globex = await UserConnection.open(secured, "tenant-globex");
    acmeClient = new InferenceClient(acme.nc, "acme");
  });

  after(async function () {
    this.timeout(30_000);
    await acmeClient?.close();
    await pipeline?.stop(2_000);
    for (const u of [acme, globex, pipelineConn]) await u?.close();
    await worker?.stop();
    await secured?.server.stop();
  });

  it("acme sends a 2 MB prompt and gets its 2 MB result through its own bucket, with no permission error", async () => {
    const prompt = big(2 * 1024 * 1024, "a");
    const r = await acmeClient.infer("echo", { prompt }, { id: acmeId, timeoutMs: 60_000 });
    expect(r.output?.text === prompt).to.equal(true);
    expect(acme.denied.map((e) => e.message)).to.deep.equal([]);
    expect(pipelineConn.denied.map((e) => e.message)).to.deep.equal([]);
  });

  it("globex is denied reading acme's object (the description get on acme's bucket)", async () => {
    const store = new PayloadStore(jetstream(globex.nc, { checkAPI: false, timeout: 2_000 }));
    const err = await store.read("acme", `req/${acmeId}`, { maxBytes: 64 * 1024 * 1024 }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err, "the read fails").to.be.instanceOf(Error);
    await globex.waitDenied("publish", "$JS.API.STREAM.MSG.GET.OBJ_infer_payloads_acme");
  });

  it("globex is denied subscribing to acme's chunks and writing into acme's bucket", async () => {
    const sub = globex.nc.subscribe("$O.infer_payloads_acme.C.>");
    await globex.waitDenied("subscription", "$O.infer_payloads_acme.C.>");
    sub.unsubscribe();
    globex.nc.publish("$O.infer_payloads_acme.M.eA==", new TextEncoder().encode("{}"));
    await globex.nc.flush();
    await globex.waitDenied("publish", "$O.infer_payloads_acme.M.eA==");
  });

  it("globex naming acme's object in its own request gets INVALID_ARGUMENT: references resolve in the sender's bucket only", async () => {
    const client = new InferenceClient(globex.nc, "globex");
    try {
      const id = nuid.next();
      const got = client.result(id, { timeoutMs: 30_000, checkStored: false });
      const h = natsHeaders();
      h.set(BODY_REF_HEADER, `req/${acmeId}`);
      h.set(BODY_SIZE_HEADER, String(2 * 1024 * 1024));
      await jetstream(globex.nc).publish("infer.req.normal.globex.echo", new Uint8Array(0), { msgID: id, headers: h });
      const r = await got;
      expect(r.status).to.equal("error");
      expect(r.error?.code).to.equal("INVALID_ARGUMENT");
      expect(r.error?.message).to.match(/is not this request's object/);
      expect(r.output).to.equal(undefined);
    } finally {
      await client.close();
    }
  });

  it("the pipeline user sweeps every tenant's bucket without a permission error, keeping referred objects", async () => {
    const report = await pipeline.payloads!.sweeper.sweep(Date.now() + 60 * 60_000);
    expect(report.checked).to.be.at.least(2);
    expect(report.removed).to.deep.equal([]);
    expect(pipelineConn.denied.map((e) => e.message)).to.deep.equal([]);
  });
});
