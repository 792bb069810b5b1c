/**
 * Entry point of the `sluice` command (`bin/sluice.js`, `npm run dev`, `node
 * dist/pipeline/cli/main.js`): runs {@link main} on the process arguments and exits with its
 * status.
 */
import { main } from "./program.js";

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(`sluice: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  },
);
