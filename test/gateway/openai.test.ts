/**
 * The official OpenAI SDK against a real gateway, a real pipeline, a real nats-server and a
 * simulated worker: every endpoint, the error statuses, idempotency and cancellation.
 */
import { expect } from "chai";
import OpenAI, { APIError, BadRequestError } from "openai";
import type { NatsConnection } from "@nats-io/transport-node";
import type { Gateway } from "../../pipeline/gateway/server.js";
import type { PipelineService } from "../../pipeline/service.js";
import { useNats, waitFor } from "../support/nats.js";
import { startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";
import { KEYS, post, sdk, startGateway } from "./support.js";

const V1 = { versions: { v1: { weight: 100 } } };

describe("HTTP gateway: the OpenAI SDK", function () {
  this.timeout(120_000);
  const nats = useNats();
  let worker: TestWorker;
  let stalling: TestWorker;
  let pipeline: PipelineService;
  let gw: Gateway;
  let gwNc: NatsConnection;
  let openai: OpenAI;

  before(async () => {
    worker = await startWorker({ ttft_ms: 2, token_interval_ms: 1 });
    stalling = await startWorker({ ttft_ms: 2, token_interval_ms: 1, stall_after_tokens: 2 });
    const endpoint = worker.server.endpoint;
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: {
          echo: { ...V1, batch: { max_size: 32, max_delay_ms: 2 } },
          "llm-sim": { ...V1, generate: true },
          "chat-ml": { ...V1, chat_template: "chatml" },
          "embed-sim": { ...V1, batch: { max_size: 64, max_delay_ms: 2 } },
          stall: { ...V1, generate: true },
          idle: V1,
        },
        workers: [
          { model: "echo", version: "v1", endpoint },
          { model: "llm-sim", version: "v1", endpoint },
          { model: "chat-ml", version: "v1", endpoint },
          { model: "embed-sim", version: "v1", endpoint },
          { model: "stall", version: "v1", endpoint: stalling.server.endpoint },
        ],
        tenants: { limited: { rate: 0.001, burst: 1, policy: "reject" } },
      }),
    );
    ({ gw, nc: gwNc } = await startGateway(nats.url));
    openai = sdk(gw);
  });
  after(async () => {
    await gw?.stop();
    await gwNc?.close();
    await pipeline?.stop();
    await worker?.stop();
    await stalling?.stop();
  });

  const callsOf = (w: TestWorker, id: string): number => w.engine.calls.filter((c) => c.ids.includes(id)).length;

  it("chat: answers with the model's output, usage filled in, the sluice id in the body and X-Request-Id", async () => {
    const { data, response } = await openai.chat.completions
      .create({ model: "echo", messages: [{ role: "user", content: "hello sluice" }], max_tokens: 16, temperature: 0.2 })
      .withResponse();
    expect(data.object).to.equal("chat.completion");
    expect(data.choices).to.have.length(1);
    expect(data.choices[0]!.message).to.include({ role: "assistant", content: "hello sluice" });
    expect(data.choices[0]!.finish_reason).to.equal("stop");
    expect(data.usage).to.deep.equal({ prompt_tokens: 2, completion_tokens: 2, total_tokens: 4 });
    expect(response.headers.get("x-request-id")).to.equal(data.id);
    expect(callsOf(worker, data.id)).to.equal(1);
  });

  it("chat: messages are joined (plain) or put through the model's chat template", async () => {
    const plain = await openai.chat.completions.create({
      model: "echo",
      messages: [
        { role: "system", content: "be brief" },
        { role: "user", content: [{ type: "text", text: "hi" }] },
      ],
    });
    expect(plain.choices[0]!.message.content).to.equal("be brief\nhi");
    const ml = await openai.chat.completions.create({ model: "chat-ml", messages: [{ role: "user", content: "hi" }] });
    expect(ml.choices[0]!.message.content).to.equal("chat-ml@v1: <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  });

  it("chat, streamed with include_usage: a role chunk, the text in order, the finish, the usage, then [DONE]", async () => {
    const stream = await openai.chat.completions.create({
      model: "llm-sim",
      messages: [{ role: "user", content: "one two three four five" }],
      stream: true,
      stream_options: { include_usage: true },
    });
    const chunks: OpenAI.Chat.Completions.ChatCompletionChunk[] = [];
    for await (const c of stream) chunks.push(c);
    expect(chunks[0]!.choices[0]!.delta.role).to.equal("assistant");
    const text = chunks.map((c) => c.choices[0]?.delta.content ?? "").join("");
    expect(text).to.equal("llm-sim@v1: one two three four five");
    expect(chunks.filter((c) => (c.choices[0]?.delta.content ?? "") !== "").length).to.equal(6);
    const finish = chunks.findIndex((c) => c.choices[0]?.finish_reason === "stop");
    expect(finish).to.equal(chunks.length - 2);
    const last = chunks[chunks.length - 1]!;
    expect(last.choices).to.deep.equal([]);
    expect(last.usage).to.deep.equal({ prompt_tokens: 5, completion_tokens: 6, total_tokens: 11 });
    expect(new Set(chunks.map((c) => c.id)).size).to.equal(1);
  });

  it("chat, streamed: max_tokens ends it with finish_reason length; no usage chunk unless asked", async () => {
    const stream = await openai.chat.completions.create({ model: "llm-sim", messages: [{ role: "user", content: "a b c d e f" }], stream: true, max_tokens: 3 });
    const chunks: OpenAI.Chat.Completions.ChatCompletionChunk[] = [];
    for await (const c of stream) chunks.push(c);
    expect(chunks.map((c) => c.choices[0]?.delta.content ?? "").join("")).to.equal("llm-sim@v1: a b ");
    expect(chunks[chunks.length - 1]!.choices[0]!.finish_reason).to.equal("length");
    expect(chunks.every((c) => c.usage === undefined || c.usage === null)).to.equal(true);
  });

  it("completions: plain and streamed", async () => {
    const c = await openai.completions.create({ model: "echo", prompt: "complete me" });
    expect(c.object).to.equal("text_completion");
    expect(c.choices[0]!.text).to.equal("complete me");
    expect(c.usage?.total_tokens).to.equal(4);
    const stream = await openai.completions.create({ model: "llm-sim", prompt: "x y", stream: true, stream_options: { include_usage: true } });
    const parts: string[] = [];
    let usage: OpenAI.Completions.CompletionUsage | undefined;
    for await (const ch of stream) {
      if (ch.choices[0]) parts.push(ch.choices[0].text);
      if (ch.usage) usage = ch.usage;
    }
    expect(parts.join("")).to.equal("llm-sim@v1: x y");
    expect(usage?.completion_tokens).to.equal(3);
  });

  it("embeddings: a string and an array; the same text gives the same vector, each input one request", async () => {
    const one = await openai.embeddings.create({ model: "embed-sim", input: "the same text" });
    expect(one.data).to.have.length(1);
    const many = await openai.embeddings.create({ model: "embed-sim", input: ["other text", "the same text", "third"] });
    expect(many.data.map((d) => d.index)).to.deep.equal([0, 1, 2]);
    // The SDK asks for base64 by default and decodes it; floats asked for explicitly agree.
    const floats = await openai.embeddings.create({ model: "embed-sim", input: ["the same text"], encoding_format: "float" });
    const v = Array.from(one.data[0]!.embedding);
    expect(v).to.have.length(64);
    expect(Array.from(many.data[1]!.embedding)).to.deep.equal(v);
    expect(floats.data[0]!.embedding).to.deep.equal(v);
    expect(Array.from(many.data[0]!.embedding)).to.not.deep.equal(v);
    expect(Math.abs(v.reduce((a, x) => a + x * x, 0) - 1)).to.be.lessThan(1e-5);
    expect(many.usage.prompt_tokens).to.equal(6);
  });

  it("models: lists the registry's models; one model by name; 404 for an unknown one", async () => {
    const ids: string[] = [];
    for await (const m of openai.models.list()) ids.push(m.id);
    expect(ids).to.include.members(["echo", "llm-sim", "embed-sim"]);
    expect((await openai.models.retrieve("echo")).id).to.equal("echo");
    const err = await openai.models.retrieve("nope").catch((e: unknown) => e);
    expect(err).to.be.instanceOf(OpenAI.NotFoundError);
  });

  it("401 for a missing or unknown key; the tenant is the key's", async () => {
    const err = await sdk(gw, "sk-wrong")
      .chat.completions.create({ model: "echo", messages: [{ role: "user", content: "x" }] })
      .catch((e: unknown) => e);
    expect(err).to.be.instanceOf(OpenAI.AuthenticationError);
    expect((err as APIError).status).to.equal(401);
    const none = await fetch(`${gw.baseUrl}/models`);
    expect(none.status).to.equal(401);
    expect(((await none.json()) as { error: { type: string } }).error.type).to.equal("authentication_error");
    // The other tenant's key works, and its request is published under its own tenant.
    const seen = new Promise<string>((resolve) => {
      const sub = gwNc.subscribe("infer.req.*.*.echo", { callback: (_e, m) => (sub.unsubscribe(), resolve(m.subject)) });
    });
    await sdk(gw, KEYS.other).chat.completions.create({ model: "echo", messages: [{ role: "user", content: "mine" }] });
    expect(await seen).to.equal("infer.req.normal.other.echo");
  });

  it("400 for n > 1, a wrong field type, malformed JSON; 404 for an unknown model; 413 for an over-size body", async () => {
    const n = await openai.chat.completions.create({ model: "echo", messages: [{ role: "user", content: "x" }], n: 2 }).catch((e: unknown) => e);
    expect(n).to.be.instanceOf(OpenAI.BadRequestError);
    expect((n as BadRequestError).param).to.equal("n");
    const t = await post(gw, "/chat/completions", { model: "echo", messages: [{ role: "user", content: "x" }], temperature: "hot" });
    expect(t.status).to.equal(400);
    expect(((await t.json()) as { error: { param: string } }).error.param).to.equal("temperature");
    const bad = await post(gw, "/chat/completions", '{"model": "echo", "messages": [');
    expect(bad.status).to.equal(400);
    expect(((await bad.json()) as { error: { message: string } }).error.message).to.match(/not valid JSON/);
    const missing = await post(gw, "/chat/completions", { model: "echo" });
    expect(((await missing.json()) as { error: { param: string } }).error.param).to.equal("messages");
    const unknown = await openai.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "x" }] }).catch((e: unknown) => e);
    expect(unknown).to.be.instanceOf(OpenAI.NotFoundError);
    expect((unknown as APIError).code).to.equal("NOT_FOUND");
    const streamUnknown = await post(gw, "/chat/completions", { model: "no-such-model", stream: true, messages: [{ role: "user", content: "x" }] });
    expect(streamUnknown.status).to.equal(404);
    const big = await post(gw, "/completions", { model: "echo", prompt: "x".repeat(1024 * 1024 + 10) });
    expect(big.status).to.equal(413);
    const wrongRoute = await post(gw, "/nothing-here", {});
    expect(wrongRoute.status).to.equal(404);
  });

  it("every sluice error code gets its HTTP status and OpenAI's error shape", async () => {
    const table: Record<string, number> = {
      INVALID_ARGUMENT: 400,
      NOT_FOUND: 404,
      RESOURCE_EXHAUSTED: 429,
      CANCELLED: 499,
      INTERNAL: 500,
      UNAVAILABLE: 503,
      DEADLINE_EXCEEDED: 504,
    };
    for (const [code, status] of Object.entries(table)) {
      const r = await post(gw, "/infer/echo", { prompt: "fails", parameters: { simulate_error: code } });
      expect(r.status, code).to.equal(status);
      const body = (await r.json()) as { error: { code: string; message: string; type: string } };
      expect(body.error.code).to.equal(code);
      expect(body.error.message).to.contain(`simulated ${code}`);
      expect(body.error.type).to.be.a("string");
      if (status === 429) expect(r.headers.get("retry-after")).to.equal("1");
    }
  });

  it("429 with Retry-After when the tenant is over its rate", async () => {
    const limited = sdk(gw, KEYS.limited);
    const outcomes = await Promise.all(
      Array.from({ length: 4 }, (_, i) =>
        limited.chat.completions
          .create({ model: "echo", messages: [{ role: "user", content: `r${i}` }] })
          .withResponse()
          .then(
            () => 200,
            (e: unknown) => e as APIError,
          ),
      ),
    );
    const refused = outcomes.filter((o): o is APIError => o instanceof OpenAI.RateLimitError);
    expect(refused.length).to.be.at.least(3);
    expect(refused[0]!.headers?.get("retry-after")).to.equal("1");
    expect(refused[0]!.code).to.equal("RESOURCE_EXHAUSTED");
  });

  it("Idempotency-Key: the same key twice gives the same id and one worker call, at once or later", async () => {
    const ask = (): Promise<OpenAI.Chat.Completions.ChatCompletion> =>
      openai.chat.completions.create({ model: "echo", messages: [{ role: "user", content: "only once" }] }, { headers: { "Idempotency-Key": "idem-1" } });
    const [a, b] = await Promise.all([ask(), ask()]);
    const c = await ask();
    expect(a.id).to.equal("idem-1");
    expect(b.id).to.equal("idem-1");
    expect(c.id).to.equal("idem-1");
    expect(c.choices[0]!.message.content).to.equal("only once");
    expect(callsOf(worker, "idem-1")).to.equal(1);
    const streamed = await post(gw, "/chat/completions", { model: "echo", stream: true, messages: [{ role: "user", content: "only once" }] }, { "Idempotency-Key": "idem-1" });
    expect(await streamed.text()).to.contain('"content":"only once"');
    expect(callsOf(worker, "idem-1")).to.equal(1);
    const badKey = await post(gw, "/chat/completions", { model: "echo", messages: [{ role: "user", content: "x" }] }, { "Idempotency-Key": "has spaces" });
    expect(badKey.status).to.equal(400);
  });

  it("X-Sluice-Priority and X-Sluice-Timeout-Ms become the request's priority and deadline; bad values are 400", async () => {
    const got = new Promise<{ subject: string; deadline: number }>((resolve) => {
      const sub = gwNc.subscribe("infer.req.high.acme.echo", {
        callback: (_e, m) => {
          sub.unsubscribe();
          resolve({ subject: m.subject, deadline: Number(m.headers?.get("Infer-Deadline")) });
        },
      });
    });
    const before = Date.now();
    const r = await post(gw, "/completions", { model: "echo", prompt: "urgent" }, { "X-Sluice-Priority": "high", "X-Sluice-Timeout-Ms": "30000" });
    expect(r.status).to.equal(200);
    const seen = await got;
    expect(seen.subject).to.equal("infer.req.high.acme.echo");
    expect(seen.deadline).to.be.at.least(before + 30_000);
    expect(seen.deadline).to.be.at.most(Date.now() + 30_000);
    expect((await post(gw, "/completions", { model: "echo", prompt: "x" }, { "X-Sluice-Priority": "urgent" })).status).to.equal(400);
    expect((await post(gw, "/completions", { model: "echo", prompt: "x" }, { "X-Sluice-Timeout-Ms": "soon" })).status).to.equal(400);
    // Nothing serves 'idle': the deadline passes and the answer is 504.
    const late = await post(gw, "/completions", { model: "idle", prompt: "x" }, { "X-Sluice-Timeout-Ms": "200" });
    expect(late.status).to.equal(504);
    expect(((await late.json()) as { error: { code: string } }).error.code).to.equal("DEADLINE_EXCEEDED");
  });

  it("native POST /v1/infer/{model}: a sluice request in, the sluice result out", async () => {
    const r = await post(gw, "/infer/echo", { prompt: "native", parameters: { max_tokens: 4 } });
    expect(r.status).to.equal(200);
    const body = (await r.json()) as { id: string; status: string; output: { text: string }; model: string; version: string };
    expect(body).to.include({ status: "ok", model: "echo", version: "v1" });
    expect(body.output.text).to.equal("native");
    expect(r.headers.get("x-request-id")).to.equal(body.id);
    expect((await post(gw, "/infer/echo", { prompt: 5 })).status).to.equal(400);
    expect((await post(gw, "/infer/echo", { prompt: "x", extra: 1 })).status).to.equal(400);
  });

  it("200 concurrent requests each get their own answer", async () => {
    const answers = await Promise.all(
      Array.from({ length: 200 }, (_, i) => openai.chat.completions.create({ model: "echo", messages: [{ role: "user", content: `request number ${i}` }] })),
    );
    answers.forEach((a, i) => expect(a.choices[0]!.message.content).to.equal(`request number ${i}`));
    expect(new Set(answers.map((a) => a.id)).size).to.equal(200);
  });

  it("a stream abandoned by its client stops the generation on the worker", async () => {
    const ac = new AbortController();
    const stream = await openai.chat.completions.create(
      { model: "stall", messages: [{ role: "user", content: "a b c d e f g h" }], stream: true },
      { signal: ac.signal, headers: { "Idempotency-Key": "abandoned-1" } },
    );
    let got = 0;
    try {
      for await (const c of stream) {
        if (c.choices[0]?.delta.content) got++;
        if (got === 2) ac.abort();
      }
    } catch {
      // the SDK reports the abort
    }
    expect(got).to.equal(2);
    await waitFor("the generation to be cancelled", () => stalling.engine.calls.some((c) => c.ids.includes("abandoned-1") && c.cancelled));
    const call = stalling.engine.calls.find((c) => c.ids.includes("abandoned-1"))!;
    expect(call.tokens).to.equal(2);
    await waitFor("the open request to be released", () => gw.openRequests === 0);
  });
});
