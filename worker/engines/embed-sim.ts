/**
 * The simulated embedding model `embed-sim`: a deterministic unit vector per text (the same
 * text gives the same vector, different texts almost surely different ones), derived from
 * SHA-256 in counter mode. Stands in for a real embedding model in tests and `sluice dev`.
 */
import { createHash } from "node:crypto";

export const EMBED_SIM_MODEL = "embed-sim";
const EMBED_SIM_DIMENSIONS = 64;

export function simulatedEmbedding(text: string, dimensions = EMBED_SIM_DIMENSIONS): number[] {
  const v: number[] = [];
  for (let block = 0; v.length < dimensions; block++) {
    const digest = createHash("sha256").update(`${block}:${text}`, "utf8").digest();
    for (let i = 0; i + 2 <= digest.length && v.length < dimensions; i += 2) v.push(digest.readUInt16LE(i) / 32768 - 1);
  }
  const norm = Math.sqrt(v.reduce((a, x) => a + x * x, 0)) || 1;
  // Rounded to float32 so the vector survives a base64 (float32) encoding unchanged.
  return v.map((x) => Math.fround(x / norm));
}
