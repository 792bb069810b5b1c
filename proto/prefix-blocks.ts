/**
 * Prefix blocks (docs/protocol.md, "Prefix blocks"): how a prompt is cut into blocks of tokens
 * and how each block is named, so that the pipeline's router and the workers that report the
 * blocks they hold (`WorkerLoad.prefix_blocks`) name the same prefix the same way.
 *
 * - Tokens are estimated, not counted by a model's tokenizer: {@link CHARS_PER_TOKEN}
 *   characters (UTF-16 code units) of the prompt make one token.
 * - A block is {@link BLOCK_TOKENS} tokens; only full blocks count (a KV cache keeps the last,
 *   partial block of a prompt for that prompt alone).
 * - A block's hash covers the block and every block before it (chained), so equal hashes mean
 *   equal prefixes: `h0 = H("" + text0)`, `hi = H(h(i-1) + texti)`, H being SHA-256 of the
 *   UTF-8 bytes, written as the first 16 hex digits.
 */
import { createHash } from "node:crypto";

export const CHARS_PER_TOKEN = 4;
export const BLOCK_TOKENS = 16;
/** Characters of one block. */
export const BLOCK_CHARS = CHARS_PER_TOKEN * BLOCK_TOKENS;

/** Estimated tokens of a text. */
export function estimateTokens(text: string): number {
  return Math.ceil(text.length / CHARS_PER_TOKEN);
}

/**
 * The chained hashes of the full blocks of `prompt`, first block first. `maxBlocks` stops early
 * (a router need not hash past the longest prefix any worker could hold).
 */
export function prefixBlockHashes(prompt: string, maxBlocks = Number.POSITIVE_INFINITY): string[] {
  const out: string[] = [];
  let prev = "";
  const full = Math.min(Math.floor(prompt.length / BLOCK_CHARS), maxBlocks);
  for (let i = 0; i < full; i++) {
    prev = createHash("sha256")
      .update(prev)
      .update(prompt.slice(i * BLOCK_CHARS, (i + 1) * BLOCK_CHARS))
      .digest("hex")
      .slice(0, 16);
    out.push(prev);
  }
  return out;
}
