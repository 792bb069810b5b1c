/**
 * Replay, end to end against a real nats-server and real gRPC workers: recorded traffic is
 * re-run through the pipeline code against another version, compared with what was recorded,
 * and kept away from the live subjects and consumers while live traffic goes on.
 */
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { expect } from "chai";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { InferenceClient } from "../../pipeline/client/client.js";
import type { SluiceConfig } from "../../pipeline/config.js";
import { STREAM_REQUESTS, REPLAY_HEADERS, replaySubjects } from "../../proto/wire.js";
import { compareResults, countSelection, filterSubjectOf, parsePace, parseTimeSpec, replay, type ReplayItem, type ReplayProgress, type ReplaySelection } from "../../pipeline/tools/replay/mod.js";
import { lineDiff, textSimilarity } from "../../pipeline/tools/text-compare.js";
import type { PipelineService } from "../../pipeline/service.js";
import { WorkerRegistration } from "../../pipeline/workers/directory.js";
import type { InferResult } from "../../operators/types.js";
import type { Engine, EngineBatch, EngineGeneration, EngineItemResult, EngineRequest } from "../../worker/engine.js";
import { WorkerServer } from "../../worker/server.js";
import { SimulatedEngine } from "../../worker/engines/simulated.js";
import { useNats, waitFor } from "../support/nats.js";
import { ROOT } from "../support/process.js";
import { startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const traceparent = (): string => `00-${randomBytes(16).toString("hex")}-${randomBytes(8).toString("hex")}-01`;

/**
 * A v2 engine: answers like the simulated engine does for `actAs` (so unchanged prompts give
 * the recorded text), except that a prompt containing "change" gets a second line.
 */
class RevisedEngine implements Engine {
  constructor(
    readonly inner: SimulatedEngine,
    private readonly actAs: string,
  ) {}
  get capacity(): number {
    return this.inner.capacity;
  }
  async infer(batch: EngineBatch, signal: AbortSignal): Promise<EngineItemResult[]> {
    const results = await this.inner.infer({ ...batch, version: this.actAs }, signal);
    return results.map((r, i) =>
      r.ok && batch.requests[i]?.prompt?.includes("change") ? { ...r, output: { text: `${r.output.text ?? ""}\nrevised by v2` } } : r,
    );
  }
  generate(request: EngineRequest, signal: AbortSignal): EngineGeneration {
    return this.inner.generate({ ...request, version: this.actAs }, signal);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

/** Runs `sluice replay` in a child process (the CLI module directly). */
function runReplayCli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const module = pathToFileURL(join(ROOT, "pipeline", "cli", "replay.ts")).href;
  const script = `const { cmdReplay } = await import(${JSON.stringify(module)}); process.exit(await cmdReplay(JSON.parse(process.env.REPLAY_ARGS)));`;
  const child = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
    cwd: ROOT,
    env: { ...process.env, REPLAY_ARGS: JSON.stringify(args) },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
  child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
  return new Promise((resolve) => child.once("close", (code) => resolve({ code, stdout, stderr })));
}

describe("replay", function () {
  this.timeout(120_000);
  const nats = useNats();
  const workers: Array<{ stop(): Promise<void> }> = [];
  const registrations: WorkerRegistration[] = [];
  let pipeline: PipelineService;
  let client: InferenceClient;
  let config: SluiceConfig;
  let v1: TestWorker;
  let v2: { engine: RevisedEngine; endpoint: string };
  /** The recorded window: tenant `rec`, requests rec-0 .. rec-29. */
  let window: ReplaySelection;
  const recorded: Array<{ id: string; prompt: string; traceparent: string; result: InferResult }> = [];
  const changed = new Set<string>();

  const register = async (workerId: string, endpoint: string, version: string): Promise<void> => {
    registrations.push(await WorkerRegistration.start(nats.nc, { workerId, endpoint, capacity: 64, serves: [{ model: "m", version }] }));
  };
  const revisedWorker = async (actAs: string): Promise<{ engine: RevisedEngine; endpoint: string }> => {
    const engine = new RevisedEngine(new SimulatedEngine({ base_ms: 0, per_item_ms: 0 }), actAs);
    const server = await WorkerServer.start({ engine });
    workers.push({
      stop: async () => {
        await server.stop();
        await engine.close();
      },
    });
    return { engine, endpoint: server.endpoint };
  };

  before(async function () {
    this.timeout(60_000);
    // Live traffic of priority `low` is not consumed: that is where the bulk window for the
    // 10,000-request replay is recorded without the live pipeline answering it.
    config = testConfig(nats.url, {
      models: { m: { versions: { v1: { weight: 100 } }, batch: { max_size: 128, max_delay_ms: 2 } } },
      pipeline: { priorities: ["high", "normal"], healthIntervalMs: 200 },
    });
    v1 = await startWorker();
    workers.push(v1);
    pipeline = await startPipeline(config);
    await register("w-v1", v1.server.endpoint, "v1");
    await waitFor("the live pool has m@v1", () => pipeline.pool.keys().includes("m@v1"), 5_000);

    client = new InferenceClient(nats.nc, "rec");
    const since = new Date();
    const results = await Promise.all(
      Array.from({ length: 30 }, async (_, i) => {
        const id = `rec-${i}`;
        const prompt = i % 4 === 0 ? `please change ${i}` : `keep ${i}`;
        if (i % 4 === 0) changed.add(id);
        const tp = traceparent();
        // Two are streamed: they take the Generate path, live and in the replay.
        const result = await client.request("m", { prompt }, { id, traceparent: tp, stream: i === 1 || i === 2 });
        return { id, prompt, traceparent: tp, result };
      }),
    );
    recorded.push(...results);
    window = { since, until: new Date(), tenants: ["rec"] };
    for (const r of recorded) expect(r.result.output?.text, r.id).to.equal(`m@v1: ${r.prompt}`);

    // v2: registered in the registry (no weight: live traffic stays on v1) and served by a
    // worker whose answers change for prompts with "change".
    v2 = await revisedWorker("v1");
    const rev = pipeline.registry.table.revision;
    await pipeline.registry.put("m", { versions: { v1: { weight: 100 }, v2: { weight: 0 } }, batch: { max_size: 128, max_delay_ms: 2 } });
    await waitFor("registry update", () => pipeline.registry.table.revision > rev, 5_000);
    await register("w-v2", v2.endpoint, "v2");
  });

  after(async () => {
    for (const r of registrations) await r.stop();
    await client?.close();
    await pipeline?.stop();
    for (const w of workers) await w.stop().catch(() => undefined);
  });

  it("replays a time window against v2 and names exactly the requests whose outputs changed", async () => {
    const session = "v2check";
    const published: Array<{ subject: string; traceparent?: string; of?: string }> = [];
    const sub = nats.nc.subscribe(replaySubjects.results(session), {
      callback: (_e, m) => {
        published.push({ subject: m.subject, traceparent: m.headers?.get("traceparent"), of: m.headers?.get(REPLAY_HEADERS.ofTraceparent) });
      },
    });
    const items: ReplayItem[] = [];
    const progress: ReplayProgress[] = [];
    const c0 = { ...v2.engine.inner.counters };
    const report = await replay(nats.nc, {
      selection: window,
      version: "v2",
      session,
      config,
      onResult: (i) => items.push(i),
      onProgress: (p) => progress.push(p),
      progressIntervalMs: 50,
    });
    await nats.nc.flush();
    sub.unsubscribe();

    expect(report.selected).to.equal(30);
    expect(report.counts).to.deep.equal({ equal: 30 - changed.size, different: changed.size, missing: 0, error: 0 });
    expect([...report.different].sort()).to.deep.equal([...changed].sort());
    // All 30 reached the v2 worker: the 2 streamed ones as generations, the rest in batches.
    expect(v2.engine.inner.counters.generations - c0.generations).to.equal(2);
    expect(v2.engine.inner.counters.items - c0.items).to.equal(28);
    expect(progress.at(-1)).to.include({ finished: true, done: 30, selected: 30 });

    const byId = new Map(recorded.map((r) => [r.id, r]));
    expect(items).to.have.length(30);
    for (const item of items) {
      const rec = byId.get(item.id)!;
      expect(item.verdict, item.id).to.equal(changed.has(item.id) ? "different" : "equal");
      expect(item.original).to.deep.include({ status: "ok", version: "v1", output: { text: `m@v1: ${rec.prompt}` } });
      expect(item.replayed.version).to.equal("v2");
      // A new trace, linked to the original one.
      expect(item.original_traceparent).to.equal(rec.traceparent);
      expect(item.traceparent.split("-")[1]).to.not.equal(rec.traceparent.split("-")[1]);
    }
    const diffItem = items.find((i) => i.id === "rec-0")!;
    expect(diffItem.diff).to.deep.equal(["--- original", "+++ replayed", "@@ -1,1 +1,2 @@", " m@v1: please change 0", "+revised by v2"]);
    expect(diffItem.similarity?.metric).to.equal("levenshtein");
    expect(diffItem.similarity?.value).to.be.greaterThan(0.5).and.lessThan(1);

    // Results went to the session's subjects only, each carrying the link to its original trace.
    expect(published).to.have.length(30);
    for (const p of published) {
      const id = p.subject.split(".").at(-1)!;
      expect(p.subject).to.equal(`infer.replay.${session}.res.rec.${id}`);
      expect(p.of).to.equal(byId.get(id)!.traceparent);
      expect(p.traceparent).to.equal(items.find((i) => i.id === id)!.traceparent);
    }
  });

  it("replays against each request's original version by default", async () => {
    // Routed with the live pipeline's table (no registry watch of its own).
    const report = await replay(nats.nc, { selection: window, config, table: pipeline.registry.table });
    expect(report.counts).to.deep.equal({ equal: 30, different: 0, missing: 0, error: 0 });
  });

  it("leaves live traffic untouched: no result on infer.res, live requests answered, live consumers unchanged", async () => {
    const liveResults = new Map<string, number>();
    let recResults = 0;
    let recChunks = 0;
    let replayChunks = 0;
    const sub = nats.nc.subscribe("infer.res.>", {
      callback: (_e, m) => {
        const [, , tenant, id] = m.subject.split(".");
        if (tenant === "rec") recResults++;
        else if (tenant === "live") liveResults.set(id!, (liveResults.get(id!) ?? 0) + 1);
      },
    });
    const tokens = nats.nc.subscribe("infer.tok.rec.>", {
      callback: () => {
        recChunks++;
      },
    });
    const session = "beside-live";
    const replayTokens = nats.nc.subscribe(replaySubjects.tokens(session, "rec", "*"), {
      callback: () => {
        replayChunks++;
      },
    });
    const jsm = await jetstreamManager(nats.nc);
    // The live consumers the pipeline pulls from: priority normal's shared consumer and its lanes.
    const liveDelivered = async (): Promise<{ delivered: number; redelivered: number }> => {
      let delivered = 0;
      let redelivered = 0;
      for await (const c of jsm.consumers.list(STREAM_REQUESTS)) {
        if (c.name !== "sluice-normal" && !c.name.startsWith("sluice-normal-lane-")) continue;
        delivered += c.delivered.consumer_seq;
        redelivered += c.num_redelivered;
      }
      return { delivered, redelivered };
    };
    const durableBefore = await liveDelivered();
    const live = new InferenceClient(nats.nc, "live");
    const answers: InferResult[] = [];
    let replaying = true;
    const traffic = (async () => {
      for (let i = 0; replaying; i++) {
        answers.push(...(await Promise.all(Array.from({ length: 5 }, (_, k) => live.request("m", { prompt: `live ${i}.${k}` }, { id: `live-${i}-${k}` })))));
        await sleep(10);
      }
    })();
    let report;
    try {
      // 30 requests at 30/s: about a second of replay alongside the live requests.
      report = await replay(nats.nc, { selection: window, version: "v2", session, pace: { kind: "rate", perSecond: 30 }, config, table: pipeline.registry.table });
    } finally {
      replaying = false;
      await traffic;
    }
    await nats.nc.flush();
    sub.unsubscribe();
    tokens.unsubscribe();
    replayTokens.unsubscribe();
    await live.close();

    expect(report.done).to.equal(30);
    // Paced: 30 requests at 30/s, the last one 29/30 s after the first (5 ms for rounding).
    expect(report.elapsedMs).to.be.at.least((29 * 1_000) / 30 - 5);
    expect(recResults, "replayed results on infer.res").to.equal(0);
    // The streamed requests' chunks went to the session's subjects, none to infer.tok.
    expect(recChunks, "replayed chunks on infer.tok").to.equal(0);
    expect(replayChunks).to.be.greaterThan(0);
    expect(report.counts.error).to.equal(0);
    expect(answers.length).to.be.greaterThan(10);
    for (const a of answers) expect(a, JSON.stringify(a)).to.deep.include({ status: "ok", version: "v1" });
    expect(liveResults.size).to.equal(answers.length);
    for (const n of liveResults.values()) expect(n).to.equal(1);
    // The live durable consumer saw only the live requests (5 per round), nothing redelivered,
    // and the replay's ordered consumers are gone.
    const durableAfter = await liveDelivered();
    expect(durableAfter.delivered - durableBefore.delivered).to.equal(answers.length);
    expect(durableAfter.redelivered).to.equal(durableBefore.redelivered);
    // Only the pipeline's durable consumers remain: the replay's ordered consumers are gone.
    const names: string[] = [];
    for await (const c of jsm.consumers.list(STREAM_REQUESTS)) names.push(c.name);
    expect(names.every((n) => n.startsWith("sluice-")), names.join(", ")).to.equal(true);
  });

  it("re-runs a naked request after the delay, a bounded number of times", async () => {
    const table = pipeline.registry.table;
    // v3 has no worker: each attempt is naked to wait for one.
    const failed: ReplayItem[] = [];
    const gaveUp = await replay(nats.nc, {
      selection: { ...window, ids: ["rec-1", "rec-2"] },
      version: "v3",
      maxReruns: 2,
      config,
      table,
      onResult: (i) => failed.push(i),
    });
    expect(gaveUp.counts.error).to.equal(2);
    expect(gaveUp.reruns).to.equal(4);
    for (const f of failed) {
      expect(f.verdict).to.equal("error");
      expect(f.reruns).to.equal(2);
      expect(f.replayed.error?.code).to.equal("UNAVAILABLE");
      expect(f.replayed.error?.message).to.match(/no healthy worker serves m@v3.*gave up after 2 re-runs/);
    }

    // A worker for v3 appears once the request has been naked: its re-run is served.
    const items: ReplayItem[] = [];
    let registering: Promise<void> | undefined;
    const report = await replay(nats.nc, {
      selection: { ...window, ids: ["rec-1"] },
      version: "v3",
      maxReruns: 20,
      config,
      table,
      onResult: (i) => items.push(i),
      progressIntervalMs: 20,
      onProgress: (p) => {
        if (p.reruns > 0) registering ??= revisedWorker("v1").then((v3) => register("w-v3", v3.endpoint, "v3"));
      },
    });
    await registering;
    expect(report.counts.equal).to.equal(1);
    expect(items[0]!.replayed).to.deep.include({ status: "ok", version: "v3" });
    expect(items[0]!.reruns).to.be.at.least(1);
  });

  it("selects by sequence range, request id and trace id; a dry run lists the selection and runs nothing", async () => {
    const listed: Array<{ id: string | undefined; seq: number }> = [];
    const all = await countSelection(nats.nc, window, (r) => listed.push(r));
    expect(all.count).to.equal(30);
    const seqs = listed.map((r) => r.seq);
    expect(seqs).to.deep.equal([...seqs].sort((a, b) => a - b));

    const range = await countSelection(nats.nc, { fromSeq: seqs[3]!, toSeq: seqs[6]!, tenants: ["rec"] });
    expect(range).to.deep.equal({ count: 4, firstSeq: seqs[3], lastSeq: seqs[6] });
    const five = recorded.find((r) => r.id === "rec-5")!;
    const byTrace: string[] = [];
    expect((await countSelection(nats.nc, { traceId: five.traceparent.split("-")[1]! }, (r) => byTrace.push(r.id!))).count).to.equal(1);
    expect(byTrace).to.deep.equal(["rec-5"]);
    expect((await countSelection(nats.nc, { ...window, ids: ["rec-7", "rec-9", "nope"] })).count).to.equal(2);

    const before = v1.engine.counters.items + v2.engine.inner.counters.items;
    const cli = await runReplayCli(["--server", nats.url, "--dry-run", "--tenant", "rec", "--since", window.since!.toISOString(), "--version", "v2"]);
    expect(cli.code, cli.stderr).to.equal(0);
    const lines = cli.stdout.trim().split("\n");
    expect(lines[0]).to.equal("id\tseq\ttime\ttenant\tmodel");
    expect(lines.at(-1)).to.equal("30 requests selected");
    const rows = lines.slice(1, -1).map((l) => l.split("\t"));
    expect(rows.map((r) => r[0]).sort()).to.deep.equal(recorded.map((r) => r.id).sort());
    for (const r of rows) expect([r[3], r[4]]).to.deep.equal(["rec", "m"]);
    expect(v1.engine.counters.items + v2.engine.inner.counters.items).to.equal(before);
  });

  it("replays a window of 10,000 requests to the end, with progress lines (CLI, --json)", async function () {
    this.timeout(120_000);
    const js = jetstream(nats.nc);
    const N = 10_000;
    for (let start = 0; start < N; start += 1_000) {
      await Promise.all(
        Array.from({ length: 1_000 }, (_, k) => {
          const h = natsHeaders();
          h.set("Content-Type", "application/json");
          return js.publish("infer.req.low.bulk.m", JSON.stringify({ prompt: `bulk ${start + k}` }), { msgID: `bulk-${start + k}`, headers: h });
        }),
      );
    }
    let onLive = 0;
    const sub = nats.nc.subscribe("infer.res.bulk.>", {
      callback: () => {
        onLive++;
      },
    });
    const cli = await runReplayCli(["--server", nats.url, "--tenant", "bulk", "--priority", "low", "--json", "--progress-every", "250ms", "--max-in-flight", "1024"]);
    sub.unsubscribe();
    expect(cli.code, cli.stderr).to.equal(0);
    const lines = cli.stdout.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines).to.have.length(N + 1);
    const summary = lines.at(-1)!["summary"] as Record<string, unknown>;
    // Nothing was recorded for them (the live pipeline does not take `low`): all missing.
    expect(summary).to.include({ selected: N, replayed: N, missing: N, equal: 0, different: 0, error: 0 });
    const ids = new Set(lines.slice(0, -1).map((l) => l["id"]));
    expect(ids.size).to.equal(N);
    const first = lines[0] as { id: string; original: unknown; replayed: { status: string; output: { text: string }; version: string }; verdict: string };
    expect(first.original).to.equal(null);
    expect(first.verdict).to.equal("missing");
    expect(first.replayed).to.deep.include({ status: "ok", version: "v1", output: { text: `m@v1: bulk ${first.id.slice(5)}` } });
    const progressLines = cli.stderr.split("\n").filter((l) => /^sluice replay: (done )?\d+\/10000 /.test(l));
    expect(progressLines.length, cli.stderr).to.be.at.least(2);
    expect(progressLines.at(-1)).to.match(/^sluice replay: done 10000\/10000 100%/);
    expect(cli.stderr).to.match(/10000 requests selected/);
    expect(onLive).to.equal(0);
  });
});

describe("replay: selection, pace and comparison helpers", () => {
  it("parses times, paces and the one server-side filter subject", () => {
    const now = Date.parse("2024-05-01T12:00:00Z");
    expect(parseTimeSpec("15m", now).toISOString()).to.equal("2024-05-01T11:45:00.000Z");
    expect(parseTimeSpec("1h30m", now).toISOString()).to.equal("2024-05-01T10:30:00.000Z");
    expect(parseTimeSpec("2024-04-30T08:00:00Z", now).toISOString()).to.equal("2024-04-30T08:00:00.000Z");
    expect(() => parseTimeSpec("yesterday", now)).to.throw(/ISO 8601/);
    expect(parsePace("max")).to.deep.equal({ kind: "max" });
    expect(parsePace("original")).to.deep.equal({ kind: "original" });
    expect(parsePace("250/s")).to.deep.equal({ kind: "rate", perSecond: 250 });
    expect(() => parsePace("0/s")).to.throw(/pace/);
    expect(filterSubjectOf({})).to.equal(undefined);
    // Without one priority no filter lies inside a stream subject: filtered client-side.
    expect(filterSubjectOf({ tenants: ["acme"], models: ["m"] })).to.equal(undefined);
    expect(filterSubjectOf({ tenants: ["acme"], models: ["m"], priorities: ["low"] })).to.equal("infer.req.low.acme.m");
    expect(filterSubjectOf({ tenants: ["a", "b"], priorities: ["high"] })).to.equal("infer.req.high.*.*");
  });

  it("judges results: equal, different (diff and similarity), missing, error", () => {
    const ok = (text: string) => ({ status: "ok" as const, output: { text } });
    expect(compareResults(ok("a"), ok("a")).verdict).to.equal("equal");
    expect(compareResults(undefined, ok("a")).verdict).to.equal("missing");
    expect(compareResults(ok("a"), { status: "error", error: { code: "UNAVAILABLE", message: "x" } }).verdict).to.equal("error");
    const err = { status: "error" as const, error: { code: "INVALID_ARGUMENT" as const, message: "bad" } };
    expect(compareResults(err, { ...err, error: { ...err.error, message: "other words" } }).verdict).to.equal("equal");
    const d = compareResults(ok("one\ntwo\nthree"), ok("one\n2\nthree"));
    expect(d.verdict).to.equal("different");
    expect(d.diff).to.deep.equal(["--- original", "+++ replayed", "@@ -1,3 +1,3 @@", " one", "-two", "+2", " three"]);
    expect(textSimilarity("kitten", "sitting")).to.deep.equal({ metric: "levenshtein", value: 0.571 });
    expect(textSimilarity("same", "same").value).to.equal(1);
    expect(lineDiff("a", "a")).to.deep.equal(["--- original", "+++ replayed"]);
  });
});
