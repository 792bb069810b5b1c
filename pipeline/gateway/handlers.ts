/**
 * The endpoints: each turns one HTTP request into sluice requests through the client library
 * and their results into the HTTP answer (JSON, server-sent events, or 202 for later).
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import { ERROR_CODES, type ErrorCode } from "../../proto/wire.js";
import type { InferResult } from "../../operators/types.js";
import type { InferenceClient } from "../client/client.js";
import { InferenceError } from "../client/errors.js";
import type { InferBody, InferOptions } from "../client/options.js";
import type { ModelTable } from "../routing/registry.js";
import { readJsonObject, field } from "./body.js";
import { Callbacks, parseCallbackUrl } from "./callbacks.js";
import type { GatewaySettings } from "./config.js";
import { errorBody, HttpError, badField } from "./errors.js";
import { requestOptions, sessionOfUser, type HttpRequestOptions } from "./headers.js";
import { chatChunk, chatRequest, completionChunk, completionRequest, embeddingsRequest, finishReason, modelList, modelObject, type GenerationRequest } from "./openai.js";
import { present, type HttpAnswer, type Presentation } from "./present.js";
import { partIds, type AsyncRecord, type AsyncRecords } from "./records.js";
import { SseWriter } from "./sse.js";

/** How much longer than a request's timeout the gateway waits for the pipeline's own answer. */
const RESULT_GRACE_MS = 1_000;
/** Inputs of one embeddings request (each is one sluice request). */
const MAX_EMBEDDING_INPUTS = 2048;

export interface GatewayContext {
  readonly settings: GatewaySettings;
  readonly models: ModelTable;
  readonly records: AsyncRecords;
  readonly callbacks: Callbacks;
  client(tenant: string): InferenceClient;
}

/** One HTTP request on its way: who sent it, and a signal that fires if the caller leaves. */
export interface HttpCall {
  readonly req: IncomingMessage;
  readonly res: ServerResponse;
  readonly tenant: string;
  readonly params: Readonly<Record<string, string>>;
  /** Aborted when the caller disconnects before the answer is complete. */
  readonly signal: AbortSignal;
}

export function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  if (res.headersSent) return;
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": String(Buffer.byteLength(text)), ...headers });
  res.end(text);
}

function inferOptions(o: HttpRequestOptions, id: string): InferOptions {
  const out: InferOptions = { id, priority: o.priority, timeoutMs: o.timeoutMs + RESULT_GRACE_MS };
  if (o.deadlineMs !== undefined) out.deadlineMs = o.deadlineMs;
  if (o.traceparent) out.traceparent = o.traceparent;
  if (o.tracestate) out.tracestate = o.tracestate;
  if (o.session !== undefined) out.session = o.session;
  return out;
}

/** Cancels request `id` when `signal` fires; returns the way to stop listening. */
function cancelOnAbort(client: InferenceClient, id: string, signal: AbortSignal): () => void {
  const cancel = (): void => {
    try {
      client.cancel(id);
    } catch {
      // the connection is gone: nothing to cancel with
    }
  };
  signal.addEventListener("abort", cancel, { once: true });
  return () => signal.removeEventListener("abort", cancel);
}

/** Runs one request and resolves with its result (ok or error). A retried id finds the first result. */
async function runOne(client: InferenceClient, model: string, body: InferBody, o: HttpRequestOptions, id: string, signal: AbortSignal): Promise<InferResult> {
  if (o.idempotent) {
    const stored = await client.stored(id).catch(() => undefined);
    if (stored) return stored;
  }
  const stop = cancelOnAbort(client, id, signal);
  try {
    return await client.request(model, body, inferOptions(o, id));
  } catch (err) {
    // No answer in time: do not let it run later for nobody.
    if (err instanceof InferenceError && err.code === "DEADLINE_EXCEEDED") client.cancel(id);
    throw err;
  } finally {
    stop();
  }
}

/** Publishes the parts of an async request, records it, and answers 202 (with a callback if asked). */
async function accept(ctx: GatewayContext, call: HttpCall, o: HttpRequestOptions, rec: AsyncRecord, parts: Array<{ id: string; body: InferBody }>): Promise<void> {
  const client = ctx.client(call.tenant);
  if (rec.callback_url) ctx.callbacks.checkAccepting();
  // Recorded first, so that GET /v1/requests/{id} never says 404 for a request that was accepted.
  await ctx.records.put(call.tenant, o.id, rec);
  const opts = inferOptions(o, o.id);
  await Promise.all(parts.map((p) => client.publish(rec.model, p.body, { ...opts, id: p.id })));
  if (rec.callback_url) {
    const waitMs = ctx.settings.maxTimeoutMs + RESULT_GRACE_MS;
    ctx.callbacks.schedule(rec.callback_url, o.id, async () =>
      present(rec, await Promise.all(parts.map((p) => client.result(p.id, { timeoutMs: waitMs }).catch((e: unknown) => failed(p.id, e))))),
    );
  }
  sendJson(call.res, 202, { id: o.id, object: "request", status: "queued" }, { location: `/v1/requests/${o.id}` });
}

/** A thrown error as an error result. */
function failed(id: string, err: unknown): InferResult {
  const e = err as { code?: unknown; message?: unknown };
  const code: ErrorCode = ERROR_CODES.find((c) => c === e?.code) ?? "INTERNAL";
  return { id, status: "error", error: { code, message: typeof e?.message === "string" ? e.message : String(err) } };
}

function callbackOf(o: Record<string, unknown>): string | undefined {
  const v = o["callback_url"];
  return v === undefined || v === null ? undefined : parseCallbackUrl(v);
}

function answer(ctx: GatewayContext, call: HttpCall, a: HttpAnswer): void {
  sendJson(call.res, a.status, a.body, a.status === 429 ? { "retry-after": String(ctx.settings.retryAfterSeconds) } : {});
}

async function generation(ctx: GatewayContext, call: HttpCall, kind: "chat" | "completion"): Promise<void> {
  const o = requestOptions(call.req.headers, ctx.settings);
  call.res.setHeader("x-request-id", o.id);
  const raw = await readJsonObject(call.req, ctx.settings.maxBodyBytes);
  const callback = callbackOf(raw);
  const g = kind === "chat" ? chatRequest(raw, (m) => ctx.models.get(m)?.chat_template) : completionRequest(raw);
  o.session ??= sessionOfUser(raw["user"]);
  const p: Presentation = { kind, model: g.model, ...(g.maxTokens !== undefined ? { max_tokens: g.maxTokens } : {}) };
  if (o.respondAsync || callback) {
    if (g.stream) throw badField("stream", "'stream' cannot be combined with an async request (Prefer: respond-async or callback_url)");
    const rec: AsyncRecord = { ...p, n: 1, created: Date.now(), ...(callback ? { callback_url: callback } : {}) };
    return accept(ctx, call, o, rec, [{ id: o.id, body: g.body }]);
  }
  const client = ctx.client(call.tenant);
  if (g.stream) return streamGeneration(client, call, o, g, kind);
  answer(ctx, call, present(p, [await runOne(client, g.model, g.body, o, o.id, call.signal)]));
}

/** Streams a generation as server-sent events: chunks, the finish, usage if asked, `[DONE]`. */
async function streamGeneration(client: InferenceClient, call: HttpCall, o: HttpRequestOptions, g: GenerationRequest, kind: "chat" | "completion"): Promise<void> {
  const sse = new SseWriter(call.res);
  const created = Math.floor(Date.now() / 1000);
  const chunk = (part: { text?: string; role?: boolean; finish?: "stop" | "length"; usage?: InferResult }): Record<string, unknown> =>
    kind === "chat" ? chatChunk(o.id, g.model, created, part) : completionChunk(o.id, g.model, created, part);
  let sent = "";
  const say = async (text: string): Promise<void> => {
    if (!sse.started && kind === "chat") await sse.send(chunk({ role: true, text: "" }));
    sent += text;
    await sse.send(chunk({ text }));
  };
  const stop = cancelOnAbort(client, o.id, call.signal);
  try {
    const stored = o.idempotent ? await client.stored(o.id).catch(() => undefined) : undefined;
    const events = stored ? [{ result: stored }] : client.stream(g.model, g.body, inferOptions(o, o.id));
    for await (const ev of events) {
      if (call.signal.aborted) continue;
      if ("text" in ev) {
        await say(ev.text);
        continue;
      }
      const r = ev.result;
      if (r.status !== "ok") {
        const code = r.error?.code ?? "INTERNAL";
        if (!sse.started) throw new HttpError(code, r.error?.message ?? "request failed");
        await sse.send(errorBody(code, r.error?.message ?? "request failed"));
        call.res.end();
        return;
      }
      // Chunks a retried stream did not see (they went to its first caller) come as one.
      const text = r.output?.text ?? "";
      if (text.length > sent.length && text.startsWith(sent)) await say(text.slice(sent.length));
      else if (!sse.started) await say("");
      await sse.send(chunk({ finish: finishReason(r, g.maxTokens) }));
      if (g.includeUsage) await sse.send(chunk({ usage: r }));
      await sse.done();
    }
  } finally {
    stop();
  }
}

export async function chatCompletions(ctx: GatewayContext, call: HttpCall): Promise<void> {
  return generation(ctx, call, "chat");
}

export async function completions(ctx: GatewayContext, call: HttpCall): Promise<void> {
  return generation(ctx, call, "completion");
}

export async function embeddingsEndpoint(ctx: GatewayContext, call: HttpCall): Promise<void> {
  const o = requestOptions(call.req.headers, ctx.settings);
  call.res.setHeader("x-request-id", o.id);
  const raw = await readJsonObject(call.req, ctx.settings.maxBodyBytes);
  const callback = callbackOf(raw);
  const e = embeddingsRequest(raw, MAX_EMBEDDING_INPUTS);
  const p: Presentation = { kind: "embeddings", model: e.model, encoding: e.encoding };
  const ids = partIds(o.id, e.inputs.length, "embeddings");
  const parts = e.inputs.map((prompt, i) => ({ id: ids[i]!, body: { prompt } }));
  if (o.respondAsync || callback) {
    const rec: AsyncRecord = { ...p, n: parts.length, created: Date.now(), ...(callback ? { callback_url: callback } : {}) };
    return accept(ctx, call, o, rec, parts);
  }
  const client = ctx.client(call.tenant);
  answer(ctx, call, present(p, await Promise.all(parts.map((x) => runOne(client, e.model, x.body, o, x.id, call.signal)))));
}

/** `POST /v1/infer/{model}`: a sluice request body in, the sluice result out. */
export async function inferEndpoint(ctx: GatewayContext, call: HttpCall): Promise<void> {
  const o = requestOptions(call.req.headers, ctx.settings);
  call.res.setHeader("x-request-id", o.id);
  const model = call.params["model"]!;
  const raw = await readJsonObject(call.req, ctx.settings.maxBodyBytes);
  const callback = callbackOf(raw);
  for (const k of Object.keys(raw)) if (!["prompt", "inputs", "parameters", "callback_url"].includes(k)) throw badField(k, `unknown field '${k}' (a sluice request has prompt, inputs, parameters)`);
  const body: InferBody = {};
  const prompt = field.string(raw, "prompt");
  if (prompt !== undefined) body.prompt = prompt;
  if (raw["inputs"] !== undefined) body.inputs = raw["inputs"];
  const params = field.object(raw, "parameters");
  if (params) body.parameters = params;
  if (body.prompt === undefined && body.inputs === undefined) throw badField("prompt", "a request needs 'prompt' or 'inputs'");
  const p: Presentation = { kind: "infer", model };
  if (o.respondAsync || callback) {
    const rec: AsyncRecord = { ...p, n: 1, created: Date.now(), ...(callback ? { callback_url: callback } : {}) };
    return accept(ctx, call, o, rec, [{ id: o.id, body }]);
  }
  answer(ctx, call, present(p, [await runOne(ctx.client(call.tenant), model, body, o, o.id, call.signal)]));
}

/** `GET /v1/requests/{id}`: the answer of an async request; 202 while pending, 404 when unknown. */
export async function requestStatus(ctx: GatewayContext, call: HttpCall): Promise<void> {
  const id = call.params["id"]!;
  call.res.setHeader("x-request-id", id);
  const rec = await ctx.records.get(call.tenant, id);
  if (!rec) throw new HttpError("NOT_FOUND", `no request '${id}'`);
  const client = ctx.client(call.tenant);
  const results = await Promise.all(partIds(id, rec.n, rec.kind).map((p) => client.stored(p)));
  if (results.some((r) => r === undefined)) {
    sendJson(call.res, 202, { id, object: "request", status: "pending" }, { "retry-after": "1" });
    return;
  }
  answer(ctx, call, present(rec, results as InferResult[]));
}

export async function listModels(ctx: GatewayContext, call: HttpCall): Promise<void> {
  sendJson(call.res, 200, modelList(ctx.models.list().map(([name]) => name).sort()));
}

export async function getModel(ctx: GatewayContext, call: HttpCall): Promise<void> {
  const name = call.params["model"]!;
  if (!ctx.models.get(name)) throw new HttpError("NOT_FOUND", `unknown model '${name}'`);
  sendJson(call.res, 200, modelObject(name));
}
