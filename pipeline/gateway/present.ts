/**
 * A finished request as its HTTP answer: the status and body of the endpoint that accepted it
 * (the same for the waiting caller, `GET /v1/requests/{id}` and a callback).
 */
import type { InferResult } from "../../operators/types.js";
import { errorBody, HTTP_STATUS } from "./errors.js";
import { chatCompletion, completion, embeddings } from "./openai.js";
import type { AsyncRecord } from "./records.js";

export interface HttpAnswer {
  status: number;
  body: unknown;
}

/** How to present results: what the accepting endpoint knew of the request. */
export type Presentation = Pick<AsyncRecord, "kind" | "model" | "max_tokens" | "encoding">;

export function present(p: Presentation, results: readonly InferResult[]): HttpAnswer {
  const failed = results.find((r) => r.status !== "ok");
  if (failed) {
    const code = failed.error?.code ?? "INTERNAL";
    return { status: HTTP_STATUS[code], body: { ...errorBody(code, failed.error?.message ?? "request failed"), id: failed.id } };
  }
  const first = results[0]!;
  switch (p.kind) {
    case "chat":
      return { status: 200, body: chatCompletion(first, p.model, p.max_tokens) };
    case "completion":
      return { status: 200, body: completion(first, p.model, p.max_tokens) };
    case "embeddings":
      try {
        return { status: 200, body: embeddings(results, p.model, p.encoding ?? "float") };
      } catch (err) {
        return { status: 500, body: errorBody("INTERNAL", (err as Error).message) };
      }
    case "infer":
      return { status: 200, body: first };
  }
}
