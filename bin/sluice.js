#!/usr/bin/env node
// The sluice CLI. In a checkout (the TypeScript sources are next to this file) it runs them
// directly through tsx, so there is no build step and nothing stale; an installation that ships
// only the compiled JavaScript (`npm run build`, as the image does) runs dist/.
import { existsSync } from "node:fs";

const sources = new URL("../pipeline/cli/main.ts", import.meta.url);
if (existsSync(sources)) {
  const { register } = await import("tsx/esm/api");
  register();
  await import("../pipeline/cli/main.ts");
} else {
  await import("../dist/pipeline/cli/main.js");
}
