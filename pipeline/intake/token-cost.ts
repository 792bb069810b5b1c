/**
 * What a request costs the device in tokens, for the token-weighted fair share: estimated when
 * it is admitted, known when its result comes back. Pure functions.
 */
import type { InferJob, InferResult } from "../../operators/types.js";

/** Characters per token of the estimate (the usual rule of thumb for English text and BPE tokenizers). */
export const CHARS_PER_TOKEN = 4;

/**
 * Estimated device tokens of a request: its prompt (and other inputs, as JSON) at
 * {@link CHARS_PER_TOKEN} characters a token, plus the completion it may ask for
 * (`parameters.max_tokens`). At least 1.
 */
export function estimateTokens(job: Pick<InferJob, "prompt" | "inputs" | "parameters">): number {
  let chars = job.prompt?.length ?? 0;
  if (job.inputs !== undefined) {
    try {
      chars += JSON.stringify(job.inputs)?.length ?? 0;
    } catch {
      // not JSON-able: counted as nothing
    }
  }
  const max = job.parameters?.["max_tokens"];
  const completion = typeof max === "number" && Number.isFinite(max) && max > 0 ? Math.floor(max) : 0;
  return Math.max(1, Math.ceil(chars / CHARS_PER_TOKEN) + completion);
}

/**
 * Device tokens a request really used: its result's prompt plus completion tokens; 0 when it
 * did not run on a device (an error, or an answer from the result cache); undefined when an ok
 * result does not say (the estimate stands).
 */
export function usedTokens(result: InferResult | undefined): number | undefined {
  if (!result || result.status !== "ok" || result.timing?.cache === "hit") return 0;
  const u = result.usage;
  if (!u) return undefined;
  return Math.max(0, (u.prompt_tokens || 0) + (u.completion_tokens || 0));
}
