import { expect } from "chai";
import { lineDiff, textSimilarity } from "../../../pipeline/tools/text-compare.js";

describe("textSimilarity", () => {
  it("is 1 - edit distance / longer length on characters", () => {
    expect(textSimilarity("kitten", "sitting")).to.deep.equal({ metric: "levenshtein", value: 0.571 });
    expect(textSimilarity("abc", "xyz")).to.deep.equal({ metric: "levenshtein", value: 0 });
    expect(textSimilarity("", "")).to.deep.equal({ metric: "levenshtein", value: 1 });
  });

  it("falls back to token Jaccard for texts too long to align", () => {
    const a = "alpha beta gamma ".repeat(400);
    const b = "alpha beta delta ".repeat(400);
    expect(textSimilarity(a, b)).to.deep.equal({ metric: "jaccard", value: 0.5 });
  });
});

describe("lineDiff", () => {
  it("shows each change with its context, in separate hunks when far apart", () => {
    const a = ["1", "2", "3", "4", "5", "6", "7", "8", "9"].join("\n");
    const b = ["1", "two", "3", "4", "5", "6", "7", "8", "nine"].join("\n");
    expect(lineDiff(a, b, 1)).to.deep.equal([
      "--- original",
      "+++ replayed",
      "@@ -1,3 +1,3 @@",
      " 1",
      "-2",
      "+two",
      " 3",
      "@@ -8,2 +8,2 @@",
      " 8",
      "-9",
      "+nine",
    ]);
  });

  it("shows a block replaced when the texts differ in too many places to align", () => {
    const a = Array.from({ length: 3_000 }, (_, i) => `a${i}`).join("\n");
    const b = Array.from({ length: 3_000 }, (_, i) => `b${i}`).join("\n");
    const d = lineDiff(a, b);
    expect(d.slice(0, 3)).to.deep.equal(["--- original", "+++ replayed", "@@ -1,3000 +1,3000 @@"]);
    expect(d.filter((l) => l.startsWith("-"))).to.have.length(3_000 + 1);
    expect(d.filter((l) => l.startsWith("+"))).to.have.length(3_000 + 1);
  });
});
