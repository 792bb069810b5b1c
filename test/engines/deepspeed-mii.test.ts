/**
 * DeepSpeedMiiEngine against a fake MII RESTful gateway on loopback that answers with responses
 * recorded in the gateway's format (fixtures/deepspeed-mii/: Flask `jsonify` of
 * `Response.to_msg_dict()`, Flask-RESTful error bodies, Werkzeug's 404 page), asserting the
 * exact requests the adapter sends.
 */
import { readFileSync } from "node:fs";
import { expect } from "chai";
import { EngineClosedError, EngineError } from "../../worker/engine.js";
import { DEFAULT_MII_CAPACITY, DeepSpeedMiiEngine, type DeepSpeedMiiEngineOptions } from "../../worker/engines/deepspeed-mii.js";
import { FakeServer, reply, type Handler } from "../support/fake-http.js";
import { engineRequests, failed, failureOf, ok, rejectionOf, sleep, waitFor } from "../support/engine-checks.js";

function fixture(name: string): string {
  return readFileSync(new URL(`./fixtures/deepspeed-mii/${name}`, import.meta.url), "utf8");
}

/** A gateway answer in MII's format (Flask sorts the keys) for the given texts. */
function miiAnswer(texts: readonly string[], finish = "stop"): string {
  return `${JSON.stringify(
    texts.map((t) => ({ finish_reason: finish, generated_length: t.split(" ").length, generated_text: t, prompt_length: 2 })),
  )}\n`;
}

const { request, batchOf } = engineRequests("mistral-7b");

const never = new AbortController().signal;
const cleanups: Array<() => Promise<void> | void> = [];
const PATH = "/mii/mistral-deployment";

async function setup(handler: Handler, opts: Partial<DeepSpeedMiiEngineOptions> = {}): Promise<{ server: FakeServer; engine: DeepSpeedMiiEngine }> {
  const server = await FakeServer.start(handler);
  const engine = new DeepSpeedMiiEngine({ baseUrl: server.url, deployment: "mistral-deployment", ...opts });
  cleanups.push(async () => {
    await engine.close();
    await server.stop();
  });
  return { server, engine };
}

afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!();
});

// ---------------------------------------------------------------------------------------------

describe("DeepSpeedMiiEngine.infer", () => {
  it("sends items that share parameters as one prompt list and maps the answers back in order", async () => {
    const { server, engine } = await setup((_req, res) => reply(res, 200, fixture("generate-batch.json")));
    const results = await engine.infer(batchOf(request("a", "DeepSpeed is", { max_tokens: 128 }), request("b", "Seattle is", { max_tokens: 128 })), never);
    expect(server.requests.map((r) => `${r.method} ${r.url} ${String(r.headers["content-type"])}`)).to.deep.equal([`POST ${PATH} application/json`]);
    expect(server.bodies(PATH)).to.deep.equal([{ prompts: ["DeepSpeed is", "Seattle is"], max_new_tokens: 128 }]);
    expect(results).to.deep.equal([
      {
        ok: true,
        output: { text: " a deep learning optimization library that makes distributed training easy", data: { finish_reason: "length" } },
        usage: { prompt_tokens: 3, completion_tokens: 12 },
      },
      { ok: true, output: { text: " a city in the Pacific Northwest.", data: { finish_reason: "stop" } }, usage: { prompt_tokens: 3, completion_tokens: 9 } },
    ]);
  });

  it("maps sluice parameters to MII's generate keywords", async () => {
    const { server, engine } = await setup((req, res) => reply(res, 200, miiAnswer((req.body as { prompts: string[] }).prompts)));
    await engine.infer(batchOf(request("a", "greedy", { max_tokens: 64, temperature: 0, top_k: 40, stop: "\n" })), never);
    await engine.infer(batchOf(request("b", "sampled", { temperature: 0.7, top_p: 0.95, min_tokens: 4, max_length: 512, ignore_eos: true })), never);
    await engine.infer(batchOf(request("c", "explicit", { do_sample: false, n: 1 })), never);
    expect(server.bodies(PATH)).to.deep.equal([
      { prompts: ["greedy"], max_new_tokens: 64, do_sample: false, top_k: 40, stop: "\n" },
      { prompts: ["sampled"], temperature: 0.7, top_p: 0.95, min_new_tokens: 4, max_length: 512, ignore_eos: true },
      { prompts: ["explicit"], do_sample: false },
    ]);
  });

  it("fails items it cannot serve on their own and sends the rest", async () => {
    const { server, engine } = await setup((req, res) => reply(res, 200, miiAnswer((req.body as { prompts: string[] }).prompts)));
    const results = await engine.infer(
      batchOf(
        request("seed", "x", { seed: 7 }),
        request("good", "fine", { max_tokens: 8 }),
        request("contradiction", "x", { temperature: 0, do_sample: true }),
        request("inputs-only", undefined, undefined, { inputs: { image: "..." } }),
        request("zero-top-p", "x", { top_p: 0 }),
        request("late", "x", undefined, { deadlineMs: Date.now() - 1 }),
      ),
      never,
    );
    expect(server.bodies(PATH)).to.deep.equal([{ prompts: ["fine"], max_new_tokens: 8 }]);
    expect(ok(results[1]).output.text).to.equal("fine");
    expect(failed(results[0]).error).to.deep.include({ code: "INVALID_ARGUMENT" });
    expect(failed(results[0]).error.message).to.match(/parameter 'seed' is not supported by DeepSpeed-MII/);
    expect(failed(results[2]).error.message).to.match(/contradicts temperature: 0/);
    expect(failed(results[3]).error.message).to.match(/'inputs' is not supported/);
    expect(failed(results[4]).error.message).to.match(/parameter 'top_p' must be a number > 0 and <= 1/);
    expect(failed(results[5]).error.code).to.equal("DEADLINE_EXCEEDED");
    for (const i of [0, 2, 3, 4, 5]) expect(failed(results[i]).notStarted, `item ${i}`).to.equal(true);
  });

  it("groups items by their parameters, one call per group, and keeps the batch order", async () => {
    const { server, engine } = await setup(async (req, res) => {
      await sleep(20);
      reply(res, 200, miiAnswer((req.body as { prompts: string[] }).prompts.map((p) => `echo:${p}`)));
    });
    const results = await engine.infer(
      batchOf(request("a", "one", { max_tokens: 16 }), request("b", "two", { max_tokens: 32 }), request("c", "three", { max_tokens: 16 })),
      never,
    );
    expect(results.map((r) => ok(r).output.text)).to.deep.equal(["echo:one", "echo:two", "echo:three"]);
    expect(server.bodies(PATH)).to.have.deep.members([
      { prompts: ["one", "three"], max_new_tokens: 16 },
      { prompts: ["two"], max_new_tokens: 32 },
    ]);
    expect(server.maxInFlight).to.equal(2);
  });

  it("keeps the slashes of a default deployment name in the path", async () => {
    const { server, engine } = await setup((req, res) => reply(res, 200, miiAnswer((req.body as { prompts: string[] }).prompts)), {
      deployment: "mistralai/Mistral-7B-v0.1-mii-deployment",
    });
    await engine.infer(batchOf(request("a", "hi")), never);
    expect(server.requests.map((r) => r.url)).to.deep.equal(["/mii/mistralai/Mistral-7B-v0.1-mii-deployment"]);
  });

  it("carries at most `capacity` prompts a call and in flight; 32 by default", async () => {
    expect(DEFAULT_MII_CAPACITY).to.equal(32);
    const { server, engine } = await setup(
      async (req, res) => {
        await sleep(20);
        reply(res, 200, miiAnswer((req.body as { prompts: string[] }).prompts.map((p) => p.toUpperCase())));
      },
      { capacity: 2 },
    );
    const results = await engine.infer(batchOf(...["a", "b", "c", "d", "e"].map((p) => request(p, p))), never);
    expect(results.map((r) => ok(r).output.text)).to.deep.equal(["A", "B", "C", "D", "E"]);
    expect(server.bodies(PATH).map((b) => (b as { prompts: string[] }).prompts)).to.deep.equal([["a", "b"], ["c", "d"], ["e"]]);
    expect(server.maxInFlight).to.equal(1);
  });

  it("asks again prompt by prompt after a 500 for a prompt list, so only the bad prompt fails", async () => {
    const { server, engine } = await setup((req, res) => {
      const prompts = (req.body as { prompts: string[] }).prompts;
      if (prompts.length > 1 || prompts[0] === "way too long") reply(res, 500, fixture("error-500.json"));
      else reply(res, 200, miiAnswer([`echo:${prompts[0]}`]));
    });
    const results = await engine.infer(batchOf(request("a", "one"), request("b", "way too long"), request("c", "three")), never);
    expect(server.bodies(PATH)).to.have.length(4);
    expect(ok(results[0]).output.text).to.equal("echo:one");
    expect(failed(results[1]).error.code).to.equal("INTERNAL");
    expect(ok(results[2]).output.text).to.equal("echo:three");
  });

  describe("maps every error status", () => {
    const itemErrors: Array<[number, string, string, string, string]> = [
      [404, fixture("error-404.html"), "text/html; charset=utf-8", "NOT_FOUND", "The requested URL was not found on the server"],
      [500, fixture("error-500.json"), "application/json", "INTERNAL", "Internal Server Error"],
      [400, fixture("error-400.json"), "application/json", "INVALID_ARGUMENT", "could not understand"],
      [405, JSON.stringify({ message: "The method is not allowed for the requested URL." }), "application/json", "INTERNAL", "not allowed"],
    ];
    for (const [status, body, type, code, detail] of itemErrors) {
      it(`HTTP ${status} -> an item error ${code}`, async () => {
        const { engine } = await setup((_req, res) => reply(res, status, body, type));
        const [result] = await engine.infer(batchOf(request("a", "DeepSpeed is")), never);
        expect(failed(result).error.code).to.equal(code);
        expect(failed(result).error.message).to.include(`HTTP ${status}`).and.include(detail);
      });
    }

    for (const status of [429, 503]) {
      it(`HTTP ${status} -> the batch fails UNAVAILABLE`, async () => {
        const { engine } = await setup((_req, res) => reply(res, status, "busy", "text/plain"));
        const err = await rejectionOf(engine.infer(batchOf(request("a", "DeepSpeed is")), never));
        expect(err).to.be.instanceOf(EngineError);
        expect((err as EngineError).code).to.equal("UNAVAILABLE");
      });
    }

    it("an answer with the wrong number of results -> item errors INTERNAL", async () => {
      const { engine } = await setup((_req, res) => reply(res, 200, miiAnswer(["only one"])));
      const results = await engine.infer(batchOf(request("a", "x"), request("b", "y")), never);
      for (const r of results) {
        expect(failed(r).error.code).to.equal("INTERNAL");
        expect(failed(r).error.message).to.include("1 answers for 2 prompts");
      }
    });

    it("an answer that is not a list -> an item error INTERNAL", async () => {
      const { engine } = await setup((_req, res) => reply(res, 200, JSON.stringify({ generated_text: "x" })));
      const [result] = await engine.infer(batchOf(request("a", "x")), never);
      expect(failed(result).error.message).to.include("not a list");
    });
  });

  it("a connection dropped in the middle of the answer fails the batch UNAVAILABLE", async () => {
    const { engine } = await setup((_req, res) => {
      const body = fixture("generate-batch.json");
      res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
      res.write(body.slice(0, 30));
      setTimeout(() => res.socket?.destroy(), 10);
    });
    const err = await rejectionOf(engine.infer(batchOf(request("a", "DeepSpeed is"), request("b", "Seattle is")), never));
    expect((err as EngineError).code).to.equal("UNAVAILABLE");
  });

  it("gives up after requestTimeoutMs with DEADLINE_EXCEEDED and drops the request", async () => {
    const { server, engine } = await setup(() => undefined, { requestTimeoutMs: 100 });
    const err = await rejectionOf(engine.infer(batchOf(request("a", "DeepSpeed is")), never));
    expect((err as EngineError).code).to.equal("DEADLINE_EXCEEDED");
    await waitFor("the server to see the request dropped", () => server.dropped.length === 1);
  });

  it("close() fails work in flight and later calls with EngineClosedError", async () => {
    const { server, engine } = await setup(() => undefined);
    const pending = engine.infer(batchOf(request("a", "DeepSpeed is")), never);
    await waitFor("the request to arrive", () => server.requests.length === 1);
    await engine.close();
    await engine.close();
    expect(await rejectionOf(pending)).to.be.instanceOf(EngineClosedError);
    expect(await rejectionOf(engine.infer(batchOf(request("b", "x")), never))).to.be.instanceOf(EngineClosedError);
  });
});

describe("DeepSpeedMiiEngine.generate", () => {
  it("yields the whole text as one chunk (the gateway does not stream) with MII's usage", async () => {
    const { server, engine } = await setup((_req, res) => reply(res, 200, fixture("generate-single.json")));
    const generation = engine.generate(request("g", "Write a haiku", { max_tokens: 7 }), never);
    const texts: string[] = [];
    for await (const t of generation) texts.push(t.text);
    expect(texts).to.deep.equal([" Messages wait in line —\ncafé ☕"]);
    expect(generation.usage()).to.deep.equal({ prompt_tokens: 6, completion_tokens: 7 });
    expect(generation.finishReason()).to.equal("stop");
    expect(server.bodies(PATH)).to.deep.equal([{ prompts: ["Write a haiku"], max_new_tokens: 7 }]);
  });

  it("yields nothing for an empty text", async () => {
    const { engine } = await setup((_req, res) => reply(res, 200, miiAnswer([""])));
    const generation = engine.generate(request("g", "x"), never);
    const texts: string[] = [];
    for await (const t of generation) texts.push(t.text);
    expect(texts).to.deep.equal([]);
  });

  for (const [status, body, code] of [
    [404, fixture("error-404.html"), "NOT_FOUND"],
    [500, fixture("error-500.json"), "INTERNAL"],
    [503, "busy", "UNAVAILABLE"],
  ] as const) {
    it(`HTTP ${status} -> throws ${code}`, async () => {
      const { engine } = await setup((_req, res) => reply(res, status, body, "text/html"));
      const { error } = await failureOf(engine.generate(request("g", "x"), never));
      expect(error).to.be.instanceOf(EngineError);
      expect((error as EngineError).code).to.equal(code);
    });
  }

  it("an unknown parameter throws INVALID_ARGUMENT without a call", async () => {
    const { server, engine } = await setup((_req, res) => reply(res, 200, miiAnswer(["x"])));
    const { error } = await failureOf(engine.generate(request("g", "x", { seed: 1 }), never));
    expect((error as EngineError).code).to.equal("INVALID_ARGUMENT");
    expect(server.requests).to.have.length(0);
  });

  it("a dropped connection throws UNAVAILABLE", async () => {
    const { engine } = await setup((_req, res) => {
      res.writeHead(200, { "Content-Type": "application/json", "Content-Length": 500 });
      res.write('[{"finish_reason":"st');
      setTimeout(() => res.socket?.destroy(), 10);
    });
    const { error } = await failureOf(engine.generate(request("g", "x"), never));
    expect((error as EngineError).code).to.equal("UNAVAILABLE");
  });

  it("aborting while MII generates throws the signal's reason and drops the HTTP request at once", async () => {
    const { server, engine } = await setup(() => undefined);
    const ac = new AbortController();
    const pending = failureOf(engine.generate(request("g", "x"), ac.signal));
    await waitFor("the request to arrive", () => server.requests.length === 1);
    const reason = new EngineError("CANCELLED", "call cancelled by the client");
    ac.abort(reason);
    await waitFor("the server to see the request dropped", () => server.dropped.length === 1);
    expect((await pending).error).to.equal(reason);
    expect(engine.inFlight).to.equal(0);
  });

  it("times out with DEADLINE_EXCEEDED", async () => {
    const { engine } = await setup(() => undefined, { requestTimeoutMs: 100 });
    const { error } = await failureOf(engine.generate(request("g", "x"), never));
    expect((error as EngineError).code).to.equal("DEADLINE_EXCEEDED");
  });
});

describe("DeepSpeedMiiEngine.health", () => {
  it("is true when GET /healthz answers ok, false otherwise", async () => {
    let status = 200;
    const { server, engine } = await setup((_req, res) => reply(res, status, "ok", "text/html; charset=utf-8"));
    expect(await engine.health()).to.equal(true);
    expect(server.requests.map((r) => `${r.method} ${r.url}`)).to.deep.equal(["GET /healthz"]);
    status = 500;
    expect(await engine.health()).to.equal(false);
    await server.stop();
    expect(await engine.health()).to.equal(false);
  });

  it("refuses a missing deployment name", () => {
    expect(() => new DeepSpeedMiiEngine({ baseUrl: "http://127.0.0.1:1", deployment: " " })).to.throw(TypeError, /deployment/);
  });
});
