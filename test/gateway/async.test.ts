/**
 * Async requests through the gateway: 202 with a Location, GET /v1/requests/{id} (202 pending,
 * 404 unknown, the answer when done), signed callbacks retried until delivered, and the bound on
 * open requests.
 */
import { createServer, type IncomingMessage, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { expect } from "chai";
import type { NatsConnection } from "@nats-io/transport-node";
import { hashApiKey, openApiKeysBucket, putApiKey } from "../../pipeline/gateway/auth.js";
import { verifyCallback } from "../../pipeline/gateway/callbacks.js";
import type { Gateway } from "../../pipeline/gateway/server.js";
import type { PipelineService } from "../../pipeline/service.js";
import { useNats, waitFor } from "../support/nats.js";
import { startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";
import { CALLBACK_SECRET, KEYS, post, startGateway } from "./support.js";

const V1 = { versions: { v1: { weight: 100 } } };

interface Received {
  headers: IncomingMessage["headers"];
  body: string;
}

/** A callback receiver that answers `statuses` in turn (then 200). */
async function receiver(statuses: number[]): Promise<{ server: Server; url: string; got: Received[] }> {
  const got: Received[] = [];
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      got.push({ headers: req.headers, body: Buffer.concat(chunks).toString("utf8") });
      res.writeHead(statuses[got.length - 1] ?? 200).end();
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return { server, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/hook`, got };
}

describe("HTTP gateway: async requests and callbacks", function () {
  this.timeout(120_000);
  const nats = useNats();
  let worker: TestWorker;
  let pipeline: PipelineService;
  let gw: Gateway;
  let gwNc: NatsConnection;

  before(async () => {
    worker = await startWorker();
    const endpoint = worker.server.endpoint;
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: { echo: V1, "embed-sim": V1, idle: V1 },
        workers: [
          { model: "echo", version: "v1", endpoint },
          { model: "embed-sim", version: "v1", endpoint },
        ],
      }),
    );
    ({ gw, nc: gwNc } = await startGateway(nats.url));
  });
  after(async () => {
    await gw?.stop();
    await gwNc?.close();
    await pipeline?.stop();
    await worker?.stop();
  });

  const get = (path: string, key: string = KEYS.acme): Promise<Response> => fetch(`${gw.url}${path}`, { headers: { authorization: `Bearer ${key}` } });

  it("Prefer: respond-async answers 202 with a Location; GET gives the chat completion once done", async () => {
    const r = await post(gw, "/chat/completions", { model: "echo", messages: [{ role: "user", content: "later" }] }, { Prefer: "respond-async" });
    expect(r.status).to.equal(202);
    const accepted = (await r.json()) as { id: string; status: string };
    expect(accepted.status).to.equal("queued");
    expect(r.headers.get("location")).to.equal(`/v1/requests/${accepted.id}`);
    expect(r.headers.get("x-request-id")).to.equal(accepted.id);
    let done: Response | undefined;
    await waitFor("the result", async () => {
      const g = await get(r.headers.get("location")!);
      if (g.status === 202) return false;
      done = g;
      return true;
    });
    expect(done!.status).to.equal(200);
    const body = (await done!.json()) as { id: string; object: string; choices: Array<{ message: { content: string } }> };
    expect(body.object).to.equal("chat.completion");
    expect(body.id).to.equal(accepted.id);
    expect(body.choices[0]!.message.content).to.equal("later");
    // Another tenant does not see it.
    expect((await get(`/v1/requests/${accepted.id}`, KEYS.other)).status).to.equal(404);
  });

  it("GET /v1/requests/{id}: 202 while pending, 404 when unknown", async () => {
    const r = await post(gw, "/completions", { model: "idle", prompt: "waits" }, { Prefer: "respond-async", "Idempotency-Key": "pending-1", "X-Sluice-Timeout-Ms": "600000" });
    expect(r.status).to.equal(202);
    const pending = await get("/v1/requests/pending-1");
    expect(pending.status).to.equal(202);
    expect(((await pending.json()) as { status: string }).status).to.equal("pending");
    expect((await get("/v1/requests/never-sent")).status).to.equal(404);
  });

  it("async embeddings of an array: every input answered, in order", async () => {
    const r = await post(gw, "/embeddings", { model: "embed-sim", input: ["a", "b", "a"], encoding_format: "float" }, { Prefer: "respond-async" });
    expect(r.status).to.equal(202);
    const { id } = (await r.json()) as { id: string };
    let body: { data: Array<{ embedding: number[] }> } | undefined;
    await waitFor("the embeddings", async () => {
      const g = await get(`/v1/requests/${id}`);
      if (g.status !== 200) return false;
      body = (await g.json()) as typeof body;
      return true;
    });
    expect(body!.data).to.have.length(3);
    expect(body!.data[2]!.embedding).to.deep.equal(body!.data[0]!.embedding);
    expect(body!.data[1]!.embedding).to.not.deep.equal(body!.data[0]!.embedding);
  });

  it("callback_url receives the answer as a signed POST, retried after failures until delivered", async () => {
    const hook = await receiver([503, 500]);
    try {
      const r = await post(gw, "/chat/completions", { model: "echo", messages: [{ role: "user", content: "call me" }], callback_url: hook.url });
      expect(r.status).to.equal(202);
      const { id } = (await r.json()) as { id: string };
      await waitFor("three deliveries", () => hook.got.length >= 3);
      expect(hook.got.map((g) => g.headers["x-sluice-attempt"])).to.deep.equal(["1", "2", "3"]);
      for (const g of hook.got) {
        expect(g.headers["x-request-id"]).to.equal(id);
        expect(g.headers["x-sluice-status"]).to.equal("200");
        expect(verifyCallback(CALLBACK_SECRET, g.body, g.headers["x-sluice-signature"] as string)).to.equal(true);
        expect(verifyCallback("another-secret", g.body, g.headers["x-sluice-signature"] as string)).to.equal(false);
        expect(verifyCallback(CALLBACK_SECRET, g.body.replace("call me", "call you"), g.headers["x-sluice-signature"] as string)).to.equal(false);
      }
      expect(new Set(hook.got.map((g) => g.body)).size).to.equal(1);
      const body = JSON.parse(hook.got[0]!.body) as { id: string; choices: Array<{ message: { content: string } }> };
      expect(body.id).to.equal(id);
      expect(body.choices[0]!.message.content).to.equal("call me");
      await waitFor("the callback to be settled", () => gw.callbacks.size === 0);
      expect(hook.got.length).to.equal(3);
      const metrics = await (await fetch(`${gw.url}/metrics`)).text();
      expect(metrics).to.match(/sluice_http_callbacks_total\{outcome="delivered"\} 1/);
      expect(metrics).to.match(/sluice_http_callback_attempts_total 3/);
    } finally {
      hook.server.close();
    }
  });

  it("a callback carries an error answer with its status; a 4xx from the receiver is final; bad callback_url is 400", async () => {
    const hook = await receiver([410]);
    try {
      const r = await post(gw, "/infer/no-such-model", { prompt: "x", callback_url: hook.url });
      expect(r.status).to.equal(202);
      await waitFor("the delivery", () => hook.got.length >= 1);
      expect(hook.got[0]!.headers["x-sluice-status"]).to.equal("404");
      expect((JSON.parse(hook.got[0]!.body) as { error: { code: string } }).error.code).to.equal("NOT_FOUND");
      await waitFor("the callback to be settled", () => gw.callbacks.size === 0);
      expect(hook.got.length).to.equal(1);
    } finally {
      hook.server.close();
    }
    expect((await post(gw, "/infer/echo", { prompt: "x", callback_url: "ftp://example.com/x" })).status).to.equal(400);
    expect((await post(gw, "/infer/echo", { prompt: "x", callback_url: 7 })).status).to.equal(400);
  });

  it("a key written to the bucket infer_api_keys (as its hash) works at once, and stops working when removed", async () => {
    const kv = await openApiKeysBucket(gwNc);
    const ask = (): Promise<Response> => post(gw, "/completions", { model: "echo", prompt: "from the bucket" }, {}, "sk-from-bucket");
    expect((await ask()).status).to.equal(401);
    const hash = await putApiKey(kv, "sk-from-bucket", "bucketed");
    expect(hash).to.equal(hashApiKey("sk-from-bucket"));
    expect((await kv.get(hash))?.string()).to.equal('{"tenant":"bucketed"}');
    await waitFor("the key to work", async () => (await ask()).status === 200);
    const seen = new Promise<string>((resolve) => {
      const sub = gwNc.subscribe("infer.req.*.bucketed.echo", { callback: (_e, m) => (sub.unsubscribe(), resolve(m.subject)) });
    });
    expect((await ask()).status).to.equal(200);
    expect(await seen).to.equal("infer.req.normal.bucketed.echo");
    await kv.delete(hash);
    await waitFor("the key to stop working", async () => (await ask()).status === 401);
  });

  it("beyond maxOpenRequests the answer is 503 at once; a caller that leaves frees its place and cancels its request", async () => {
    const small = await startGateway(nats.url, { maxOpenRequests: 1 });
    try {
      const ac = new AbortController();
      const held = fetch(`${small.gw.baseUrl}/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${KEYS.acme}`, "content-type": "application/json", "idempotency-key": "held-1" },
        body: JSON.stringify({ model: "idle", prompt: "holds its place" }),
        signal: ac.signal,
      }).catch(() => undefined);
      await waitFor("the first request to be open", () => small.gw.openRequests === 1);
      const refused = await post(small.gw, "/completions", { model: "echo", prompt: "x" });
      expect(refused.status).to.equal(503);
      expect(((await refused.json()) as { error: { code: string } }).error.code).to.equal("UNAVAILABLE");
      const cancelled = new Promise<string>((resolve) => {
        const sub = gwNc.subscribe("infer.cancel.acme.held-1", { callback: (_e, m) => (sub.unsubscribe(), resolve(m.subject)) });
      });
      // The listener is known to the server before the caller leaves (else the cancel can pass unseen).
      await gwNc.flush();
      ac.abort();
      await held;
      expect(await cancelled).to.equal("infer.cancel.acme.held-1");
      await waitFor("the place to be free", () => small.gw.openRequests === 0);
      expect((await post(small.gw, "/completions", { model: "echo", prompt: "x" })).status).to.equal(200);
      const metrics = await (await fetch(`${small.gw.url}/metrics`)).text();
      expect(metrics).to.match(/sluice_http_rejected_total\{reason="over_bound"\} 1/);
    } finally {
      await small.gw.stop();
      await small.nc.close();
    }
  });

  it("stop drains: an open request gets its answer before the gateway stops", async () => {
    const g = await startGateway(nats.url, { drainMs: 30_000 });
    try {
      expect((await fetch(`${g.gw.url}/readyz`)).status).to.equal(200);
      const slow = post(g.gw, "/completions", { model: "idle", prompt: "x" }, { "X-Sluice-Timeout-Ms": "300" });
      await waitFor("the request to be open", () => g.gw.openRequests === 1);
      const stopping = g.gw.stop();
      const answered = await slow;
      expect(answered.status).to.equal(504);
      await stopping;
      expect(g.gw.openRequests).to.equal(0);
    } finally {
      await g.gw.stop();
      await g.nc.close();
    }
  });
});
