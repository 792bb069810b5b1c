#!/usr/bin/env node
// Runs the TypeScript CLI directly (no build step needed in a checkout).
import { register } from "tsx/esm/api";
register();
process.env.SLUICE_CLI = "1";
await import("../pipeline/cli.ts");
