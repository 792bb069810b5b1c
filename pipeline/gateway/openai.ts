/**
 * OpenAI's request and response shapes, to and from sluice requests and results: chat
 * completions, completions, embeddings and the model list. Pure functions; nothing here does I/O.
 */
import type { InferResult } from "../../operators/types.js";
import type { InferBody } from "../client/options.js";
import type { ChatTemplateName } from "../routing/registry.js";
import { field } from "./body.js";
import { badField } from "./errors.js";

/** Parameters passed through to the model as they are named in OpenAI's API. */
const PASS_THROUGH = ["temperature", "top_p", "seed", "user"] as const;

export interface GenerationRequest {
  model: string;
  body: InferBody;
  stream: boolean;
  /** `stream_options.include_usage`: a last chunk with the usage. */
  includeUsage: boolean;
  maxTokens: number | undefined;
}

export interface ChatMessage {
  role: string;
  content: string;
}

/** Turns chat messages into one prompt. */
export function applyChatTemplate(template: ChatTemplateName, messages: readonly ChatMessage[]): string {
  switch (template) {
    case "chatml":
      return messages.map((m) => `<|im_start|>${m.role}\n${m.content}<|im_end|>\n`).join("") + "<|im_start|>assistant\n";
    case "plain":
      return messages.map((m) => m.content).join("\n");
  }
}

function parameters(o: Record<string, unknown>): { parameters: Record<string, unknown>; maxTokens: number | undefined } {
  const n = field.integer(o, "n", 1);
  if (n !== undefined && n > 1) throw badField("n", "'n' > 1 is not supported: send one request per completion");
  const out: Record<string, unknown> = {};
  const maxTokens = field.integer(o, "max_completion_tokens", 0) ?? field.integer(o, "max_tokens", 0);
  if (maxTokens !== undefined) out["max_tokens"] = maxTokens;
  field.number(o, "temperature", 0, 2);
  field.number(o, "top_p", 0, 1);
  field.integer(o, "seed");
  field.string(o, "user");
  for (const k of PASS_THROUGH) if (o[k] !== undefined && o[k] !== null) out[k] = o[k];
  const stop = field.strings(o, "stop");
  if (stop !== undefined) out["stop"] = stop;
  return { parameters: out, maxTokens };
}

function streamOptions(o: Record<string, unknown>): { stream: boolean; includeUsage: boolean } {
  const stream = field.boolean(o, "stream") ?? false;
  const so = field.object(o, "stream_options");
  const includeUsage = so ? (field.boolean(so, "include_usage") ?? false) : false;
  return { stream, includeUsage };
}

function contentOf(m: Record<string, unknown>, at: string): string {
  const c = m["content"];
  if (c === undefined || c === null) return "";
  if (typeof c === "string") return c;
  if (Array.isArray(c)) {
    return c
      .map((part, j) => {
        const p = part as { type?: unknown; text?: unknown } | null;
        if (p?.type !== "text" || typeof p.text !== "string") throw badField(`${at}.content[${j}]`, `'${at}.content[${j}]' must be a text part ({"type": "text", "text": "…"})`);
        return p.text;
      })
      .join("");
  }
  throw badField(`${at}.content`, `'${at}.content' must be a string or an array of text parts`);
}

/** A `POST /v1/chat/completions` body as a sluice request. */
export function chatRequest(o: Record<string, unknown>, templateOf: (model: string) => ChatTemplateName | undefined): GenerationRequest {
  const model = field.string(o, "model", true)!;
  const raw = o["messages"];
  if (!Array.isArray(raw) || raw.length === 0) throw badField("messages", "'messages' must be a non-empty array");
  const messages = raw.map((m, i): ChatMessage => {
    if (typeof m !== "object" || m === null || Array.isArray(m)) throw badField(`messages[${i}]`, `'messages[${i}]' must be an object`);
    const role = (m as Record<string, unknown>)["role"];
    if (typeof role !== "string") throw badField(`messages[${i}].role`, `'messages[${i}].role' must be a string`);
    return { role, content: contentOf(m as Record<string, unknown>, `messages[${i}]`) };
  });
  const { parameters: params, maxTokens } = parameters(o);
  const body: InferBody = { prompt: applyChatTemplate(templateOf(model) ?? "plain", messages) };
  if (Object.keys(params).length > 0) body.parameters = params;
  return { model, body, maxTokens, ...streamOptions(o) };
}

/** A `POST /v1/completions` body as a sluice request. */
export function completionRequest(o: Record<string, unknown>): GenerationRequest {
  const model = field.string(o, "model", true)!;
  let prompt = o["prompt"];
  if (Array.isArray(prompt) && prompt.length === 1 && typeof prompt[0] === "string") prompt = prompt[0];
  if (typeof prompt !== "string") throw badField("prompt", "'prompt' must be a string (one prompt per request)");
  const { parameters: params, maxTokens } = parameters(o);
  const body: InferBody = { prompt };
  if (Object.keys(params).length > 0) body.parameters = params;
  return { model, body, maxTokens, ...streamOptions(o) };
}

export type EmbeddingEncoding = "float" | "base64";

export interface EmbeddingsRequest {
  model: string;
  inputs: string[];
  encoding: EmbeddingEncoding;
}

/** A `POST /v1/embeddings` body: one sluice request per input. */
export function embeddingsRequest(o: Record<string, unknown>, maxInputs: number): EmbeddingsRequest {
  const model = field.string(o, "model", true)!;
  const input = o["input"];
  let inputs: string[];
  if (typeof input === "string") inputs = [input];
  else if (Array.isArray(input) && input.length > 0 && input.every((x) => typeof x === "string")) inputs = input;
  else throw badField("input", "'input' must be a string or a non-empty array of strings");
  if (inputs.length > maxInputs) throw badField("input", `'input' has ${inputs.length} items; at most ${maxInputs}`);
  const encoding = field.string(o, "encoding_format") ?? "float";
  if (encoding !== "float" && encoding !== "base64") throw badField("encoding_format", "'encoding_format' must be 'float' or 'base64'");
  if (o["dimensions"] !== undefined) throw badField("dimensions", "'dimensions' is not supported");
  return { model, inputs, encoding };
}

const nowSeconds = (): number => Math.floor(Date.now() / 1000);

function usageOf(r: InferResult): { prompt_tokens: number; completion_tokens: number; total_tokens: number } {
  const p = r.usage?.prompt_tokens ?? 0;
  const c = r.usage?.completion_tokens ?? 0;
  return { prompt_tokens: p, completion_tokens: c, total_tokens: p + c };
}

export function finishReason(r: InferResult, maxTokens: number | undefined): "stop" | "length" {
  return maxTokens !== undefined && (r.usage?.completion_tokens ?? 0) >= maxTokens ? "length" : "stop";
}

export function chatCompletion(r: InferResult, model: string, maxTokens: number | undefined): Record<string, unknown> {
  return {
    id: r.id,
    object: "chat.completion",
    created: nowSeconds(),
    model,
    choices: [{ index: 0, message: { role: "assistant", content: r.output?.text ?? "", refusal: null }, logprobs: null, finish_reason: finishReason(r, maxTokens) }],
    usage: usageOf(r),
  };
}

export function completion(r: InferResult, model: string, maxTokens: number | undefined): Record<string, unknown> {
  return {
    id: r.id,
    object: "text_completion",
    created: nowSeconds(),
    model,
    choices: [{ index: 0, text: r.output?.text ?? "", logprobs: null, finish_reason: finishReason(r, maxTokens) }],
    usage: usageOf(r),
  };
}

/** One streamed chunk: `delta` text, or the end (`finish`), or usage alone (`choices: []`). */
export function chatChunk(id: string, model: string, created: number, part: { text?: string; role?: boolean; finish?: "stop" | "length"; usage?: InferResult }): Record<string, unknown> {
  const base = { id, object: "chat.completion.chunk", created, model };
  if (part.usage) return { ...base, choices: [], usage: usageOf(part.usage) };
  const delta: Record<string, unknown> = {};
  if (part.role) delta["role"] = "assistant";
  if (part.text !== undefined) delta["content"] = part.text;
  return { ...base, choices: [{ index: 0, delta, logprobs: null, finish_reason: part.finish ?? null }] };
}

export function completionChunk(id: string, model: string, created: number, part: { text?: string; finish?: "stop" | "length"; usage?: InferResult }): Record<string, unknown> {
  const base = { id, object: "text_completion", created, model };
  if (part.usage) return { ...base, choices: [], usage: usageOf(part.usage) };
  return { ...base, choices: [{ index: 0, text: part.text ?? "", logprobs: null, finish_reason: part.finish ?? null }] };
}

/** The vector a result carries (`output.data`, an array of numbers). */
function vectorOf(r: InferResult): number[] {
  const d = r.output?.data;
  if (!Array.isArray(d) || !d.every((x) => typeof x === "number")) throw new Error(`model '${r.model ?? "?"}' did not return a vector (output.data) for request '${r.id}'`);
  return d;
}

function encodeVector(v: number[], encoding: EmbeddingEncoding): number[] | string {
  if (encoding === "float") return v;
  const f = new Float32Array(v);
  return Buffer.from(f.buffer, f.byteOffset, f.byteLength).toString("base64");
}

export function embeddings(results: readonly InferResult[], model: string, encoding: EmbeddingEncoding): Record<string, unknown> {
  let prompt = 0;
  const data = results.map((r, index) => {
    prompt += r.usage?.prompt_tokens ?? 0;
    return { object: "embedding", index, embedding: encodeVector(vectorOf(r), encoding) };
  });
  return { object: "list", data, model, usage: { prompt_tokens: prompt, total_tokens: prompt } };
}

export function modelList(names: readonly string[]): Record<string, unknown> {
  return { object: "list", data: names.map((id) => modelObject(id)) };
}

export function modelObject(id: string): Record<string, unknown> {
  return { id, object: "model", created: 0, owned_by: "sluice" };
}
