/**
 * The published package, as a user gets it: `npm pack` builds the JavaScript and the types, the
 * tarball is installed into an empty project, and plain `node` (no TypeScript loader) imports
 * `sluice` by name and gets answers from a running stack. A module hook records every module
 * the import loads: the client must not load gRPC, the tracing SDK or its exporters.
 */
import { execFile, spawnSync } from "node:child_process";
import { promisify } from "node:util";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { expect } from "chai";
import type { PipelineService } from "../../pipeline/service.js";
import { useNats } from "../support/nats.js";
import { ROOT } from "../support/process.js";
import { models, startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

/** Records the URL of every module resolved after it is registered (`--import` it). */
const HOOKS = `
import { appendFileSync } from "node:fs";
export async function resolve(specifier, context, next) {
  const r = await next(specifier, context);
  appendFileSync(process.env.SLUICE_LOADED_FILE, r.url + "\\n");
  return r;
}
`;
const REGISTER = `import { register } from "node:module";\nregister("./hooks.mjs", import.meta.url);\n`;

/** What the README shows, with the server from the environment. */
const CLIENT = `
import { InferenceClient, InferenceError } from "sluice";

const client = await InferenceClient.connect({ servers: process.env.NATS_URL, tenant: "acme" });
const result = await client.infer("echo", { prompt: "hello from the package" });
let code;
try {
  await client.infer("no-such-model", { prompt: "x" });
} catch (err) {
  code = err instanceof InferenceError ? err.code : String(err);
}
await client.close();
console.log(JSON.stringify({ status: result.status, text: result.output?.text, code }));
`;

const WORKER = `
import { SimulatedEngine, WorkerServer } from "sluice/worker";

const engine = new SimulatedEngine({ base_ms: 0, per_item_ms: 0 });
const server = await WorkerServer.start({ engine });
console.log(JSON.stringify({ port: server.port }));
await server.stop();
await engine.close();
`;

/** Runs a command to completion (only before the stack starts: it blocks this process). */
function run(cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = {}): string {
  const r = spawnSync(cmd, args, { cwd, env: { ...process.env, ...env }, encoding: "utf8", maxBuffer: 64 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} exited ${r.status}:\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

describe("the npm package", function () {
  this.timeout(600_000);
  const nats = useNats();
  let dir: string;
  let app: string;
  let worker: TestWorker;
  let pipeline: PipelineService;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "sluice-pack-"));
    run("npm", ["pack", "--silent", "--pack-destination", dir], ROOT);
    const tarball = readdirSync(dir).find((f) => f.endsWith(".tgz"));
    if (!tarball) throw new Error("npm pack wrote no tarball");
    app = join(dir, "app");
    run("mkdir", ["-p", app], dir);
    writeFileSync(join(app, "package.json"), JSON.stringify({ name: "app", private: true, type: "module" }));
    run("npm", ["install", "--prefer-offline", "--omit=dev", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error", join(dir, tarball)], app);
    writeFileSync(join(app, "hooks.mjs"), HOOKS);
    writeFileSync(join(app, "register.mjs"), REGISTER);
    writeFileSync(join(app, "client.mjs"), CLIENT);
    writeFileSync(join(app, "worker.mjs"), WORKER);

    worker = await startWorker();
    pipeline = await startPipeline(
      testConfig(nats.url, { models: models(["echo"]), workers: [{ model: "echo", version: "v1", endpoint: worker.server.endpoint }] }),
    );
  });

  after(async () => {
    await pipeline?.stop();
    await worker?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /**
   * Runs `file` with plain node in the project (without blocking this process, which runs the
   * pipeline); its last line of output and the modules it loaded.
   */
  async function node(file: string): Promise<{ out: unknown; loaded: string[] }> {
    const loadedFile = join(app, `${file}.loaded`);
    const { stdout } = await promisify(execFile)(process.execPath, ["--import", "./register.mjs", file], {
      cwd: app,
      env: { ...process.env, NATS_URL: nats.url, SLUICE_LOADED_FILE: loadedFile },
    });
    const loaded = existsSync(loadedFile) ? readFileSync(loadedFile, "utf8").split("\n").filter(Boolean) : [];
    return { out: JSON.parse(stdout.trim().split("\n").pop()!), loaded };
  }

  it("ships the compiled JavaScript and its types, and no TypeScript sources", () => {
    const pkg = join(app, "node_modules", "sluice");
    expect(existsSync(join(pkg, "dist", "pipeline", "client", "mod.js"))).to.equal(true);
    expect(existsSync(join(pkg, "dist", "pipeline", "client", "mod.d.ts"))).to.equal(true);
    expect(existsSync(join(pkg, "dist", "worker", "mod.d.ts"))).to.equal(true);
    expect(existsSync(join(pkg, "dist", "proto", "gen", "inference.d.ts"))).to.equal(true);
    expect(existsSync(join(pkg, "pipeline"))).to.equal(false);
    expect(existsSync(join(pkg, "test"))).to.equal(false);
  });

  it("import { InferenceClient, InferenceError } from \"sluice\": an answer, and NOT_FOUND for an unknown model, loading no gRPC or tracing SDK", async () => {
    const { out, loaded } = await node("client.mjs");
    expect(out).to.deep.equal({ status: "ok", text: "hello from the package", code: "NOT_FOUND" });
    const sluice = loaded.filter((u) => u.includes("/node_modules/sluice/"));
    expect(sluice.some((u) => u.endsWith("/dist/pipeline/client/mod.js"))).to.equal(true);
    expect(loaded.some((u) => u.includes("/@nats-io/transport-node/"))).to.equal(true);
    for (const heavy of ["/@grpc/grpc-js/", "/@opentelemetry/sdk-trace", "/@opentelemetry/exporter-", "/prom-client/", "/protobufjs/", "/rxjs/"]) {
      expect(loaded.filter((u) => u.includes(heavy)), heavy).to.deep.equal([]);
    }
    for (const own of ["/dist/pipeline/telemetry/", "/dist/pipeline/service.js", "/dist/pipeline/workers/", "/dist/worker/"]) {
      expect(sluice.filter((u) => u.includes(own)), own).to.deep.equal([]);
    }
  });

  it("import { WorkerServer, SimulatedEngine } from \"sluice/worker\": a worker serves, without the pipeline", async () => {
    const { out, loaded } = await node("worker.mjs");
    expect((out as { port: number }).port).to.be.above(0);
    expect(loaded.some((u) => u.includes("/@grpc/grpc-js/"))).to.equal(true);
    expect(loaded.filter((u) => u.includes("/dist/pipeline/"))).to.deep.equal([]);
    expect(loaded.filter((u) => u.includes("/@nats-io/"))).to.deep.equal([]);
  });
});
