/**
 * The README's HTTP examples, run as written against `sluice dev`: each curl command of the
 * "HTTP / OpenAI" section must print what the `# ` line under it shows (`…` stands for anything).
 * Then the official OpenAI SDK against dev with the key `sluice-dev`, as the quick start shows.
 */
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import { expect } from "chai";
import OpenAI from "openai";
import { ROOT, runCli, type CliProcess } from "../support/process.js";

const run = promisify(execFile);

interface Example {
  command: string;
  expected: string;
}

/** The curl commands of the README's "HTTP / OpenAI" section, each with the output it shows. */
export function readmeExamples(readme: string): Example[] {
  const start = readme.indexOf("\n## HTTP / OpenAI\n");
  const end = readme.indexOf("\n## ", start + 5);
  const section = readme.slice(start, end);
  const examples: Example[] = [];
  for (const block of section.matchAll(/```sh\n([\s\S]*?)```/g)) {
    const lines = block[1]!.split("\n");
    for (let i = 0; i < lines.length; i++) {
      if (!lines[i]!.startsWith("curl ")) continue;
      let command = lines[i]!;
      while (command.endsWith("\\")) command = command.slice(0, -1) + lines[++i]!;
      const next = lines[i + 1] ?? "";
      if (next.startsWith("# ")) examples.push({ command, expected: next.slice(2) });
    }
  }
  return examples;
}

/** `…`-separated parts of `expected` found in `actual`, in order. */
function matches(actual: string, expected: string): boolean {
  let at = 0;
  for (const part of expected.split("…")) {
    const found = actual.indexOf(part, at);
    if (found < 0) return false;
    at = found + part.length;
  }
  return true;
}

describe("the README's HTTP examples against sluice dev", function () {
  this.timeout(120_000);
  let dev: CliProcess;
  let base: string;

  before(async () => {
    dev = runCli(["dev", "--metrics-port=-1"]);
    base = (await dev.waitFor(/ready.*?HTTP (http:\/\/127\.0\.0\.1:\d+\/v1)/, 60_000))[1]!;
  });
  after(async () => {
    dev?.kill("SIGINT");
    expect(await dev.exited).to.equal(0);
  });

  it("every curl example prints what the README shows", async () => {
    const examples = readmeExamples(readFileSync(join(ROOT, "README.md"), "utf8"));
    expect(examples.length).to.be.at.least(6);
    for (const ex of examples) {
      let out = "";
      // An async request's answer may still be pending when asked for at once: ask again.
      for (let attempt = 0; attempt < 100; attempt++) {
        out = (await run("bash", ["-c", ex.command], { env: { ...process.env, SLUICE_HTTP: base } })).stdout;
        if (!out.includes('"status":"pending"')) break;
        await new Promise((r) => setTimeout(r, 50));
      }
      expect(matches(out, ex.expected), `${ex.command}\nprinted:  ${out}\nexpected: ${ex.expected}`).to.equal(true);
    }
  });

  it("the OpenAI SDK works against dev with the key sluice-dev", async () => {
    const openai = new OpenAI({ baseURL: base, apiKey: "sluice-dev", maxRetries: 0 });
    const r = await openai.chat.completions.create({ model: "echo", messages: [{ role: "user", content: "hello" }] });
    expect(r.choices[0]!.message.content).to.equal("hello");
    let text = "";
    for await (const c of await openai.chat.completions.create({ model: "llm-sim", messages: [{ role: "user", content: "a story" }], stream: true }))
      text += c.choices[0]?.delta.content ?? "";
    expect(text).to.equal("llm-sim@v1: a story");
    const e = await openai.embeddings.create({ model: "embed-sim", input: ["x", "x"] });
    expect(Array.from(e.data[0]!.embedding)).to.deep.equal(Array.from(e.data[1]!.embedding));
    const ids: string[] = [];
    for await (const m of openai.models.list()) ids.push(m.id);
    expect(ids).to.include.members(["echo", "reverse", "upper", "llm-sim", "embed-sim"]);
    const denied = await new OpenAI({ baseURL: base, apiKey: "not-a-key", maxRetries: 0 }).models.list().catch((err: unknown) => err);
    expect(denied).to.be.instanceOf(OpenAI.AuthenticationError);
  });
});
