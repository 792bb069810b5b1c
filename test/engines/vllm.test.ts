/**
 * VllmEngine against a fake vLLM server on loopback that answers with responses recorded in
 * vLLM's wire format (fixtures/vllm/), asserting the exact requests the adapter sends; the SSE
 * decoder on its own; createEngine; and one end-to-end path WorkerClient -> WorkerServer ->
 * VllmEngine -> fake vLLM.
 */
import { readFileSync } from "node:fs";
import type { ServerResponse } from "node:http";
import { expect } from "chai";
import { WorkerClient, type WorkerChunk } from "../../pipeline/workers/mod.js";
import { EngineClosedError, EngineError } from "../../worker/engine.js";
import { createEngine, ENGINE_NAMES, EngineSpecError } from "../../worker/engines.js";
import { DeepSpeedMiiEngine } from "../../worker/engines/deepspeed-mii.js";
import { WorkerServer } from "../../worker/server.js";
import { SimulatedEngine } from "../../worker/engines/simulated.js";
import { VllmEngine, type VllmEngineOptions } from "../../worker/engines/vllm.js";
import { apportion } from "../../worker/http/batch.js";
import { SseDecoder } from "../../worker/http/sse.js";
import { FakeServer, reply, type Handler } from "../support/fake-http.js";
import { collect, engineRequests, failed, failureOf, ok, rejectionOf, sleep, waitFor } from "../support/engine-checks.js";

/** Writes an SSE body in `pieces`, each its own TCP write after a short pause. */
async function stream(res: ServerResponse, pieces: ReadonlyArray<string | Uint8Array>, pauseMs = 2): Promise<void> {
  res.writeHead(200, { "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache" });
  for (const piece of pieces) {
    if (res.destroyed) return;
    res.write(piece);
    await sleep(pauseMs);
  }
  res.end();
}

function fixture(name: string): string {
  return readFileSync(new URL(`./fixtures/vllm/${name}`, import.meta.url), "utf8");
}

function fixtureJson(name: string): Record<string, unknown> {
  return JSON.parse(fixture(name)) as Record<string, unknown>;
}

/** A `/v1/completions` answer in vLLM's format for the given choices (texts in prompt order). */
function completionAnswer(texts: readonly string[], finish = "stop"): string {
  const base = fixtureJson("completions-single.json");
  return JSON.stringify({
    ...base,
    choices: texts.map((text, index) => ({
      index,
      text,
      logprobs: null,
      finish_reason: finish,
      stop_reason: null,
      token_ids: texts.length > 1 ? Array.from({ length: text.length }, (_, i) => i) : null,
      prompt_logprobs: null,
      prompt_token_ids: texts.length > 1 ? [128000, 1, 2] : null,
    })),
    usage: { prompt_tokens: 3 * texts.length, total_tokens: 0, completion_tokens: 0, prompt_tokens_details: null },
  });
}

const { request, batchOf } = engineRequests("llama3-8b");

const never = new AbortController().signal;
const cleanups: Array<() => Promise<void> | void> = [];

async function setup(handler: Handler, opts: Partial<VllmEngineOptions> = {}): Promise<{ server: FakeServer; engine: VllmEngine }> {
  const server = await FakeServer.start(handler);
  const engine = new VllmEngine({ baseUrl: server.url, servedModel: "llama3-8b", ...opts });
  cleanups.push(async () => {
    await engine.close();
    await server.stop();
  });
  return { server, engine };
}

afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!();
});

const HAIKU = "Write a haiku about queues";
const RIVERS = "Name three rivers";
const HI = "Say hi";

// ---------------------------------------------------------------------------------------------

describe("VllmEngine.infer", () => {
  it("sends items that share parameters as one prompt list and maps every choice back to its item", async () => {
    const { server, engine } = await setup((_req, res) => reply(res, 200, fixture("completions-batch.json")));
    const results = await engine.infer(
      batchOf(request("a", HAIKU, { max_tokens: 32, temperature: 0.7 }), request("b", RIVERS, { max_tokens: 32, temperature: 0.7 }), request("c", HI, { temperature: 0.7, max_tokens: 32 })),
      never,
    );

    expect(server.requests).to.have.length(1);
    expect(server.requests[0]!.method).to.equal("POST");
    expect(server.requests[0]!.headers["content-type"]).to.equal("application/json");
    expect(server.bodies("/v1/completions")).to.deep.equal([
      { model: "llama3-8b", prompt: [HAIKU, RIVERS, HI], max_tokens: 32, temperature: 0.7, return_token_ids: true },
    ]);
    expect(results).to.deep.equal([
      {
        ok: true,
        output: { text: " Messages wait in line,\npatient as the tide rolls in,\nacked, then gone at last.", data: { finish_reason: "stop" } },
        usage: { prompt_tokens: 7, completion_tokens: 17 },
      },
      { ok: true, output: { text: " The Nile, the Amazon and the", data: { finish_reason: "length" } }, usage: { prompt_tokens: 4, completion_tokens: 9 } },
      { ok: true, output: { text: " Hi!", data: { finish_reason: "stop" } }, usage: { prompt_tokens: 3, completion_tokens: 2 } },
    ]);
  });

  it("maps choices by their index, not by their position in the answer", async () => {
    const answer = fixtureJson("completions-batch.json");
    answer["choices"] = [...(answer["choices"] as unknown[])].reverse();
    const { engine } = await setup((_req, res) => reply(res, 200, JSON.stringify(answer)));
    const results = await engine.infer(batchOf(request("a", HAIKU), request("b", RIVERS), request("c", HI)), never);
    expect(results.map((r) => ok(r).output.text)).to.deep.equal([
      " Messages wait in line,\npatient as the tide rolls in,\nacked, then gone at last.",
      " The Nile, the Amazon and the",
      " Hi!",
    ]);
    expect(results.map((r) => ok(r).usage.prompt_tokens)).to.deep.equal([7, 4, 3]);
  });

  it("sends a single item as a plain prompt and takes the answer's usage", async () => {
    const { server, engine } = await setup((_req, res) => reply(res, 200, fixture("completions-single.json")));
    const [result] = await engine.infer(batchOf(request("a", HAIKU, { max_tokens: 8, stop: ["\n"], seed: 7, top_p: 0.9 })), never);
    expect(server.bodies("/v1/completions")).to.deep.equal([{ model: "llama3-8b", prompt: HAIKU, max_tokens: 8, stop: ["\n"], seed: 7, top_p: 0.9 }]);
    expect(result).to.deep.equal({
      ok: true,
      output: { text: " Messages wait in line.", data: { finish_reason: "stop" } },
      usage: { prompt_tokens: 7, completion_tokens: 6 },
    });
  });

  it("groups items by their parameters, runs the groups at once, and keeps the batch order", async () => {
    const { server, engine } = await setup(async (req, res) => {
      const body = req.body as { prompt: string | string[] };
      const prompts = Array.isArray(body.prompt) ? body.prompt : [body.prompt];
      await sleep(20);
      reply(res, 200, completionAnswer(prompts.map((p) => `echo:${p}`)));
    });
    const results = await engine.infer(
      batchOf(request("a", "one", { max_tokens: 16 }), request("b", "two", { max_tokens: 32 }), request("c", "three", { max_tokens: 16 })),
      never,
    );
    expect(results.map((r) => ok(r).output.text)).to.deep.equal(["echo:one", "echo:two", "echo:three"]);
    const bodies = server.bodies("/v1/completions");
    expect(bodies).to.have.deep.members([
      { model: "llama3-8b", prompt: ["one", "three"], max_tokens: 16, return_token_ids: true },
      { model: "llama3-8b", prompt: "two", max_tokens: 32 },
    ]);
    expect(server.maxInFlight).to.equal(2);
  });

  it("fails items it cannot serve on their own and sends the rest", async () => {
    const { server, engine } = await setup((_req, res) => reply(res, 200, fixture("completions-single.json")));
    const results = await engine.infer(
      batchOf(
        request("bad-param", HAIKU, { max_tokens: 8, simulate_error: "NOT_FOUND" }),
        request("good", HAIKU, { max_tokens: 8 }),
        request("inputs-only", undefined, undefined, { inputs: { image: "..." } }),
        request("inputs-too", HAIKU, undefined, { inputs: [1, 2] }),
        request("two-answers", HAIKU, { n: 2 }),
        request("bad-type", HAIKU, { temperature: "hot" }),
        request("late", HAIKU, undefined, { deadlineMs: Date.now() - 1 }),
      ),
      never,
    );
    expect(server.bodies("/v1/completions")).to.deep.equal([{ model: "llama3-8b", prompt: HAIKU, max_tokens: 8 }]);
    expect(ok(results[1]).output.text).to.equal(" Messages wait in line.");
    for (const i of [0, 2, 3, 4, 5]) {
      expect(failed(results[i]).error.code, `item ${i}`).to.equal("INVALID_ARGUMENT");
      expect(failed(results[i]).notStarted, `item ${i}`).to.equal(true);
    }
    expect(failed(results[0]).error.message).to.match(/parameter 'simulate_error' is not supported by vLLM/);
    expect(failed(results[2]).error.message).to.match(/'inputs' is not supported/);
    expect(failed(results[3]).error.message).to.match(/'inputs' is not supported/);
    expect(failed(results[4]).error.message).to.match(/parameter 'n' must be 1/);
    expect(failed(results[5]).error.message).to.match(/parameter 'temperature' must be a number >= 0/);
    expect(failed(results[6]).error.code).to.equal("DEADLINE_EXCEEDED");
    expect(failed(results[6]).notStarted).to.equal(true);
  });

  it("merges defaultParameters under the request's own, and refuses bad defaults up front", async () => {
    const { server, engine } = await setup((_req, res) => reply(res, 200, fixture("completions-single.json")), {
      defaultParameters: { max_tokens: 64, temperature: 0 },
    });
    await engine.infer(batchOf(request("a", HAIKU, { temperature: 0.5 })), never);
    expect(server.bodies("/v1/completions")).to.deep.equal([{ model: "llama3-8b", prompt: HAIKU, max_tokens: 64, temperature: 0.5 }]);
    expect(() => new VllmEngine({ baseUrl: server.url, defaultParameters: { beam_width: 4 } })).to.throw(TypeError, /beam_width/);
  });

  it("splits a summed usage over the items when the server sends no token ids (before return_token_ids)", async () => {
    const { engine } = await setup((_req, res) => reply(res, 200, fixture("completions-batch-legacy.json")));
    const results = await engine.infer(batchOf(request("a", HAIKU), request("b", RIVERS), request("c", HI)), never);
    const usages = results.map((r) => ok(r).usage);
    expect(usages.reduce((a, u) => a + u.prompt_tokens, 0)).to.equal(14);
    expect(usages.reduce((a, u) => a + u.completion_tokens, 0)).to.equal(28);
    // Longest prompt and longest output get the largest shares.
    expect(usages[0]!.prompt_tokens).to.be.greaterThan(usages[2]!.prompt_tokens);
    expect(usages[0]!.completion_tokens).to.be.greaterThan(usages[1]!.completion_tokens);
  });

  it("asks again prompt by prompt when vLLM refuses a prompt list, so only the bad prompt fails", async () => {
    const { server, engine } = await setup((req, res) => {
      const prompt = (req.body as { prompt: string | string[] }).prompt;
      if (Array.isArray(prompt) || prompt === "way too long") reply(res, 400, fixture("error-400.json"));
      else reply(res, 200, completionAnswer([`echo:${prompt}`]));
    });
    const results = await engine.infer(batchOf(request("a", "one"), request("b", "way too long"), request("c", "three")), never);
    expect(server.bodies("/v1/completions")).to.have.length(4);
    expect(ok(results[0]).output.text).to.equal("echo:one");
    expect(failed(results[1]).error.code).to.equal("INVALID_ARGUMENT");
    expect(failed(results[1]).error.message).to.include("maximum context length is 8192 tokens");
    expect(ok(results[2]).output.text).to.equal("echo:three");
  });

  it("carries at most `capacity` prompts a call and `capacity` items in flight", async () => {
    const { server, engine } = await setup(
      async (req, res) => {
        const prompt = (req.body as { prompt: string | string[] }).prompt;
        await sleep(30);
        reply(res, 200, completionAnswer((Array.isArray(prompt) ? prompt : [prompt]).map((p) => p.toUpperCase())));
      },
      { capacity: 2 },
    );
    const results = await engine.infer(batchOf(...["a", "b", "c", "d", "e"].map((p) => request(p, p))), never);
    expect(results.map((r) => ok(r).output.text)).to.deep.equal(["A", "B", "C", "D", "E"]);
    expect(server.bodies("/v1/completions").map((b) => (b as { prompt: unknown }).prompt)).to.deep.equal([["a", "b"], ["c", "d"], "e"]);
    expect(server.maxInFlight).to.equal(1);
  });

  it("uses chat completions with the prompt as one user message, one call per item, bounded by capacity", async () => {
    const { server, engine } = await setup(
      async (_req, res) => {
        await sleep(30);
        reply(res, 200, fixture("chat-completion.json"));
      },
      { chat: true, capacity: 2, servedModel: "llama3-8b-instruct" },
    );
    const results = await engine.infer(batchOf(...[1, 2, 3, 4, 5].map((i) => request(`r${i}`, `hello ${i}`, { max_tokens: 10 }))), never);
    const bodies = server.bodies("/v1/chat/completions");
    expect(bodies).to.have.deep.members(
      [1, 2, 3, 4, 5].map((i) => ({ model: "llama3-8b-instruct", messages: [{ role: "user", content: `hello ${i}` }], max_tokens: 10 })),
    );
    expect(server.maxInFlight).to.equal(2);
    expect(results).to.have.length(5);
    for (const r of results) {
      expect(r).to.deep.equal({
        ok: true,
        output: { text: "Hello! How can I help you today?", data: { finish_reason: "stop" } },
        usage: { prompt_tokens: 12, completion_tokens: 10 },
      });
    }
  });

  it("sends the API key, the trace context, and takes a base URL that ends in /v1", async () => {
    const server = await FakeServer.start((_req, res) => reply(res, 200, fixture("completions-single.json")));
    const engine = new VllmEngine({ baseUrl: `${server.url}/v1/`, apiKey: "token-abc123" });
    cleanups.push(async () => {
      await engine.close();
      await server.stop();
    });
    const traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    await engine.infer(batchOf(request("a", HAIKU, undefined, { traceparent })), never);
    const [sent] = server.requests;
    expect(sent!.url).to.equal("/v1/completions");
    expect(sent!.headers["authorization"]).to.equal("Bearer token-abc123");
    expect(sent!.headers["traceparent"]).to.equal(traceparent);
    // Without servedModel the request's model is the served model name.
    expect(sent!.body).to.deep.equal({ model: "llama3-8b", prompt: HAIKU });
  });

  describe("maps every error status", () => {
    const itemErrors: Array<[number, string, string, string]> = [
      [400, fixture("error-400.json"), "INVALID_ARGUMENT", "maximum context length is 8192 tokens"],
      [400, fixture("error-400-legacy.json"), "INVALID_ARGUMENT", "you requested 9017 tokens"],
      [422, JSON.stringify({ detail: [{ loc: ["body", "prompt"], msg: "field required" }] }), "INVALID_ARGUMENT", "field required"],
      [404, fixture("error-404.json"), "NOT_FOUND", "The model `llama3-70b` does not exist."],
      [500, fixture("error-500.json"), "INTERNAL", "Internal server error"],
      [501, JSON.stringify({ error: { message: "suffix is not supported", type: "NotImplementedError", param: null, code: 501 } }), "INTERNAL", "suffix is not supported"],
      [401, fixture("error-401.json"), "INTERNAL", "Unauthorized"],
    ];
    for (const [status, body, code, detail] of itemErrors) {
      it(`HTTP ${status} -> an item error ${code}`, async () => {
        const { engine } = await setup((_req, res) => reply(res, status, body));
        const [result] = await engine.infer(batchOf(request("a", HAIKU)), never);
        expect(failed(result).error.code).to.equal(code);
        expect(failed(result).error.message).to.include(`HTTP ${status}`);
        expect(failed(result).error.message).to.include(detail);
      });
    }

    for (const status of [429, 502, 503, 504]) {
      it(`HTTP ${status} -> the batch fails UNAVAILABLE (retriable on another worker)`, async () => {
        const { engine } = await setup((_req, res) => reply(res, status, "upstream busy", "text/plain"));
        const err = await rejectionOf(engine.infer(batchOf(request("a", HAIKU), request("b", RIVERS)), never));
        expect(err).to.be.instanceOf(EngineError);
        expect((err as EngineError).code).to.equal("UNAVAILABLE");
        expect((err as EngineError).message).to.include(`HTTP ${status}`).and.include("upstream busy");
      });
    }

    it("a 503 for one group and an answer for another: item errors, not a failed batch", async () => {
      const { engine } = await setup((req, res) => {
        if ((req.body as { max_tokens?: number }).max_tokens === 1) reply(res, 503, "busy", "text/plain");
        else reply(res, 200, fixture("completions-single.json"));
      });
      const results = await engine.infer(batchOf(request("a", HAIKU, { max_tokens: 1 }), request("b", HAIKU)), never);
      expect(failed(results[0]).error.code).to.equal("UNAVAILABLE");
      expect(ok(results[1]).output.text).to.equal(" Messages wait in line.");
    });

    it("an answer that is not JSON -> an item error INTERNAL", async () => {
      const { engine } = await setup((_req, res) => reply(res, 200, "<html>proxy login</html>", "text/html"));
      const [result] = await engine.infer(batchOf(request("a", HAIKU)), never);
      expect(failed(result).error.code).to.equal("INTERNAL");
      expect(failed(result).error.message).to.include("malformed answer");
    });

    it("finish_reason abort -> an item error UNAVAILABLE", async () => {
      const { engine } = await setup((_req, res) => reply(res, 200, completionAnswer(["partial"], "abort")));
      const [result] = await engine.infer(batchOf(request("a", HAIKU)), never);
      expect(failed(result).error.code).to.equal("UNAVAILABLE");
    });
  });

  it("a refused connection fails the batch UNAVAILABLE", async () => {
    const server = await FakeServer.start();
    const url = server.url;
    await server.stop();
    const engine = new VllmEngine({ baseUrl: url });
    cleanups.push(() => engine.close());
    const err = await rejectionOf(engine.infer(batchOf(request("a", HAIKU)), never));
    expect(err).to.be.instanceOf(EngineError);
    expect((err as EngineError).code).to.equal("UNAVAILABLE");
    expect((err as EngineError).message).to.match(/ECONNREFUSED/);
  });

  it("a connection dropped in the middle of the answer fails the batch UNAVAILABLE", async () => {
    const { engine } = await setup((_req, res) => {
      const body = fixture("completions-single.json");
      res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
      res.write(body.slice(0, 40));
      setTimeout(() => res.socket?.destroy(), 10);
    });
    const err = await rejectionOf(engine.infer(batchOf(request("a", HAIKU)), never));
    expect((err as EngineError).code).to.equal("UNAVAILABLE");
  });

  it("gives up after requestTimeoutMs with DEADLINE_EXCEEDED and drops the request", async () => {
    const requestTimeoutMs = 100;
    const { server, engine } = await setup(() => undefined, { requestTimeoutMs });
    const t0 = Date.now();
    // The server never answers: only the timeout ends the call (were it not to, the test's own
    // timeout would end the test).
    const err = await rejectionOf(engine.infer(batchOf(request("a", HAIKU)), never));
    expect((err as EngineError).code).to.equal("DEADLINE_EXCEEDED");
    // It waited its timeout out (a timer never fires early; 5 ms for rounding).
    expect(Date.now() - t0).to.be.at.least(requestTimeoutMs - 5);
    await waitFor("the server to see the request dropped", () => server.dropped.length === 1);
  });

  it("rejects with the signal's reason when aborted, and the server sees the request closed", async () => {
    const { server, engine } = await setup(() => undefined);
    const ac = new AbortController();
    const pending = engine.infer(batchOf(request("a", HAIKU)), ac.signal);
    await waitFor("the request to arrive", () => server.requests.length === 1);
    const reason = new EngineError("CANCELLED", "the caller gave up");
    ac.abort(reason);
    expect(await rejectionOf(pending)).to.equal(reason);
    await waitFor("the server to see the request dropped", () => server.dropped.length === 1);
  });

  it("close() fails work in flight and later calls with EngineClosedError; twice is fine", async () => {
    const { server, engine } = await setup(() => undefined);
    const pending = engine.infer(batchOf(request("a", HAIKU)), never);
    await waitFor("the request to arrive", () => server.requests.length === 1);
    await engine.close();
    expect(await rejectionOf(pending)).to.be.instanceOf(EngineClosedError);
    await waitFor("the server to see the request dropped", () => server.dropped.length === 1);
    await engine.close();
    expect(await rejectionOf(engine.infer(batchOf(request("b", HAIKU)), never))).to.be.instanceOf(EngineClosedError);
    expect((await failureOf(engine.generate(request("c", HAIKU), never))).error).to.be.instanceOf(EngineClosedError);
  });
});

describe("VllmEngine.generate", () => {
  const STREAM_TEXT = ["Messages", " wait", " in line —", "\n", "café", " ☕", " 🌊"];

  it("streams text deltas, takes usage from the final chunk, and sends the exact streaming request", async () => {
    const { server, engine } = await setup((_req, res) => stream(res, [fixture("completions-stream.sse")]));
    const generation = engine.generate(request("a", HAIKU, { max_tokens: 16, temperature: 0.2 }), never);
    expect(await collect(generation)).to.deep.equal(STREAM_TEXT);
    expect(generation.usage()).to.deep.equal({ prompt_tokens: 7, completion_tokens: 9 });
    expect(generation.finishReason()).to.equal("stop");
    expect(server.bodies("/v1/completions")).to.deep.equal([
      { model: "llama3-8b", prompt: HAIKU, max_tokens: 16, temperature: 0.2, stream: true, stream_options: { include_usage: true } },
    ]);
  });

  it("reassembles a stream split at awkward byte boundaries (inside a field name, a CRLF, a UTF-8 character, [DONE])", async () => {
    // The same events with CRLF line ends and a keep-alive comment, cut into pieces where a
    // naive line reader would break.
    const text = fixture("completions-stream.sse").replace(/\n/g, "\r\n");
    const bytes = Buffer.from(`: keep-alive\r\n\r\n${text}`, "utf8");
    const cuts = new Set<number>([3, 20, 21]);
    const crlf = bytes.indexOf("\r\n", 30);
    cuts.add(crlf + 1); // between CR and LF
    for (const ch of ["—", "é", "☕", "🌊"]) cuts.add(bytes.indexOf(Buffer.from(ch, "utf8")) + 1); // inside the character
    cuts.add(bytes.indexOf("[DONE]") + 3);
    const sorted = [...cuts].sort((a, b) => a - b);
    const pieces: Uint8Array[] = [];
    let from = 0;
    for (const at of sorted) {
      pieces.push(bytes.subarray(from, at));
      from = at;
    }
    pieces.push(bytes.subarray(from));
    const { engine } = await setup((_req, res) => stream(res, pieces, 5));
    const generation = engine.generate(request("a", HAIKU), never);
    expect(await collect(generation)).to.deep.equal(STREAM_TEXT);
    expect(generation.usage()).to.deep.equal({ prompt_tokens: 7, completion_tokens: 9 });
  });

  it("reassembles a stream written one byte at a time", async () => {
    const bytes = Buffer.from(fixture("completions-stream.sse"), "utf8");
    const pieces = Array.from({ length: bytes.length }, (_, i) => bytes.subarray(i, i + 1));
    const { engine } = await setup((_req, res) => stream(res, pieces, 0));
    expect((await collect(engine.generate(request("a", HAIKU), never))).join("")).to.equal(STREAM_TEXT.join(""));
  });

  it("counts the chunks as completion tokens when the server sends no usage", async () => {
    const { engine } = await setup((_req, res) => stream(res, [fixture("completions-stream-no-usage.sse")]));
    const generation = engine.generate(request("a", HAIKU), never);
    expect(await collect(generation)).to.deep.equal(STREAM_TEXT);
    expect(generation.usage()).to.deep.equal({ prompt_tokens: 0, completion_tokens: 7 });
  });

  it("streams chat deltas in chat mode", async () => {
    const { server, engine } = await setup((_req, res) => stream(res, [fixture("chat-stream.sse")]), { chat: true, servedModel: "llama3-8b-instruct" });
    const generation = engine.generate(request("a", "Hello", { max_tokens: 6 }), never);
    expect(await collect(generation)).to.deep.equal(["Hello", "!", " How can I help?"]);
    expect(generation.usage()).to.deep.equal({ prompt_tokens: 12, completion_tokens: 6 });
    expect(generation.finishReason()).to.equal("length");
    expect(server.bodies("/v1/chat/completions")).to.deep.equal([
      {
        model: "llama3-8b-instruct",
        messages: [{ role: "user", content: "Hello" }],
        max_tokens: 6,
        stream: true,
        stream_options: { include_usage: true },
      },
    ]);
  });

  it("throws the error event of a stream with its code, after the text before it", async () => {
    const { engine } = await setup((_req, res) => stream(res, [fixture("stream-error.sse")]));
    const { texts, error } = await failureOf(engine.generate(request("a", HAIKU), never));
    expect(texts).to.deep.equal(["Messages"]);
    expect(error).to.be.instanceOf(EngineError);
    expect((error as EngineError).code).to.equal("INTERNAL");
    expect((error as EngineError).message).to.include("Internal server error");
  });

  const statuses: Array<[number, string, string]> = [
    [400, fixture("error-400.json"), "INVALID_ARGUMENT"],
    [400, fixture("error-400-legacy.json"), "INVALID_ARGUMENT"],
    [404, fixture("error-404.json"), "NOT_FOUND"],
    [429, "Too Many Requests", "UNAVAILABLE"],
    [503, "Service Unavailable", "UNAVAILABLE"],
    [500, fixture("error-500.json"), "INTERNAL"],
  ];
  for (const [status, body, code] of statuses) {
    it(`HTTP ${status} before the stream -> ${code}`, async () => {
      const { engine } = await setup((_req, res) => reply(res, status, body));
      const { texts, error } = await failureOf(engine.generate(request("a", HAIKU), never));
      expect(texts).to.deep.equal([]);
      expect((error as EngineError).code).to.equal(code);
    });
  }

  it("an unknown parameter fails the generation INVALID_ARGUMENT without a call", async () => {
    const { server, engine } = await setup((_req, res) => stream(res, [fixture("completions-stream.sse")]));
    const { error } = await failureOf(engine.generate(request("a", HAIKU, { best_of: 3 }), never));
    expect((error as EngineError).code).to.equal("INVALID_ARGUMENT");
    expect(server.requests).to.have.length(0);
  });

  it("a connection dropped in the middle of the stream -> UNAVAILABLE after the text before it", async () => {
    const events = fixture("completions-stream.sse").split("\n\n");
    const { engine } = await setup(async (_req, res) => {
      res.writeHead(200, { "Content-Type": "text/event-stream" });
      res.write(`${events[0]}\n\n${events[1]}\n\n`);
      await sleep(20);
      res.socket?.destroy();
    });
    const { texts, error } = await failureOf(engine.generate(request("a", HAIKU), never));
    expect(texts).to.deep.equal(["Messages", " wait"]);
    expect(error).to.be.instanceOf(EngineError);
    expect((error as EngineError).code).to.equal("UNAVAILABLE");
  });

  it("a stream that ends without [DONE] -> UNAVAILABLE", async () => {
    const events = fixture("completions-stream.sse").split("\n\n");
    const { engine } = await setup((_req, res) => stream(res, [`${events[0]}\n\n`]));
    const { texts, error } = await failureOf(engine.generate(request("a", HAIKU), never));
    expect(texts).to.deep.equal(["Messages"]);
    expect((error as EngineError).code).to.equal("UNAVAILABLE");
    expect((error as EngineError).message).to.include("[DONE]");
  });

  it("aborting mid-stream throws the signal's reason and drops the HTTP request at once", async () => {
    const events = fixture("completions-stream.sse").split("\n\n");
    const { server, engine } = await setup(async (_req, res) => {
      res.writeHead(200, { "Content-Type": "text/event-stream" });
      res.write(`${events[0]}\n\n`);
      // Then nothing more: the generation is still running when the caller gives up.
    });
    const ac = new AbortController();
    const reason = new EngineError("CANCELLED", "call cancelled by the client");
    const texts: string[] = [];
    let error: unknown;
    try {
      for await (const t of engine.generate(request("a", HAIKU), ac.signal)) {
        texts.push(t.text);
        ac.abort(reason);
        // Dropped without waiting for the loop to ask for more.
        await waitFor("the server to see the request dropped", () => server.dropped.length === 1);
      }
    } catch (err) {
      error = err;
    }
    expect(texts).to.deep.equal(["Messages"]);
    expect(error).to.equal(reason);
    expect(server.dropped).to.deep.equal(["/v1/completions"]);
    expect(engine.inFlight).to.equal(0);
  });

  it("leaving the loop early drops the HTTP request", async () => {
    const events = fixture("completions-stream.sse").split("\n\n");
    const { server, engine } = await setup(async (_req, res) => {
      res.writeHead(200, { "Content-Type": "text/event-stream" });
      res.write(`${events[0]}\n\n${events[1]}\n\n`);
    });
    for await (const t of engine.generate(request("a", HAIKU), never)) {
      expect(t.text).to.equal("Messages");
      break;
    }
    await waitFor("the server to see the request dropped", () => server.dropped.length === 1);
  });

  it("times out when the server goes quiet for requestTimeoutMs, and drops the request", async () => {
    const events = fixture("completions-stream.sse").split("\n\n");
    const { server, engine } = await setup(
      async (_req, res) => {
        res.writeHead(200, { "Content-Type": "text/event-stream" });
        // Chunks 60 ms apart stay within the 150 ms gap allowed...
        for (const e of events.slice(0, 4)) {
          res.write(`${e}\n\n`);
          await sleep(60);
        }
        // ...then silence.
      },
      { requestTimeoutMs: 150 },
    );
    const { texts, error } = await failureOf(engine.generate(request("a", HAIKU), never));
    expect(texts).to.deep.equal(STREAM_TEXT.slice(0, 4));
    expect((error as EngineError).code).to.equal("DEADLINE_EXCEEDED");
    await waitFor("the server to see the request dropped", () => server.dropped.length === 1);
  });

  it("a generation can be iterated only once", async () => {
    const { engine } = await setup((_req, res) => stream(res, [fixture("completions-stream.sse")]));
    const generation = engine.generate(request("a", HAIKU), never);
    await collect(generation);
    expect(() => generation[Symbol.asyncIterator]()).to.throw(/only once/);
  });
});

describe("VllmEngine.health", () => {
  it("is true on 200 from GET /health, false on 503 or no server", async () => {
    let status = 200;
    const { server, engine } = await setup((_req, res) => {
      res.writeHead(status);
      res.end();
    });
    expect(await engine.health()).to.equal(true);
    expect(server.requests.map((r) => `${r.method} ${r.url}`)).to.deep.equal(["GET /health"]);
    status = 503;
    expect(await engine.health()).to.equal(false);
    await server.stop();
    expect(await engine.health()).to.equal(false);
  });
});

describe("SseDecoder", () => {
  const expected = fixture("completions-stream.sse")
    .split("\n\n")
    .filter((e) => e !== "")
    .map((e) => e.slice("data: ".length));

  function decodeIn(pieces: readonly Uint8Array[]): string[] {
    const decoder = new SseDecoder();
    const out: string[] = [];
    for (const p of pieces) out.push(...decoder.push(p));
    out.push(...decoder.end());
    return out;
  }

  it("decodes the same events whatever two pieces the stream arrives in, for LF, CRLF and CR line ends", () => {
    for (const end of ["\n", "\r\n", "\r"]) {
      const bytes = Buffer.from(fixture("completions-stream.sse").replace(/\n/g, end), "utf8");
      for (let at = 0; at <= bytes.length; at++) {
        expect(decodeIn([bytes.subarray(0, at), bytes.subarray(at)]), `${JSON.stringify(end)} cut at ${at}`).to.deep.equal(expected);
      }
    }
  });

  it("keeps an event of several data lines whole wherever a CRLF or CR stream is cut", () => {
    // A cut between CR and LF must not read as a blank line (which would end the event early).
    for (const end of ["\r\n", "\r"]) {
      const bytes = Buffer.from(["data: {\"a\":", "data: 1}", "", "data: [DONE]", "", ""].join(end), "utf8");
      for (let at = 0; at <= bytes.length; at++) {
        expect(decodeIn([bytes.subarray(0, at), bytes.subarray(at)]), `${JSON.stringify(end)} cut at ${at}`).to.deep.equal(['{"a":\n1}', "[DONE]"]);
      }
    }
  });

  it("skips comments and other fields, joins data lines, and takes `data:` without its space", () => {
    const text = ": ping\nevent: message\nid: 7\nretry: 1000\ndata:{\"a\":\ndata: 1}\n\n:\n\ndata\n\ndata: [DONE]";
    expect(decodeIn([Buffer.from(text)])).to.deep.equal(['{"a":\n1}', "", "[DONE]"]);
  });
});

describe("apportion", () => {
  it("splits a total in proportion, in whole numbers that add up", () => {
    expect(apportion(10, [1, 1, 2])).to.deep.equal([3, 2, 5]);
    expect(apportion(7, [0, 0])).to.deep.equal([4, 3]);
    expect(apportion(0, [5, 5])).to.deep.equal([0, 0]);
  });
});

describe("createEngine", () => {
  it("names the engines it makes", () => {
    expect(ENGINE_NAMES).to.deep.equal(["simulated", "llm-sim", "vllm", "deepspeed-mii"]);
  });

  it("makes each engine from its options", async () => {
    const simulated = createEngine({ engine: "simulated", base_ms: 1, capacity: 8 });
    const vllm = createEngine({ engine: "vllm", url: "http://127.0.0.1:8000/v1", model: "llama3-8b", chat: true, capacity: 16 });
    const mii = createEngine({ engine: "deepspeed-mii", url: "http://127.0.0.1:28080", model: "mistral-deployment" });
    cleanups.push(async () => {
      await simulated.close();
      await vllm.close();
      await mii.close();
    });
    expect(simulated).to.be.instanceOf(SimulatedEngine);
    expect(simulated.capacity).to.equal(8);
    expect(vllm).to.be.instanceOf(VllmEngine);
    expect((vllm as VllmEngine).chat).to.equal(true);
    expect((vllm as VllmEngine).baseUrl).to.equal("http://127.0.0.1:8000");
    expect(vllm.capacity).to.equal(16);
    expect(mii).to.be.instanceOf(DeepSpeedMiiEngine);
    expect((mii as DeepSpeedMiiEngine).deployment).to.equal("mistral-deployment");
    expect(mii.capacity).to.equal(32);
  });

  const bad: Array<[string, unknown, string, RegExp]> = [
    ["an unknown engine", { engine: "tgi" }, "UNKNOWN_ENGINE", /unknown engine "tgi": use one of simulated, llm-sim, vllm, deepspeed-mii/],
    ["vllm without url", { engine: "vllm" }, "MISSING_OPTION", /engine 'vllm' needs 'url'/],
    ["deepspeed-mii without model", { engine: "deepspeed-mii", url: "http://h:1" }, "MISSING_OPTION", /needs 'model': the deployment_name/],
    ["an option of another engine", { engine: "simulated", url: "http://h:1" }, "INVALID_OPTION", /option 'url' does not apply to engine 'simulated'/],
    ["a misspelt option", { engine: "vllm", url: "http://h:1", api_key: "x" }, "INVALID_OPTION", /option 'api_key' does not apply/],
    ["a URL that is not http", { engine: "vllm", url: "grpc://h:1" }, "INVALID_OPTION", /http\(s\) URL/],
    ["a capacity of 0", { engine: "vllm", url: "http://h:1", capacity: 0 }, "INVALID_OPTION", /capacity must be an integer >= 1/],
    ["chat that is not a boolean", { engine: "vllm", url: "http://h:1", chat: "yes" }, "INVALID_OPTION", /'chat' must be true or false/],
  ];
  for (const [what, spec, code, message] of bad) {
    it(`refuses ${what}`, () => {
      let thrown: unknown;
      try {
        createEngine(spec as Parameters<typeof createEngine>[0]);
      } catch (err) {
        thrown = err;
      }
      expect(thrown).to.be.instanceOf(EngineSpecError);
      expect((thrown as EngineSpecError).code).to.equal(code);
      expect((thrown as EngineSpecError).message).to.match(message);
    });
  }
});

describe("WorkerServer over VllmEngine (end to end)", () => {
  async function startWorker(handler: Handler): Promise<{ server: FakeServer; client: WorkerClient }> {
    const { server, engine } = await setup(handler);
    const worker = await WorkerServer.start({ engine, port: 0, stopGraceMs: 1_000 });
    const client = new WorkerClient(worker.endpoint);
    cleanups.push(async () => {
      client.close();
      await worker.stop();
    });
    return { server, client };
  }

  it("Infer: a batch through gRPC, the worker and vLLM's prompt list, one result per request in order", async () => {
    const { server, client } = await startWorker((_req, res) => reply(res, 200, fixture("completions-batch.json")));
    const reply1 = await client.infer({
      model: "llama3-8b",
      version: "v1",
      requests: [
        { id: "a", tenant: "acme", prompt: HAIKU, parameters: { max_tokens: 32 } },
        { id: "b", tenant: "acme", prompt: RIVERS, parameters: { max_tokens: 32 } },
        { id: "x", tenant: "acme", prompt: "?", parameters: { frobnicate: true } },
        { id: "c", tenant: "acme", prompt: HI, parameters: { max_tokens: 32 } },
      ],
    });
    expect(server.bodies("/v1/completions")).to.deep.equal([
      { model: "llama3-8b", prompt: [HAIKU, RIVERS, HI], max_tokens: 32, return_token_ids: true },
    ]);
    const [a, b, x, c] = reply1.results;
    expect(a).to.deep.include({ id: "a", status: "ok", usage: { prompt_tokens: 7, completion_tokens: 17 } });
    expect(a!.output).to.deep.equal({
      text: " Messages wait in line,\npatient as the tide rolls in,\nacked, then gone at last.",
      data: { finish_reason: "stop" },
    });
    expect(b).to.deep.include({ id: "b", status: "ok", usage: { prompt_tokens: 4, completion_tokens: 9 } });
    expect(b!.output!.data).to.deep.equal({ finish_reason: "length" });
    expect(x).to.deep.include({ id: "x", status: "error", not_started: true });
    expect(x!.error!.code).to.equal("INVALID_ARGUMENT");
    expect(c).to.deep.include({ id: "c", status: "ok", usage: { prompt_tokens: 3, completion_tokens: 2 } });
    expect(c!.output!.text).to.equal(" Hi!");
  });

  it("Generate: vLLM's stream becomes chunks seq 0.. and a final result with the whole text and usage", async () => {
    const { server, client } = await startWorker((_req, res) => stream(res, [fixture("completions-stream.sse")]));
    const chunks: WorkerChunk[] = [];
    for await (const c of client.generate({ model: "llama3-8b", version: "v1", request: { id: "g", tenant: "acme", prompt: HAIKU, parameters: { max_tokens: 9 } } })) {
      chunks.push(c);
    }
    const text = ["Messages", " wait", " in line —", "\n", "café", " ☕", " 🌊"];
    expect(chunks.slice(0, -1)).to.deep.equal(text.map((t, seq) => ({ seq, text: t })));
    const last = chunks.at(-1)!;
    expect(last.seq).to.equal(text.length);
    expect(last.final).to.deep.include({ id: "g", status: "ok", usage: { prompt_tokens: 7, completion_tokens: 9 } });
    expect(last.final!.output!.text).to.equal(text.join(""));
    expect(server.bodies("/v1/completions")).to.deep.equal([
      { model: "llama3-8b", prompt: HAIKU, max_tokens: 9, stream: true, stream_options: { include_usage: true } },
    ]);
  });

  it("Generate: cancelling the gRPC call drops the request to vLLM", async () => {
    const events = fixture("completions-stream.sse").split("\n\n");
    const { server, client } = await startWorker(async (_req, res) => {
      res.writeHead(200, { "Content-Type": "text/event-stream" });
      res.write(`${events[0]}\n\n`);
    });
    for await (const c of client.generate({ model: "llama3-8b", version: "v1", request: { id: "g", tenant: "acme", prompt: HAIKU } })) {
      expect(c.text).to.equal("Messages");
      break;
    }
    await waitFor("vLLM to see the request dropped", () => server.dropped.length === 1);
  });
});
