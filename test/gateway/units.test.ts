/** The gateway's pure parts: SSE framing, callback signatures and delays, key hashing, settings, translation. */
import { expect } from "chai";
import { runCli } from "../support/process.js";
import { loadConfig } from "../../pipeline/config.js";
import { hashApiKey } from "../../pipeline/gateway/auth.js";
import { callbackDelayMs, parseCallbackUrl, signCallback, verifyCallback } from "../../pipeline/gateway/callbacks.js";
import { HttpError } from "../../pipeline/gateway/errors.js";
import { requestOptions } from "../../pipeline/gateway/headers.js";
import { defaultGatewaySettings } from "../../pipeline/gateway/config.js";
import { applyChatTemplate, chatRequest, completionRequest, embeddingsRequest } from "../../pipeline/gateway/openai.js";
import { formatEvent } from "../../pipeline/gateway/sse.js";

const thrown = (f: () => unknown): HttpError => {
  try {
    f();
  } catch (err) {
    if (err instanceof HttpError) return err;
    throw err;
  }
  throw new Error("did not throw");
};

describe("gateway parts", () => {
  it("SSE: one data field per payload line, an empty line after each event", () => {
    expect(formatEvent({ a: 1 })).to.equal('data: {"a":1}\n\n');
    expect(formatEvent("[DONE]")).to.equal("data: [DONE]\n\n");
    expect(formatEvent("two\nlines\r\nthree")).to.equal("data: two\ndata: lines\ndata: three\n\n");
  });

  it("callback signatures: verify the body they were made for with the secret, nothing else", () => {
    const sig = signCallback("k", '{"x":1}', 1_700_000_000);
    expect(sig).to.match(/^t=1700000000,v1=[0-9a-f]{64}$/);
    expect(verifyCallback("k", '{"x":1}', sig)).to.equal(true);
    expect(verifyCallback("k", '{"x":2}', sig)).to.equal(false);
    expect(verifyCallback("other", '{"x":1}', sig)).to.equal(false);
    expect(verifyCallback("k", '{"x":1}', sig.replace("t=1700000000", "t=1700000001"))).to.equal(false);
    expect(verifyCallback("k", '{"x":1}', undefined)).to.equal(false);
  });

  it("callback delays double from the base, capped, jitter only adding", () => {
    expect([2, 3, 4, 5].map((a) => callbackDelayMs(a, 100, 1_000, () => 0))).to.deep.equal([100, 200, 400, 800]);
    expect(callbackDelayMs(9, 100, 1_000, () => 0)).to.equal(1_000);
    expect(callbackDelayMs(3, 100, 1_000, () => 0.5)).to.equal(220);
    expect(thrown(() => parseCallbackUrl("file:///etc/passwd")).param).to.equal("callback_url");
  });

  it("API keys are configured as SHA-256 hashes only: a key in the clear is refused", () => {
    const hash = hashApiKey("sluice-dev");
    expect(hash).to.match(/^[0-9a-f]{64}$/);
    expect(loadConfig({ env: {}, overrides: { gateway: { apiKeys: { [hash]: "demo" } } } }).gateway.apiKeys[hash]).to.equal("demo");
    expect(() => loadConfig({ env: {}, overrides: { gateway: { apiKeys: { "sluice-dev": "demo" } } } })).to.throw(/not a SHA-256 hex digest/);
    expect(() => loadConfig({ env: {}, overrides: { gateway: { apiKeys: { [hash]: "Not A Tenant" } } } })).to.throw(/tenant/);
    expect(() => loadConfig({ env: {}, overrides: { gateway: { maxOpenRequests: 0 } } })).to.throw(/maxOpenRequests/);
  });

  it("headers: priority, timeout and Idempotency-Key are checked and named when wrong", () => {
    const s = defaultGatewaySettings();
    const o = requestOptions({ "idempotency-key": "k-1", "x-sluice-priority": "low", "x-sluice-timeout-ms": "1500", prefer: "respond-async, wait=5" }, s, 1_000);
    expect(o).to.include({ id: "k-1", idempotent: true, priority: "low", deadlineMs: 2_500, timeoutMs: 1_500, respondAsync: true });
    expect(requestOptions({}, s).idempotent).to.equal(false);
    expect(requestOptions({ prefer: "return=minimal" }, s).respondAsync).to.equal(false);
    expect(thrown(() => requestOptions({ "x-sluice-timeout-ms": "0" }, s)).param).to.equal("X-Sluice-Timeout-Ms");
    expect(thrown(() => requestOptions({ "x-sluice-timeout-ms": String(s.maxTimeoutMs + 1) }, s)).param).to.equal("X-Sluice-Timeout-Ms");
    expect(thrown(() => requestOptions({ "idempotency-key": "x".repeat(101) }, s)).param).to.equal("Idempotency-Key");
  });

  it("translation: parameters pass through, bad fields are named", () => {
    const g = chatRequest({ model: "m", messages: [{ role: "user", content: "hi" }], max_completion_tokens: 5, temperature: 0.5, top_p: 0.9, stop: ["\n"], seed: 7, user: "u" }, () => undefined);
    expect(g.body).to.deep.equal({ prompt: "hi", parameters: { max_tokens: 5, temperature: 0.5, top_p: 0.9, seed: 7, user: "u", stop: ["\n"] } });
    expect(applyChatTemplate("chatml", [{ role: "system", content: "s" }])).to.equal("<|im_start|>system\ns<|im_end|>\n<|im_start|>assistant\n");
    expect(thrown(() => chatRequest({ model: "m", messages: [{ role: "user", content: [{ type: "image_url" }] }] }, () => undefined)).param).to.equal("messages[0].content[0]");
    expect(thrown(() => chatRequest({ messages: [{ role: "user", content: "x" }] }, () => undefined)).param).to.equal("model");
    expect(thrown(() => chatRequest({ model: "m", messages: [{ role: "user", content: "x" }], stream: "yes" }, () => undefined)).param).to.equal("stream");
    expect(thrown(() => completionRequest({ model: "m", prompt: ["a", "b"] })).param).to.equal("prompt");
    expect(thrown(() => completionRequest({ model: "m", prompt: "a", max_tokens: -1 })).param).to.equal("max_tokens");
    expect(thrown(() => embeddingsRequest({ model: "m", input: [1, 2] }, 10)).param).to.equal("input");
    expect(thrown(() => embeddingsRequest({ model: "m", input: "a", encoding_format: "int8" }, 10)).param).to.equal("encoding_format");
    expect(thrown(() => embeddingsRequest({ model: "m", input: Array(11).fill("a") }, 10)).param).to.equal("input");
  });

  it("sluice gateway: a usage error is one line and exit status 2; keys hash prints the SHA-256", async () => {
    for (const args of [["gateway", "--port", "x"], ["gateway", "--no-such-flag"], ["gateway", "keys", "add"], ["gateway", "what"]]) {
      const p = runCli(args);
      expect(await p.exited, args.join(" ")).to.equal(2);
      expect(p.output().trim().split("\n"), args.join(" ")).to.have.length(1);
    }
    const h = runCli(["gateway", "keys", "hash", "sluice-dev"]);
    expect(await h.exited).to.equal(0);
    expect(h.output().trim()).to.equal(hashApiKey("sluice-dev"));
  });
});
