/**
 * The `sluice` command as a user runs it (bin/sluice.js in a child process): every mistake is one
 * line on stderr with exit status 2 (usage) or 1 (failure), never a stack trace; and what the
 * README's CLI section shows is what happens, against `sluice dev` (a real nats-server, worker
 * and pipeline).
 */
import { spawn } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { expect } from "chai";
import { ROOT, runCli, type CliProcess } from "../support/process.js";

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the CLI to its end. */
function sluice(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  const child = spawn(process.execPath, [join(ROOT, "bin", "sluice.js"), ...args], {
    cwd: ROOT,
    env: { ...process.env, SLUICE_DEBUG: "", OTEL_TRACES_EXPORTER: "", OTEL_EXPORTER_OTLP_ENDPOINT: "", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
  child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
  return new Promise((resolve) => child.once("close", (code) => resolve({ code, stdout, stderr })));
}

/** One line on stderr, nothing on stdout, no stack trace. */
function expectOneLine(r: Run, code: number, ...says: Array<string | RegExp>): void {
  const lines = r.stderr.trimEnd().split("\n");
  expect(lines, r.stderr).to.have.length(1);
  expect(r.stderr).not.to.match(/\n\s+at /);
  expect(r.stdout).to.equal("");
  for (const s of says) expect(lines[0]).to.match(typeof s === "string" ? new RegExp(s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")) : s);
  expect(r.code, r.stderr).to.equal(code);
}

/** A loopback port where nothing listens. */
async function deadPort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve) => srv.listen(0, "127.0.0.1", resolve));
  const port = (srv.address() as { port: number }).port;
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

describe("sluice CLI: usage mistakes are one line and exit 2", function () {
  this.timeout(120_000);

  it("a mistyped option, a missing value, an unknown command, a bad choice, a missing required option", async () => {
    const [typo, noValue, swallowed, unknown, priority, noTenant, badPort] = await Promise.all([
      sluice(["publish", "--tenant", "t", "--model", "echo", "--promt", "hi"]),
      sluice(["publish", "--tenant", "t", "--model", "echo", "--prompt"]),
      sluice(["publish", "--tenant", "--model", "echo", "--prompt", "hi"]),
      sluice(["frobnicate"]),
      sluice(["publish", "--tenant", "t", "--model", "echo", "--prompt", "hi", "--priority", "urgent"]),
      sluice(["publish", "--model", "echo", "--prompt", "hi"]),
      sluice(["serve", "--metrics-port", "-2"]),
    ]);
    expectOneLine(typo, 2, "sluice publish: unknown option '--promt'", "--prompt");
    expectOneLine(noValue, 2, "sluice publish:", "--prompt", "argument missing");
    expectOneLine(swallowed, 2, "sluice publish: option '-t, --tenant <tenant>' argument missing", "'--model'");
    expectOneLine(unknown, 2, "unknown command 'frobnicate'");
    expectOneLine(priority, 2, "'urgent'", "high, normal, low");
    expectOneLine(noTenant, 2, "--tenant is required");
    expectOneLine(badPort, 2, "'-2'", "-1 (off)");
  });

  it("bad JSON in 'models set', an engine without its URL, a server where nothing listens (named)", async () => {
    const port = await deadPort();
    const url = `nats://127.0.0.1:${port}`;
    const [json, vllm, publish, models, llmSim] = await Promise.all([
      sluice(["models", "set", "m", "{bad", "--server", url]),
      sluice(["worker", "--engine", "vllm"]),
      sluice(["publish", "--server", url, "--tenant", "t", "--model", "echo", "--prompt", "hi"]),
      sluice(["models", "list"], { NATS_URL: url }),
      sluice(["worker", "--engine", "llm-sim", "--kv-tokens", "8"]),
    ]);
    expectOneLine(llmSim, 2, "sluice worker:", "kv_tokens must be an integer >= 16, got 8");
    expectOneLine(json, 2, "sluice models: the value for 'm' is not JSON");
    expectOneLine(vllm, 2, "sluice worker:", "needs 'url'", "--engine-url");
    expectOneLine(publish, 1, `cannot connect to NATS at ${url}`, "--server");
    expectOneLine(models, 1, `cannot connect to NATS at ${url}`);
  });

  it("help is printed on request and exits 0; no command prints it and exits 2", async () => {
    const [help, none, publishHelp] = await Promise.all([sluice(["--help"]), sluice([]), sluice(["publish", "--help"])]);
    expect(help.code).to.equal(0);
    expect(help.stdout).to.contain("publish").and.to.contain("replay");
    expect(none.code).to.equal(2);
    expect(publishHelp.code).to.equal(0);
    expect(publishHelp.stdout).to.contain("--tenant <tenant>").and.to.contain("(required").and.to.contain("RELATIVE");
  });
});

describe("sluice CLI against 'sluice dev'", function () {
  this.timeout(180_000);
  let dev: CliProcess;
  let url: string;

  before(async function () {
    this.timeout(120_000);
    // --metrics-port -1 is documented as "off".
    dev = runCli(["dev", "--metrics-port", "-1"], { OTEL_TRACES_EXPORTER: "", OTEL_EXPORTER_OTLP_ENDPOINT: "" });
    const ready = await dev.waitFor(/sluice dev ready: NATS (nats:\/\/\S+) .*\n/, 100_000);
    url = ready[1]!;
    expect(ready[0]).not.to.contain("metrics");
  });

  after(async function () {
    this.timeout(30_000);
    dev?.kill("SIGTERM");
    expect(await dev?.exited).to.equal(0);
  });

  it("runs the README's quick-start publish and prints what the README shows", async () => {
    const readme = readFileSync(join(ROOT, "README.md"), "utf8");
    const m = /npx sluice publish --server nats:\/\/127\.0\.0\.1:<port> (.*)\n# (\{.*)\n/.exec(readme);
    expect(m, "the README's quick-start publish example").to.not.equal(null);
    const args = [...m![1]!.matchAll(/"([^"]*)"|(\S+)/g)].map((x) => x[1] ?? x[2]!);
    const r = await sluice(["publish", "--server", url, ...args]);
    expect(r.code, r.stderr).to.equal(0);
    const shown = m![2]!.slice(0, m![2]!.indexOf("…")); // {"id":"
    expect(r.stdout.startsWith(shown)).to.equal(true);
    const result = JSON.parse(r.stdout) as Record<string, unknown>;
    const documented = m![2]!.replace(/"…"/g, '"x"').replace(/\{…\}/g, "{}");
    expect(Object.keys(result)).to.deep.equal(Object.keys(JSON.parse(documented) as object));
    expect(result).to.deep.include({ status: "ok", model: "echo", version: "v1", output: { text: "hello" } });
    // The request's trace id, even without an exporter.
    expect(r.stderr).to.match(/^trace [0-9a-f]{32}\n$/);
  });

  it("a reused request id is said at once on stderr and answered with the first request's result", async () => {
    const id = `dup-${Date.now()}`;
    const first = await sluice(["publish", "--server", url, "--tenant", "demo", "--model", "echo", "--prompt", "first", "--id", id]);
    expect(first.code, first.stderr).to.equal(0);
    // A timeout far beyond the test's: only an answer at once passes.
    const again = await sluice(["publish", "--server", url, "--tenant", "demo", "--model", "echo", "--prompt", "second", "--id", id, "--timeout-ms", "3600000"]);
    expect(again.code, again.stderr).to.equal(0);
    expect(again.stderr.trimEnd().split("\n")).to.have.length(1);
    expect(again.stderr).to.contain(`request id '${id}' was used before`);
    expect(again.stdout).to.equal(first.stdout);
    expect((JSON.parse(again.stdout) as { output: { text: string } }).output.text).to.equal("first");
  });

  it("'models rm' of a model that does not exist says so and fails; of one that does, removes it", async () => {
    const missing = await sluice(["models", "rm", "nosuchmodel", "--server", url]);
    expectOneLine(missing, 1, "no model 'nosuchmodel'", "nothing removed");
    const set = await sluice(["models", "set", "gone", '{"versions":{"v1":{"weight":100}}}', "--server", url]);
    expect(set.code, set.stderr).to.equal(0);
    const rm = await sluice(["models", "rm", "gone", "--server", url]);
    expect(rm.code, rm.stderr).to.equal(0);
    expect(rm.stdout).to.equal("removed gone\n");
    const get = await sluice(["models", "get", "gone", "--server", url]);
    expectOneLine(get, 1, "no model 'gone'");
  });

  it("a 2 MB prompt (over the 256 KiB message limit) is sent through the object store and answered whole", async () => {
    const file = join(tmpdir(), `sluice-cli-${process.pid}.jsonl`);
    writeFileSync(file, `${JSON.stringify({ model: "echo", prompt: "a".repeat(2_000_000) })}\n${JSON.stringify({ model: "echo", prompt: "small" })}\n`);
    const r = await sluice(["publish", "--server", url, "--tenant", "demo", "--file", file, "--concurrency", "1"]);
    expect(r.code, r.stderr).to.equal(0);
    const [big, small] = r.stdout.trimEnd().split("\n").map((l) => JSON.parse(l) as { status: string; output?: { text: string } });
    expect(big!.status).to.equal("ok");
    expect(big!.output!.text).to.equal("a".repeat(2_000_000));
    expect(small!.status).to.equal("ok");
  });

  it("OTEL_TRACES_EXPORTER=console prints the request's spans on stderr, with the trace id it printed", async () => {
    const r = await sluice(["publish", "--server", url, "--tenant", "demo", "--model", "echo", "--prompt", "traced"], { OTEL_TRACES_EXPORTER: "console" });
    expect(r.code, r.stderr).to.equal(0);
    const traceId = /^trace ([0-9a-f]{32})$/m.exec(r.stderr)?.[1];
    expect(traceId, r.stderr).to.be.a("string");
    expect(r.stderr).to.match(new RegExp(`^span sluice-client send infer\\.req trace=${traceId} span=[0-9a-f]{16} parent=- [0-9.]+ms OK$`, "m"));
    expect(JSON.parse(r.stdout)).to.deep.include({ status: "ok" });
  });
});
