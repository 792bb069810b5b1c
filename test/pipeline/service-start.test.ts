import { createServer } from "node:net";
import { expect } from "chai";
import { PipelineService } from "../../pipeline/service.js";
import { silentLogger } from "../../pipeline/support/logger.js";
import { TenantLimitsError } from "../../pipeline/routing/tenant-limits.js";
import { WorkerClient } from "../../pipeline/workers/mod.js";
import type { WorkerConnection } from "../../pipeline/workers/mod.js";
import { NatsServer } from "../../pipeline/dev/nats-server.js";
import { startWorker, testConfig, type TestWorker } from "../support/stack.js";
import { waitFor } from "../support/nats.js";

/** A free TCP port on loopback (for the server's monitoring endpoint). */
async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** Names of the clients connected to the server, from its monitoring endpoint. */
async function connectionNames(monitor: number): Promise<string[]> {
  const res = await fetch(`http://127.0.0.1:${monitor}/connz`);
  const body = (await res.json()) as { connections?: Array<{ name?: string }> };
  return (body.connections ?? []).map((c) => c.name ?? "");
}

describe("PipelineService.start", function () {
  this.timeout(30_000);
  let server: NatsServer;
  let monitor: number;
  let worker: TestWorker;

  before(async () => {
    monitor = await freePort();
    server = await NatsServer.start({ config: `http: 127.0.0.1:${monitor}` });
    worker = await startWorker();
  });
  after(async () => {
    await worker?.stop();
    await server?.stop();
  });

  it("stops everything it started when a later step fails: the worker connections and its own NATS connection", async () => {
    const cfg = testConfig(server.url, {
      workers: [{ model: "echo", version: "v1", endpoint: `127.0.0.1:${worker.server.port}`, capacity: 4 }],
    });
    // The tenant registry opens after the streams, the model registry, the pool and the worker
    // directory: an invalid seed fails the start there.
    cfg.tenants = { acme: { policy: "reject", rate: -1 } };
    const opened: string[] = [];
    const closed: string[] = [];
    class RecordingClient extends WorkerClient {
      constructor(endpoint: string) {
        super(endpoint);
        opened.push(endpoint);
      }
      override close(): void {
        closed.push(this.endpoint);
        super.close();
      }
    }
    const connectWorker = (endpoint: string): WorkerConnection => new RecordingClient(endpoint);

    const err = await PipelineService.start(cfg, { logger: silentLogger, connectWorker }).then(
      () => undefined,
      (e: unknown) => e,
    );

    expect(err).to.be.instanceOf(TenantLimitsError);
    expect(opened).to.have.length(1);
    expect(closed).to.deep.equal(opened);
    await waitFor("the pipeline's connection to close", async () => !(await connectionNames(monitor)).includes("sluice-pipeline"));
    // A start that succeeds afterwards on the same server is not hindered by the failed one.
    cfg.tenants = {};
    const svc = await PipelineService.start(cfg, { logger: silentLogger });
    expect(await connectionNames(monitor)).to.include("sluice-pipeline");
    await svc.stop(0);
    await waitFor("the connection to close on stop", async () => !(await connectionNames(monitor)).includes("sluice-pipeline"));
  });
});
