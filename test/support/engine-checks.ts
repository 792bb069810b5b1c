/** Helpers of the engine adapters' tests: requests and batches of one model, results and generations checked. */
import type { EngineBatch, EngineItemResult, EngineRequest, EngineToken } from "../../worker/engine.js";

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `check` every few milliseconds until it holds; throws after `timeoutMs`. */
export async function waitFor(what: string, check: () => boolean, timeoutMs = 3_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

export async function rejectionOf(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  throw new Error("expected a rejection, but it resolved");
}

export async function collect(tokens: AsyncIterable<EngineToken>): Promise<string[]> {
  const out: string[] = [];
  for await (const t of tokens) out.push(t.text);
  return out;
}

/** Iterates a generation and returns what it yielded and how it failed (it must fail). */
export async function failureOf(tokens: AsyncIterable<EngineToken>): Promise<{ texts: string[]; error: unknown }> {
  const texts: string[] = [];
  try {
    for await (const t of tokens) texts.push(t.text);
  } catch (error) {
    return { texts, error };
  }
  throw new Error(`expected the generation to fail, but it yielded ${JSON.stringify(texts)} and ended`);
}

export function ok(result: EngineItemResult | undefined): Extract<EngineItemResult, { ok: true }> {
  if (!result?.ok) throw new Error(`expected an ok result, got ${JSON.stringify(result)}`);
  return result;
}

export function failed(result: EngineItemResult | undefined): Extract<EngineItemResult, { ok: false }> {
  if (!result || result.ok) throw new Error(`expected an error result, got ${JSON.stringify(result)}`);
  return result;
}

/** `request(id, prompt, parameters?, extra?)` and `batchOf(...requests)` for `model`, version v1, tenant acme. */
export function engineRequests(model: string): {
  request: (id: string, prompt: string | undefined, parameters?: Record<string, unknown>, extra?: Partial<EngineRequest>) => EngineRequest;
  batchOf: (...requests: EngineRequest[]) => EngineBatch;
} {
  return {
    request: (id, prompt, parameters, extra = {}) => ({
      id,
      tenant: "acme",
      model,
      version: "v1",
      ...(prompt !== undefined ? { prompt } : {}),
      ...(parameters ? { parameters } : {}),
      ...extra,
    }),
    batchOf: (...requests) => ({ model, version: "v1", requests }),
  };
}
