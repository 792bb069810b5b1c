/**
 * How a replayed output differs from the original: a similarity figure (fastest-levenshtein) and
 * a unified-style line diff (jsdiff).
 */
import { structuredPatch } from "diff";
import { distance } from "fastest-levenshtein";

/** Character pairs above which text similarity falls back from Levenshtein to token Jaccard. */
const LEVENSHTEIN_MAX_CELLS = 20_000_000;
/** Edits past which the diff stops aligning lines and shows the changed block replaced. */
const DIFF_MAX_EDIT_LENGTH = 2_000;

export interface Similarity {
  /** `levenshtein`: 1 - edit distance / longer length, on characters; `jaccard`: shared / all distinct whitespace tokens (for long texts). */
  metric: "levenshtein" | "jaccard";
  /** 0 (nothing alike) to 1 (identical). */
  value: number;
}

/**
 * How alike two texts are, 0..1: normalized Levenshtein distance on characters; for texts too
 * long for that, Jaccard similarity of their whitespace tokens.
 */
export function textSimilarity(a: string, b: string): Similarity {
  if (a === b) return { metric: "levenshtein", value: 1 };
  if (a.length * b.length > LEVENSHTEIN_MAX_CELLS) {
    const ta = new Set(a.split(/\s+/).filter(Boolean));
    const tb = new Set(b.split(/\s+/).filter(Boolean));
    let shared = 0;
    for (const t of ta) if (tb.has(t)) shared++;
    const all = ta.size + tb.size - shared;
    return { metric: "jaccard", value: round3(all === 0 ? 1 : shared / all) };
  }
  return { metric: "levenshtein", value: round3(1 - distance(a, b) / Math.max(a.length, b.length)) };
}

function round3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

/**
 * A unified-style diff of two texts by lines: `--- original`, `+++ replayed`, then hunks
 * `@@ -l,n +l,n @@` with `-` (only in the original), `+` (only in the replay) and ` ` (context)
 * lines. Past a number of edits the changed lines are shown as removed then added.
 */
export function lineDiff(a: string, b: string, context = 2): string[] {
  const out = ["--- original", "+++ replayed"];
  if (a === b) return out;
  // Both end in a newline, so a last line is compared as a line whichever text continues.
  const patch = structuredPatch("original", "replayed", `${a}\n`, `${b}\n`, undefined, undefined, { context, maxEditLength: DIFF_MAX_EDIT_LENGTH });
  if (!patch) {
    const x = a.split("\n");
    const y = b.split("\n");
    out.push(`@@ -1,${x.length} +1,${y.length} @@`, ...x.map((l) => `-${l}`), ...y.map((l) => `+${l}`));
    return out;
  }
  for (const h of patch.hunks) {
    out.push(`@@ -${h.oldStart},${h.oldLines} +${h.newStart},${h.newLines} @@`);
    out.push(...h.lines);
  }
  return out;
}
