/** A replayed result against the recorded one: the verdict, similarity and line diff. */
import type { ErrorInfo, InferResult } from "../../../operators/types.js";
import { textSimilarity, lineDiff, type Similarity } from "../text-compare.js";

export type Verdict = "equal" | "different" | "missing" | "error";

/** A result as the report shows it. */
export interface ResultView {
  status: "ok" | "error";
  output?: InferResult["output"];
  version?: string;
  error?: ErrorInfo;
}

export interface Comparison {
  verdict: Verdict;
  /** For `different` outputs. */
  similarity?: Similarity;
  /** Unified-style line diff of the outputs (original `-`, replayed `+`), for `different`. */
  diff?: string[];
}

export function viewOf(r: InferResult): ResultView {
  const v: ResultView = { status: r.status };
  if (r.output !== undefined) v.output = r.output;
  if (r.version !== undefined) v.version = r.version;
  if (r.error !== undefined) v.error = r.error;
  return v;
}

/** JSON with object keys sorted, so equal values print equally. */
function canonicalJson(v: unknown): string {
  return JSON.stringify(v, (_k, x: unknown) =>
    x !== null && typeof x === "object" && !Array.isArray(x)
      ? Object.fromEntries(Object.entries(x as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
      : x,
  );
}

/** The text compared: the output's text, or its canonical JSON when it carries other data. */
function comparableText(output: InferResult["output"]): string {
  if (output && typeof output.text === "string" && output.data === undefined) return output.text;
  return output === undefined ? "" : (canonicalJson(output) ?? "");
}

/**
 * The verdict for a replayed result against the recorded one:
 * - `error`: the replay produced no result, or an error result that the recorded one is not;
 * - `missing`: no recorded result to compare with (and the replay succeeded);
 * - `equal`: same status and output (or the same error code);
 * - `different`: otherwise, with a similarity figure and a line diff.
 * Versions, usage and timing are not compared.
 */
export function compareResults(original: ResultView | undefined, replayed: ResultView | undefined): Comparison {
  if (!replayed) return { verdict: "error" };
  if (!original) return { verdict: replayed.status === "ok" ? "missing" : "error" };
  if (original.status === replayed.status) {
    if (replayed.status === "error" ? original.error?.code === replayed.error?.code : canonicalJson(original.output) === canonicalJson(replayed.output)) {
      return { verdict: "equal" };
    }
  }
  if (replayed.status === "error") return { verdict: "error" };
  const a = original.status === "ok" ? comparableText(original.output) : `error ${original.error?.code ?? ""}: ${original.error?.message ?? ""}`;
  const b = comparableText(replayed.output);
  return { verdict: "different", similarity: textSimilarity(a, b), diff: lineDiff(a, b) };
}
