/** `sluice workers`: the registered workers (NATS KV bucket infer_workers). */
import type { Command } from "commander";
import { openWorkersBucket, parseWorkerKey } from "../workers/directory.js";
import { serverOption, withNats, type ServerOpts } from "./common.js";
import type { CliContext } from "./program.js";

export function addWorkersCommand(program: Command, ctx: CliContext): void {
  program
    .command("workers")
    .description("registered workers (NATS KV bucket infer_workers)")
    .command("list")
    .description("every registered worker, with the age of its last refresh")
    .addOption(serverOption())
    .action(async (o: ServerOpts) => {
      await withNats(o, async (nc) => {
        const kv = await openWorkersBucket(nc);
        console.log("model\tversion\tworker\tendpoint\tcapacity\tage_s");
        for await (const k of await kv.keys()) {
          const e = await kv.get(k);
          const key = parseWorkerKey(k);
          if (!e || e.operation !== "PUT" || !key) continue;
          const val = e.json<{ endpoint?: string; capacity?: number }>();
          const age = ((Date.now() - e.created.getTime()) / 1000).toFixed(1);
          console.log(`${key.model}\t${key.version}\t${key.workerId}\t${val.endpoint ?? "?"}\t${val.capacity ?? "?"}\t${age}`);
        }
      });
      ctx.exitCode = 0;
    });
}
