/**
 * Compiles sluice to JavaScript in `dist/` (or `--out DIR`), for running without tsx: what the
 * image runs (`node dist/pipeline/cli/main.js ...`), and what the benchmark measures. The generated
 * protobuf code is JavaScript already and is copied as it is.
 *
 *   node scripts/build.mjs [--all] [--out DIR]     --all: tests and benchmark harness too
 */
import { spawnSync } from "node:child_process";
import { copyFileSync, mkdirSync, readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const args = process.argv.slice(2);
const all = args.includes("--all");
const outAt = args.indexOf("--out");
const out = outAt >= 0 && args[outAt + 1] ? args[outAt + 1] : join(root, "dist");

const tsc = join(root, "node_modules", "typescript", "bin", "tsc");
const r = spawnSync(process.execPath, [tsc, "-p", join(root, all ? "tsconfig.json" : "tsconfig.build.json"), "--outDir", out], {
  stdio: "inherit",
});
if (r.status !== 0) process.exit(r.status ?? 1);

const gen = join(root, "proto", "gen");
mkdirSync(join(out, "proto", "gen"), { recursive: true });
for (const f of readdirSync(gen)) if (f.endsWith(".js")) copyFileSync(join(gen, f), join(out, "proto", "gen", f));
