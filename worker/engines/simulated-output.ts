/** What the simulated engine answers: the output text by model, word counts, tokens, and errors asked for. */
import { ERROR_CODES, type ErrorCode } from "../../proto/wire.js";
import type { EngineItemError, EngineRequest } from "../engine.js";

/** The output text the simulated engine produces for a request (see the module comment). */
export function simulatedOutputText(model: string, version: string, request: Pick<EngineRequest, "prompt" | "inputs">): string {
  const input = request.prompt ?? JSON.stringify(request.inputs) ?? "";
  switch (model) {
    case "echo":
      return input;
    case "reverse":
      return Array.from(input).reverse().join("");
    case "upper":
      return input.toUpperCase();
    default:
      return `${model}@${version}: ${input}`;
  }
}

/** Whitespace-separated words of a text; 0 for none. */
export function countWords(text: string | undefined): number {
  if (!text) return 0;
  let n = 0;
  for (const w of text.split(/\s+/)) if (w.length > 0) n++;
  return n;
}

/**
 * Splits a text into word tokens that keep their whitespace, so the tokens joined are the
 * text again.
 */
export function splitTokens(text: string): string[] {
  const tokens = text.match(/\s*\S+\s*/g);
  if (tokens) return tokens;
  return text.length > 0 ? [text] : [];
}

/** The tokens a request gets: at most its `parameters.max_tokens`. */
export function capTokens(tokens: string[], request: EngineRequest): string[] {
  const max = request.parameters?.["max_tokens"];
  if (typeof max === "number" && Number.isFinite(max) && max >= 0 && max < tokens.length) {
    return tokens.slice(0, Math.floor(max));
  }
  return tokens;
}

/** The error `parameters.simulate_error` asks for, if any (see the module comment of simulated.ts). */
export function simulatedError(request: EngineRequest): EngineItemError | undefined {
  const wanted = request.parameters?.["simulate_error"];
  if (wanted === undefined || wanted === null || wanted === false) return undefined;
  const code: ErrorCode = ERROR_CODES.find((c) => c === wanted) ?? "INTERNAL";
  return { code, message: `simulated ${code} for request '${request.id}'` };
}
