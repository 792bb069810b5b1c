/**
 * The `sluice` command line, on commander: one program, one file per command group.
 *
 *   sluice dev | serve | worker        long-running processes (serve.ts)
 *   sluice publish                     send requests, print results (publish.ts)
 *   sluice models | workers            the registries in NATS KV (models.ts, workers.ts)
 *   sluice dlq | replay                dead letters and replays (dlq.ts, replay.ts)
 *   sluice gateway                     the HTTP / OpenAI gateway and its API keys (gateway.ts)
 *
 * A usage mistake (an unknown command or option, a missing value, a bad value) is one line on
 * stderr and exit status 2; a command that fails says why in one line and exits 1. No stack
 * traces (set SLUICE_DEBUG=1 to see them).
 */
import { Command, CommanderError } from "commander";
import { EngineSpecError } from "../../worker/engines.js";
import { ConfigError } from "../config.js";
import { ModelSpecError } from "../routing/registry.js";
import { InferenceError } from "../client/errors.js";
import { CliError, EXIT_FAILED, EXIT_USAGE, UsageError } from "./common.js";
import { addDlqCommand } from "./dlq.js";
import { addGatewayCommand } from "./gateway.js";
import { addModelsCommand } from "./models.js";
import { addPublishCommand } from "./publish.js";
import { addReplayCommand } from "./replay.js";
import { addServeCommands } from "./serve.js";
import { addWorkersCommand } from "./workers.js";

/** What a command's action reports back to {@link main}. */
export interface CliContext {
  exitCode: number;
}

const EPILOG = `
Every command that talks to NATS takes --server URL (or NATS_URL); credentials come from
NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_CREDS, NATS_INBOX_PREFIX and NATS_TLS_CA/CERT/KEY.
Exit status: 0 done, 1 failed, 2 bad usage.`;

/** Builds a fresh program (commander keeps parse state in it, so one per run). */
function buildProgram(ctx: CliContext): Command {
  const program = new Command("sluice")
    .description("a reactive inference pipeline on NATS JetStream")
    .usage("<command> [options]")
    .addHelpText("after", EPILOG)
    .showSuggestionAfterError(true)
    .exitOverride();
  // Sub-commands inherit these when added with .command().
  program.configureOutput({
    writeOut: (s) => process.stdout.write(s),
    writeErr: (s) => process.stderr.write(s),
    // One line: commander's own message (and its suggestion), without the help.
    outputError: (s) => console.error(`sluice: ${oneLine(s.replace(/^error: /, ""))}`),
  });
  addServeCommands(program, ctx);
  addPublishCommand(program, ctx);
  addModelsCommand(program, ctx);
  addWorkersCommand(program, ctx);
  addDlqCommand(program, ctx);
  addReplayCommand(program, ctx);
  addGatewayCommand(program, ctx);
  // Every command, however deep: errors as one line, no process.exit from commander.
  const configure = (c: Command, path: string): void => {
    c.exitOverride()
      .showSuggestionAfterError(true)
      .configureOutput({ ...program.configureOutput(), outputError: (s) => console.error(`${path}: ${oneLine(s.replace(/^error: /, ""))}`) });
    c.commands.forEach((sub) => configure(sub, path));
  };
  program.commands.forEach((c) => configure(c, `sluice ${c.name()}`));
  return program;
}

function oneLine(s: string): string {
  return s.trim().replace(/\s*\n\s*/g, " ");
}

/** Runs the CLI on `argv` (without node and the script); resolves with the exit status. */
export async function main(argv: string[]): Promise<number> {
  const ctx: CliContext = { exitCode: 0 };
  const program = buildProgram(ctx);
  const name = (): string => {
    const cmd = argv.find((a) => !a.startsWith("-"));
    return cmd && program.commands.some((c) => c.name() === cmd) ? `sluice ${cmd}` : "sluice";
  };
  const swallowed = optionTakenAsValue(program, argv);
  if (swallowed !== undefined) {
    console.error(swallowed);
    return EXIT_USAGE;
  }
  try {
    await program.parseAsync(argv, { from: "user" });
    return ctx.exitCode;
  } catch (err) {
    if (err instanceof CommanderError) {
      // Help asked for, or shown instead of a missing sub-command.
      if (err.code === "commander.helpDisplayed" || err.code === "commander.version") return 0;
      return EXIT_USAGE;
    }
    const { message, code } = describe(err);
    console.error(`${name()}: ${message}`);
    if (process.env["SLUICE_DEBUG"] === "1") console.error(err);
    return code;
  }
}

/**
 * `--prompt --tenant t`: commander takes the next argument as an option's value whatever it is,
 * so a forgotten value would swallow the following option. Reported as the missing value it is.
 */
function optionTakenAsValue(program: Command, argv: readonly string[]): string | undefined {
  let cmd = program;
  let path = "sluice";
  const isOption = (c: Command, arg: string): boolean =>
    arg === "-h" || arg === "--help" || c.options.some((o) => o.long === arg.split("=")[0] || o.short === arg);
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const sub = arg.startsWith("-") ? undefined : cmd.commands.find((c) => c.name() === arg);
    if (sub) {
      // Messages name the top-level command, as commander's own do.
      if (cmd === program) path = `sluice ${sub.name()}`;
      cmd = sub;
      continue;
    }
    const opt = cmd.options.find((o) => o.long === arg || o.short === arg);
    if (!opt || !(opt.required || opt.optional)) continue;
    const next = argv[i + 1];
    if (next !== undefined && isOption(cmd, next)) {
      return `${path}: option '${opt.flags}' argument missing (the next argument is the option '${next}')`;
    }
    i++;
  }
  return undefined;
}

/** The one line and exit status of an error thrown by a command. */
function describe(err: unknown): { message: string; code: number } {
  if (err instanceof CliError) return { message: err.message, code: err.exitCode };
  if (err instanceof UsageError || err instanceof ConfigError || err instanceof ModelSpecError || err instanceof EngineSpecError) {
    return { message: err.message, code: EXIT_USAGE };
  }
  if (err instanceof InferenceError) return { message: `${err.code}: ${err.message}`, code: EXIT_FAILED };
  const message = err instanceof Error ? err.message : String(err);
  return { message: oneLine(message), code: EXIT_FAILED };
}
