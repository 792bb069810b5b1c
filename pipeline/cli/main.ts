/**
 * Entry point of the `sluice` command (`bin/sluice.js`, `npm run dev`, `node
 * dist/pipeline/cli/main.js`): runs {@link main} on the process arguments and exits with its
 * status.
 */
import { main } from "./program.js";

/** Exits once what was written to stdout has gone out (a pipe takes a large result in pieces). */
function exitAfterOutput(code: number): void {
  process.stdout.write("", () => process.exit(code));
}

main(process.argv.slice(2)).then(
  (code) => exitAfterOutput(code),
  (err: unknown) => {
    console.error(`sluice: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  },
);
