/** `sluice dev` (what `npm run dev` runs) starts everything and answers a request sent with the CLI. */
import { expect } from "chai";
import { runCli } from "../support/process.js";

/** What a publish printed, without its trace id line (stderr). */
const printed = (output: string): string[] =>
  output
    .trim()
    .split("\n")
    .filter((l) => !/^trace [0-9a-f]{32}$/.test(l));

describe("sluice dev", function () {
  this.timeout(90_000);

  it("prints ready with the server URL, answers `sluice publish`, and stops cleanly on SIGINT", async () => {
    const dev = runCli(["dev"]);
    try {
      const m = await dev.waitFor(/ready.*?(nats:\/\/127\.0\.0\.1:\d+)/, 60_000);
      const url = m[1]!;
      const pub = runCli(["publish", "--server", url, "--tenant", "demo", "--model", "echo", "--prompt", "hello sluice"]);
      expect(await pub.exited).to.equal(0);
      expect(pub.output()).to.match(/^trace [0-9a-f]{32}$/m);
      const line = printed(pub.output()).pop()!;
      const r = JSON.parse(line) as { status: string; output: { text: string }; model: string };
      expect(r.status).to.equal("ok");
      expect(r.model).to.equal("echo");
      expect(r.output.text).to.equal("hello sluice");

      const streamed = runCli(["publish", "--server", url, "--tenant", "demo", "--model", "llm-sim", "--prompt", "one two three", "--stream"]);
      expect(await streamed.exited).to.equal(0);
      const [tokens, resultLine] = printed(streamed.output());
      const final = JSON.parse(resultLine!) as { status: string; output: { text: string } };
      expect(final.status).to.equal("ok");
      expect(tokens).to.equal(final.output.text);
      expect(final.output.text).to.equal("llm-sim@v1: one two three");

      const bad = runCli(["publish", "--server", url, "--tenant", "demo", "--model", "nope", "--prompt", "x"]);
      expect(await bad.exited).to.equal(1);
      expect(bad.output()).to.contain("NOT_FOUND");

      // Dev's worker is registered like a deployed one: the tools that find workers see it.
      const workers = runCli(["workers", "list", "--server", url]);
      expect(await workers.exited).to.equal(0);
      expect(workers.output()).to.match(/echo\tv1\tdev-worker\t127\.0\.0\.1:\d+/);
      // A replay of what was served in dev runs against dev's worker and finds it equal.
      const rep = runCli(["replay", "--server", url, "--since", "10m", "--model", "echo", "--json"]);
      expect(await rep.exited, rep.output()).to.equal(0);
      const summary = JSON.parse(rep.output().trim().split("\n").pop()!) as { summary: { replayed: number; equal: number; error: number } };
      expect(summary.summary.replayed).to.equal(1);
      expect(summary.summary.equal).to.equal(1);
      expect(summary.summary.error).to.equal(0);
      dev.kill("SIGINT");
      expect(await dev.exited).to.equal(0);
    } finally {
      dev.kill("SIGKILL");
    }
  });
});

describe("sluice dev with the llm-sim engine", function () {
  this.timeout(90_000);

  it("serves llm-sim on its own llm-sim worker, which reports its load and prefix blocks", async () => {
    const { DevStack } = await import("../../pipeline/dev/dev.js");
    const { InferenceClient } = await import("../../pipeline/client/client.js");
    const { connectNats } = await import("../../pipeline/connection.js");
    const dev = await DevStack.start({ llmSim: { kv_tokens: 4096 }, config: { telemetry: { metricsPort: -1 } } });
    const nc = await connectNats(dev.url, "dev-llm-test");
    try {
      const client = new InferenceClient(nc, "demo");
      const prompt = "a shared system prompt ".repeat(20);
      const r = await client.infer("llm-sim", { prompt, parameters: { max_tokens: 3 } });
      expect(r.output?.text).to.equal(" t0 t1 t2");
      expect(dev.llmWorker?.engine.log.map((x) => x.id)).to.deep.equal([r.id]);
      // The simulated worker did not serve it.
      expect(dev.engine.calls.some((c) => c.ids.includes(r.id))).to.equal(false);
      const load = await dev.llmWorker!.engine.load({ prefixBlocks: true });
      expect(load.prefixBlocks?.length).to.equal(Math.floor(prompt.length / 64));
    } finally {
      await nc.close();
      await dev.stop();
    }
  });
});
