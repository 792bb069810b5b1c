/**
 * Tenant isolation with the real users and permissions of infra/nats/accounts.conf: a real
 * nats-server, the real pipeline connected as user `pipeline`, a simulated worker, and
 * tenants connected as `tenant-acme` and `tenant-globex`. What a tenant may do works end to
 * end; what it may not do comes back as a permission error on its own connection (asserted
 * on that error, not only on the absence of messages).
 */
import { expect } from "chai";
import { headers as natsHeaders, nuid, PermissionViolationError } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { InferenceClient } from "../../pipeline/client/client.js";
import { STREAM_DLQ, STREAM_REQUESTS, STREAM_RESULTS } from "../../proto/wire.js";
import { StreamResultSink } from "../../pipeline/settle/result-sink.js";
import { WorkerRegistration } from "../../pipeline/workers/directory.js";
import { PipelineService } from "../../pipeline/service.js";
import type { PipelineLogger } from "../../pipeline/support/logger.js";
import type { InferJob } from "../../operators/types.js";
import { waitFor } from "../support/nats.js";
import { models, startWorker, testConfig, type TestWorker } from "../support/stack.js";
import { startSecuredServer, UserConnection, type SecuredServer } from "./accounts.js";

const enc = new TextEncoder();

/** Runs `f` and returns what it rejected with; fails when it resolves. */
async function rejection(f: () => Promise<unknown>, timeoutMs = 10_000): Promise<unknown> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<"timeout">((resolve) => (timer = setTimeout(() => resolve("timeout"), timeoutMs)));
  try {
    const r = await Promise.race([
      f().then(
        () => ({ ok: true as const }),
        (err: unknown) => ({ ok: false as const, err }),
      ),
      timeout,
    ]);
    if (r === "timeout") throw new Error(`neither resolved nor rejected within ${timeoutMs} ms`);
    if (r.ok) throw new Error("expected a rejection, but it resolved");
    return r.err;
  } finally {
    clearTimeout(timer);
  }
}

/** The PermissionViolationError in an error or its cause chain. */
function permissionError(err: unknown): PermissionViolationError | undefined {
  for (let e: unknown = err, i = 0; e instanceof Error && i < 5; e = e.cause, i++) {
    if (e instanceof PermissionViolationError) return e;
  }
  return undefined;
}

/** Subscribes and resolves with the error the subscription was closed with (a denied subscribe). */
async function subscribeDenied(u: UserConnection, subject: string): Promise<PermissionViolationError> {
  const sub = u.nc.subscribe(subject);
  let timer: NodeJS.Timeout | undefined;
  const closed = await Promise.race([
    sub.closed,
    new Promise<"open">((resolve) => (timer = setTimeout(() => resolve("open"), 5_000))),
  ]);
  clearTimeout(timer);
  if (closed === "open") sub.unsubscribe();
  expect(closed, `subscription to ${subject} should be closed by the server`).to.be.instanceOf(PermissionViolationError);
  const err = closed as PermissionViolationError;
  expect(err.operation).to.equal("subscription");
  expect(err.subject).to.equal(subject);
  // The same error reached the connection's status stream.
  await u.waitDenied("subscription", subject);
  return err;
}

/** Publishes on core NATS and waits for the server's permission error for that subject. */
async function publishDenied(u: UserConnection, subject: string, data = "x"): Promise<void> {
  u.nc.publish(subject, enc.encode(data));
  await u.nc.flush();
  const err = await u.waitDenied("publish", subject);
  expect(err.message).to.match(/permissions violation/i);
}

function capturingLogger(lines: string[]): PipelineLogger {
  return {
    info: () => undefined,
    warn: (m) => lines.push(`warn: ${m}`),
    error: (m) => lines.push(`error: ${m}`),
  };
}

describe("security: tenant isolation with infra/nats/accounts.conf", function () {
  this.timeout(60_000);
  let secured: SecuredServer;
  let worker: TestWorker;
  let pipelineConn: UserConnection;
  let pipeline: PipelineService;
  let acme: UserConnection;
  let globex: UserConnection;
  let acmeClient: InferenceClient;
  let globexClient: InferenceClient;
  const pipelineLog: string[] = [];
  const extra: UserConnection[] = [];
  const extraWorkers: TestWorker[] = [];

  const open = async (user: string, opts: { inboxPrefix?: string } = {}): Promise<UserConnection> => {
    const u = await UserConnection.open(secured, user, opts);
    extra.push(u);
    return u;
  };

  before(async function () {
    this.timeout(60_000);
    secured = await startSecuredServer();
    worker = await startWorker({ base_ms: 1 });
    pipelineConn = await UserConnection.open(secured, "pipeline");
    const config = testConfig(secured.server.url, {
      models: { ...models(["echo", "upper"]), cached: { versions: { v1: { weight: 100 } }, cache: { ttl_ms: 60_000 } } },
      workers: ["echo", "cached"].map((model) => ({ model, version: "v1", endpoint: worker.server.endpoint })),
    });
    pipeline = await PipelineService.start(config, { nc: pipelineConn.nc, logger: capturingLogger(pipelineLog) });
    acme = await UserConnection.open(secured, "tenant-acme");
    globex = await UserConnection.open(secured, "tenant-globex");
    acmeClient = new InferenceClient(acme.nc, "acme");
    globexClient = new InferenceClient(globex.nc, "globex");
  });

  after(async function () {
    this.timeout(30_000);
    await acmeClient?.close();
    await globexClient?.close();
    await pipeline?.stop(2_000);
    for (const u of [acme, globex, pipelineConn, ...extra]) await u?.close();
    await worker?.stop();
    for (const w of extraWorkers) await w.stop();
    await secured?.server.stop();
  });

  describe("what a tenant may do", () => {
    it("acme infers end to end through the pipeline (publish with its own inbox, result on infer.res.acme.>)", async () => {
      const r = await acmeClient.infer("echo", { prompt: "hello from acme" }, { timeoutMs: 20_000 });
      expect(r.status).to.equal("ok");
      expect(r.output?.text).to.equal("hello from acme");
      expect(acme.denied, acme.denied.map((e) => e.message).join("; ")).to.deep.equal([]);
    });

    it("globex infers too, and neither tenant sees the other's result", async () => {
      const acmeSeen: string[] = [];
      const sub = acme.nc.subscribe("infer.res.acme.>", { callback: (_e, m) => void acmeSeen.push(m.subject) });
      const id = `globex-${nuid.next()}`;
      const r = await globexClient.infer("echo", { prompt: "globex secret" }, { id, timeoutMs: 20_000 });
      expect(r.output?.text).to.equal("globex secret");
      await acme.nc.flush();
      sub.unsubscribe();
      expect(acmeSeen.filter((s) => s.includes(id))).to.deep.equal([]);
      expect(globex.denied).to.deep.equal([]);
    });

    it("acme's repeated request is answered from the result cache (the pipeline reads and writes infer_cache)", async () => {
      const first = await acmeClient.infer("cached", { prompt: "once" }, { timeoutMs: 20_000 });
      const again = await acmeClient.infer("cached", { prompt: "once" }, { timeoutMs: 20_000 });
      const other = await globexClient.infer("cached", { prompt: "once" }, { timeoutMs: 20_000 });
      expect([first, again, other].map((r) => r.timing?.cache)).to.deep.equal(["miss", "hit", "miss"]);
      expect(again.output).to.deep.equal(first.output);
      expect(acme.denied).to.deep.equal([]);
    });

    it("acme may cancel its own requests (publish infer.cancel.acme.<id>)", async () => {
      acme.nc.publish(`infer.cancel.acme.${nuid.next()}`);
      await acme.nc.flush();
      await new Promise((r) => setTimeout(r, 100));
      expect(acme.denied).to.deep.equal([]);
    });

    it("acme may subscribe to its own chunks (infer.tok.acme.>)", async () => {
      const sub = acme.nc.subscribe("infer.tok.acme.>");
      await acme.nc.flush();
      await new Promise((r) => setTimeout(r, 100));
      expect(sub.isClosed()).to.equal(false);
      sub.unsubscribe();
      expect(acme.denied).to.deep.equal([]);
    });
  });

  describe("what a tenant may not do", () => {
    it("acme cannot publish a request as globex (JetStream publish and core publish)", async () => {
      const subject = "infer.req.normal.globex.echo";
      const jsm = await jetstreamManager(pipelineConn.nc);
      const stored = (await jsm.streams.info(STREAM_REQUESTS)).state.messages;
      const js = jetstream(acme.nc);
      const err = await rejection(() => js.publish(subject, enc.encode(JSON.stringify({ prompt: "as globex" })), { msgID: nuid.next() }));
      const pe = permissionError(err);
      expect(pe, `rejected with ${String(err)}`).to.be.instanceOf(PermissionViolationError);
      expect(pe!.operation).to.equal("publish");
      expect(pe!.subject).to.equal(subject);
      await publishDenied(acme, "infer.req.high.globex.echo", JSON.stringify({ prompt: "as globex" }));
      // Nothing was stored.
      expect((await jsm.streams.info(STREAM_REQUESTS)).state.messages).to.equal(stored);
    });

    it("acme cannot publish a request on a priority the pipeline does not consume (it would sit in the queue unanswered)", async () => {
      await publishDenied(acme, "infer.req.bogus.acme.echo", JSON.stringify({ prompt: "x" }));
    });

    it("acme cannot subscribe to globex's results, globex's chunks, or every tenant's results", async () => {
      await subscribeDenied(acme, "infer.res.globex.>");
      await subscribeDenied(acme, "infer.tok.globex.>");
      await subscribeDenied(acme, "infer.res.>");
      await subscribeDenied(acme, "infer.res.*.>");
      // Results stored after a refused live publish are the pipeline's alone.
      await subscribeDenied(acme, "infer.kept.globex.>");
      await subscribeDenied(acme, ">");
    });

    it("acme cannot tap the request subjects or anyone else's inbox", async () => {
      await subscribeDenied(acme, "infer.req.>");
      await subscribeDenied(acme, "infer.req.normal.globex.*");
      await subscribeDenied(acme, "_INBOX.>");
      await subscribeDenied(acme, "_INBOX_globex.>");
      await subscribeDenied(acme, "_INBOX_sluice.>");
      await subscribeDenied(acme, "infer.cancel.>");
    });

    it("acme cannot cancel globex's requests", async () => {
      await publishDenied(acme, "infer.cancel.globex.x");
      await publishDenied(acme, "infer.cancel.globex.x.y");
    });

    it("acme cannot announce or hear lane stages (a forged stage could make the pipeline skip requests)", async () => {
      await publishDenied(acme, "infer.lanes.normal", JSON.stringify({ tenant: "globex", stage: "open", owner: "0", start: 1 }));
      await subscribeDenied(acme, "infer.lanes.*");
    });

    it("acme cannot read another tenant's results in INFER_RES (or any stream) through the JetStream API", async () => {
      // A stored globex result exists...
      const id = `globex-private-${nuid.next()}`;
      await globexClient.infer("echo", { prompt: "private" }, { id, timeoutMs: 20_000 });
      const pjsm = await jetstreamManager(pipelineConn.nc);
      const stored = await pjsm.streams.getMessage(STREAM_RESULTS, { last_by_subj: `infer.res.globex.${id}` });
      expect(stored, "the pipeline user can read it").to.not.equal(null);

      // ...but acme gets a permission error for every way of reading it.
      const get = "$JS.API.STREAM.MSG.GET.INFER_RES";
      let err = await rejection(() => acme.nc.request(get, enc.encode(JSON.stringify({ last_by_subj: `infer.res.globex.${id}` })), { timeout: 3_000 }));
      expect(permissionError(err)?.subject, String(err)).to.equal(get);
      const direct = `$JS.API.DIRECT.GET.INFER_RES.infer.res.globex.${id}`;
      err = await rejection(() => acme.nc.request(direct, undefined, { timeout: 3_000 }));
      expect(permissionError(err)?.subject, String(err)).to.equal(direct);
      err = await rejection(() => jetstreamManager(acme.nc));
      expect(permissionError(err)?.subject, String(err)).to.equal("$JS.API.INFO");
      // The client's stored-result lookup names acme's own subjects only: globex's id is not there.
      expect(await acmeClient.stored(id)).to.equal(undefined);
      // Nor can it create a consumer on INFER_RES to read it that way.
      const create = "$JS.API.CONSUMER.CREATE.INFER_RES";
      err = await rejection(() => acme.nc.request(create, enc.encode(JSON.stringify({ stream_name: "INFER_RES", config: { filter_subject: "infer.res.globex.>" } })), { timeout: 3_000 }));
      expect(permissionError(err)?.subject, String(err)).to.equal(create);
    });

    it("acme reads its own stored result later (direct get of infer.res.acme.<id>), without listening when it was published", async () => {
      const deniedBefore = acme.denied.length;
      const { id } = await acmeClient.publish("echo", { prompt: "read me later" });
      const pjsm = await jetstreamManager(pipelineConn.nc);
      await waitFor("the stored result", async () => (await pjsm.streams.getMessage(STREAM_RESULTS, { last_by_subj: `infer.res.acme.${id}` })) !== null, 20_000);
      const r = await acmeClient.stored(id);
      expect(r?.id).to.equal(id);
      expect(r?.output?.text).to.equal("read me later");
      // And result(id), which also looks in the stream, answers at once.
      expect((await acmeClient.result(id, { timeoutMs: 5_000 })).output?.text).to.equal("read me later");
      expect(acme.denied.slice(deniedBefore).map((e) => e.message)).to.deep.equal([]);
    });

    it("acme cannot forge results or dead letters, even for itself", async () => {
      const subject = `infer.res.acme.${nuid.next()}`;
      const err = await rejection(() => jetstream(acme.nc).publish(subject, enc.encode(JSON.stringify({ id: "x", status: "ok" })), { msgID: nuid.next() }));
      expect(permissionError(err)?.subject, String(err)).to.equal(subject);
      await publishDenied(acme, `infer.res.globex.${nuid.next()}`);
      await publishDenied(acme, "infer.tok.acme.x");
      await publishDenied(acme, "infer.dlq.acme.echo");
    });

    it("acme cannot touch the registry or the workers' registrations", async () => {
      await publishDenied(acme, "$KV.infer_models.echo", JSON.stringify({ versions: { evil: { weight: 100 } } }));
      await publishDenied(acme, "$KV.infer_workers.echo.v1.evil", JSON.stringify({ endpoint: "127.0.0.1:1" }));
      await publishDenied(acme, "$JS.API.STREAM.DELETE.INFER_REQ");
    });

    it("acme cannot read or write the result cache (its own answers reach it on infer.res only)", async () => {
      await publishDenied(acme, "$KV.infer_cache.tenant.globex.cached.x", JSON.stringify({ output: { text: "forged" } }));
      await publishDenied(acme, "$KV.infer_cache.tenant.acme.cached.x", JSON.stringify({ output: { text: "forged" } }));
      await publishDenied(acme, "$JS.API.DIRECT.GET.KV_infer_cache.$KV.infer_cache.tenant.globex.cached.x");
      await publishDenied(acme, "$JS.API.STREAM.MSG.GET.KV_infer_cache");
    });

    it("a tenant that keeps the default inbox prefix gets no PubAck: its _INBOX.> subscription is denied", async () => {
      const plain = await open("tenant-acme", { inboxPrefix: "_INBOX" });
      const err = await rejection(() => jetstream(plain.nc).publish("infer.req.normal.acme.echo", enc.encode(JSON.stringify({ prompt: "x" })), { msgID: nuid.next(), timeout: 2_000 }));
      expect(permissionError(err)?.operation, String(err)).to.equal("subscription");
      expect(permissionError(err)?.subject).to.match(/^_INBOX\./);
    });

    it("acme cannot use globex's inbox prefix", async () => {
      const spoof = await open("tenant-acme", { inboxPrefix: "_INBOX_globex" });
      const err = await rejection(() => jetstream(spoof.nc).publish("infer.req.normal.acme.echo", enc.encode(JSON.stringify({ prompt: "x" })), { msgID: nuid.next(), timeout: 2_000 }));
      expect(permissionError(err)?.subject, String(err)).to.match(/^_INBOX_globex\./);
    });
  });

  describe("the pipeline user: enough to serve, nothing more", () => {
    it("served every request above without one permission error, including a dead letter and a stored-result lookup", async () => {
      // A request without a usable id: the pipeline writes a dead letter (infer.dlq.>).
      const jsm = await jetstreamManager(pipelineConn.nc);
      const before = (await jsm.streams.info(STREAM_DLQ)).state.messages;
      const h = natsHeaders();
      h.set("Nats-Msg-Id", "not a valid id!");
      await jetstream(acme.nc).publish("infer.req.normal.acme.echo", enc.encode(JSON.stringify({ prompt: "no id" })), { headers: h });
      await waitFor("a dead letter", async () => (await jsm.streams.info(STREAM_DLQ)).state.messages > before, 15_000);

      // The redelivery check (INFER_RES get by subject) with the pipeline's own connection.
      const sink = new StreamResultSink(jetstream(pipelineConn.nc), jsm);
      const job = { id: "never-published", tenant: "acme" } as unknown as InferJob;
      expect(await sink.hasResult(job)).to.equal(false);
      // Storing a result that reached its client while INFER_RES refused it (infer.kept.>).
      const kept = { id: "kept-once", tenant: "acme" } as unknown as InferJob;
      await sink.keepResult(kept, { id: "kept-once", status: "ok", output: { text: "x" } });
      expect(await sink.hasResult(kept)).to.equal(true);

      expect(pipeline.stats.pullErrors).to.equal(0);
      expect(pipelineConn.denied.map((e) => e.message)).to.deep.equal([]);
      expect(pipelineLog.filter((l) => /permission/i.test(l))).to.deep.equal([]);
    });

    it("a second pipeline process starts on the existing streams and consumers (the update path) and shares the work", async () => {
      const second = await open("pipeline");
      const log: string[] = [];
      const config = testConfig(secured.server.url, {
        models: models(["echo", "upper"]),
        workers: [{ model: "echo", version: "v1", endpoint: worker.server.endpoint }],
      });
      const p2 = await PipelineService.start(config, { nc: second.nc, logger: capturingLogger(log) });
      try {
        const results = await Promise.all(Array.from({ length: 40 }, (_, i) => acmeClient.infer("echo", { prompt: `two ${i}` }, { timeoutMs: 20_000 })));
        expect(results.map((r) => r.output?.text)).to.deep.equal(Array.from({ length: 40 }, (_, i) => `two ${i}`));
      } finally {
        await p2.stop(2_000);
      }
      expect(second.denied.map((e) => e.message)).to.deep.equal([]);
      expect(log.filter((l) => /permission/i.test(l))).to.deep.equal([]);
    });

    it("a worker registers with the worker user, and the pipeline routes a tenant's request to it", async () => {
      const workerConn = await open("worker");
      const registered = await startWorker({ base_ms: 1 });
      extraWorkers.push(registered);
      const registration = await WorkerRegistration.start(workerConn.nc, {
        workerId: "security-worker",
        endpoint: registered.server.endpoint,
        capacity: 8,
        serves: [{ model: "upper", version: "v1" }],
      });
      try {
        // "upper" has no static worker: only the registration can serve it.
        await waitFor("the registered worker to serve 'upper'", async () => {
          const r = await acmeClient.request("upper", { prompt: "via registry" }, { timeoutMs: 3_000 }).catch(() => undefined);
          return r?.status === "ok" && r.output?.text === "VIA REGISTRY";
        }, 20_000, 200);
      } finally {
        await registration.stop();
      }
      // The pipeline's own reads of the bucket work too (get, watch).
      const kv = await new Kvm(pipelineConn.nc).create("infer_workers");
      const w = await kv.watch();
      w.stop();
      expect(workerConn.denied.map((x) => x.message)).to.deep.equal([]);
      expect(pipelineConn.denied.map((x) => x.message)).to.deep.equal([]);
    });

    it("the worker user can do nothing but register", async () => {
      const workerConn = await open("worker");
      const models = await new Kvm(workerConn.nc).open("infer_models");
      const err = await rejection(() => models.put("echo", JSON.stringify({ versions: { evil: { weight: 1 } } })));
      expect(permissionError(err)?.subject, String(err)).to.equal("$KV.infer_models.echo");
      await publishDenied(workerConn, "infer.res.acme.x");
      await subscribeDenied(workerConn, "infer.req.>");
      await subscribeDenied(workerConn, "_INBOX.>");
      // It may look the workers' bucket up, and nothing else.
      const jsm = await jetstreamManager(workerConn.nc);
      expect((await jsm.streams.info("KV_infer_workers")).config.name).to.equal("KV_infer_workers");
      for (const [f, subject] of [
        [() => jsm.streams.info(STREAM_REQUESTS), "$JS.API.STREAM.INFO.INFER_REQ"],
        [() => jsm.streams.getMessage(STREAM_RESULTS, { last_by_subj: "infer.res.acme.x" }), "$JS.API.STREAM.MSG.GET.INFER_RES"],
        [() => jsm.streams.add({ name: "KV_infer_workers", subjects: ["$KV.infer_workers.>"] }), "$JS.API.STREAM.CREATE.KV_infer_workers"],
        [() => jsm.streams.delete("KV_infer_workers"), "$JS.API.STREAM.DELETE.KV_infer_workers"],
      ] as const) {
        const e2 = await rejection(f);
        expect(permissionError(e2)?.subject, String(e2)).to.equal(subject);
      }
    });

    it("cannot delete or purge streams, forge requests, or tap other inboxes", async () => {
      const probe = await open("pipeline");
      const jsm = await jetstreamManager(probe.nc);
      for (const f of [() => jsm.streams.delete(STREAM_REQUESTS), () => jsm.streams.purge(STREAM_RESULTS), () => jsm.streams.delete("KV_infer_models")]) {
        const err = await rejection(f);
        expect(permissionError(err), String(err)).to.be.instanceOf(PermissionViolationError);
      }
      const err = await rejection(() => jsm.consumers.delete(STREAM_REQUESTS, "sluice-normal"));
      expect(permissionError(err)?.subject, String(err)).to.equal("$JS.API.CONSUMER.DELETE.INFER_REQ.sluice-normal");
      // A consumer of its own name pattern on another stream, or another name on INFER_REQ.
      const e2 = await rejection(() => jsm.consumers.add(STREAM_RESULTS, { durable_name: "sluice-normal" }));
      expect(permissionError(e2), String(e2)).to.be.instanceOf(PermissionViolationError);
      await publishDenied(probe, "infer.req.normal.acme.echo", JSON.stringify({ prompt: "forged" }));
      await subscribeDenied(probe, "_INBOX.>");
      await subscribeDenied(probe, "_INBOX_acme.>");
      await subscribeDenied(probe, "infer.req.>");
      await subscribeDenied(probe, "infer.res.>");
    });
  });
});
