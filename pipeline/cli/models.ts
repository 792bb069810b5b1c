/** `sluice models`: the model registry (NATS KV bucket infer_models). */
import type { Command } from "commander";
import { ModelRegistry, ModelSpecError, parseModelSpec } from "../routing/registry.js";
import { CliError, serverOption, UsageError, withNats, type ServerOpts } from "./common.js";
import type { CliContext } from "./program.js";

export function addModelsCommand(program: Command, ctx: CliContext): void {
  const models = program.command("models").description("the model registry (NATS KV bucket infer_models)");

  models
    .command("list")
    .description("every model and its value")
    .addOption(serverOption())
    .action(async (o: ServerOpts) => {
      await withNats(o, async (nc) => {
        const kv = await ModelRegistry.openBucket(nc);
        for await (const k of await kv.keys()) {
          const e = await kv.get(k);
          if (e && e.operation === "PUT") console.log(`${k}\t${e.string()}`);
        }
      });
      ctx.exitCode = 0;
    });

  models
    .command("get")
    .description("one model's value")
    .argument("<model>")
    .addOption(serverOption())
    .action(async (model: string, o: ServerOpts) => {
      await withNats(o, async (nc) => {
        const e = await (await ModelRegistry.openBucket(nc)).get(model);
        if (!e || e.operation !== "PUT") throw new CliError(`no model '${model}'`);
        console.log(e.string());
      });
      ctx.exitCode = 0;
    });

  models
    .command("set")
    .description("write a model's value (takes effect on running pipelines)")
    .argument("<model>")
    .argument("<json>", `e.g. '{"versions":{"v1":{"weight":100}}}'`)
    .addOption(serverOption())
    .action(async (model: string, text: string, o: ServerOpts) => {
      let value: unknown;
      try {
        value = JSON.parse(text);
      } catch (err) {
        throw new UsageError(`the value for '${model}' is not JSON (${(err as Error).message}); quote it, e.g. '{"versions":{"v1":{"weight":100}}}'`);
      }
      let spec;
      try {
        spec = parseModelSpec(model, value);
      } catch (err) {
        throw err instanceof ModelSpecError ? new UsageError(err.message) : err;
      }
      await withNats(o, async (nc) => {
        await (await ModelRegistry.openBucket(nc)).put(model, JSON.stringify(spec));
      });
      console.log(`set ${model}`);
      ctx.exitCode = 0;
    });

  models
    .command("rm")
    .description("remove a model (its requests are then answered NOT_FOUND)")
    .argument("<model>")
    .addOption(serverOption())
    .action(async (model: string, o: ServerOpts) => {
      await withNats(o, async (nc) => {
        const kv = await ModelRegistry.openBucket(nc);
        const e = await kv.get(model);
        if (!e || e.operation !== "PUT") throw new CliError(`no model '${model}': nothing removed (sluice models list shows the models)`);
        await kv.delete(model);
      });
      console.log(`removed ${model}`);
      ctx.exitCode = 0;
    });
}
