/**
 * Fault-injection harness: a 3-node nats-server cluster on loopback, a steady load generator
 * that publishes requests (retrying a failed publish with the same id) and counts every result
 * a client sees, and the one-line report each fault case prints:
 *
 *   fault=<name> sent=N answered=N duplicated=N lost=N
 *
 * sent: requests the queue acknowledged. answered: of those, how many have a result (seen on the
 * results subject, or stored in INFER_RES for a client that looks later). duplicated: results a
 * subscriber received beyond the first for the same id. lost: sent - answered. The detail line
 * also says how many answers were found stored only (storedOnly: never received live).
 */
import { createServer } from "node:net";
import { setTimeout as delay } from "node:timers/promises";
import { connect, headers as natsHeaders, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { getStoredResult } from "../../pipeline/settle/stored-result.js";
import { NatsServer } from "../../pipeline/dev/nats-server.js";
import type { PipelineService } from "../../pipeline/service.js";
import type { NatsFixture } from "../support/nats.js";
import { models, startPipeline, startWorker, testConfig, type TestWorker } from "../support/stack.js";

const enc = new TextEncoder();
const dec = new TextDecoder();

/** A free TCP port on loopback (for the cluster's route listeners, which the harness must name up front). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/** Three JetStream nodes in one cluster, each a NatsServer child on loopback. */
export class TestCluster {
  private constructor(readonly nodes: NatsServer[]) {}

  get urls(): string[] {
    return this.nodes.map((n) => n.url);
  }

  static async start(size = 3, name = "sluice-faults"): Promise<TestCluster> {
    const routePorts = await Promise.all(Array.from({ length: size }, () => freePort()));
    const clientPorts = await Promise.all(Array.from({ length: size }, () => freePort()));
    const routes = routePorts.map((p) => `nats-route://127.0.0.1:${p}`).join(", ");
    const nodes = await Promise.all(
      routePorts.map((rp, i) =>
        NatsServer.start({
          port: clientPorts[i]!,
          config: [`server_name: n${i + 1}`, `cluster { name: ${name}, listen: 127.0.0.1:${rp}, routes: [${routes}] }`].join("\n"),
        }),
      ),
    );
    const cluster = new TestCluster(nodes);
    try {
      await cluster.waitForJetStream();
    } catch (err) {
      await cluster.stop();
      throw err;
    }
    return cluster;
  }

  /** Resolves once the JetStream meta group has a leader (API calls answer) on every node. */
  async waitForJetStream(timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (const url of this.urls) {
      const nc = await connect({ servers: url, name: "faults-probe" });
      try {
        for (;;) {
          try {
            const jsm = await jetstreamManager(nc, { timeout: 2_000 });
            await jsm.getAccountInfo();
            break;
          } catch (err) {
            if (Date.now() > deadline) throw new Error(`JetStream not ready on ${url} within ${timeoutMs} ms: ${String(err)}`);
            await delay(200);
          }
        }
      } finally {
        await nc.close();
      }
    }
  }

  async stop(): Promise<void> {
    await Promise.all(this.nodes.map((n) => n.stop()));
  }
}

export interface LoadOptions {
  /** NATS servers of the publisher and the result subscriber. */
  servers: string[];
  tenant: string;
  model: string;
  /** Requests to send. */
  count: number;
  /** Requests per second. */
  rate: number;
  /** How long one publish may keep being retried before the request counts as not sent. */
  publishRetryMs?: number;
}

export interface LoadReport {
  sent: number;
  answered: number;
  duplicated: number;
  lost: number;
  /** Results per status code ("ok" or the error code). */
  byStatus: Record<string, number>;
  /** Ids never answered (first few). */
  missing: string[];
  /** Requests for which a subscriber received results with different statuses. */
  conflicting: number;
  /** Answered requests whose result the subscriber never received live (found stored only). */
  storedOnly: number;
  publishRetries: number;
}

/**
 * Publishes `count` requests at `rate` per second on its own connection and counts the results
 * on another. A publish that fails (the server is gone, the stream has no leader for a moment)
 * is retried with the same request id, which JetStream de-duplicates: one request, once.
 */
export class SteadyLoad {
  readonly ids: string[] = [];
  private readonly acked = new Set<string>();
  private readonly seen = new Map<string, number>();
  private readonly status = new Map<string, string>();
  /** Ids whose results, as the subscriber saw them, did not all have the same status. */
  private readonly conflicting = new Set<string>();
  publishRetries = 0;
  private running: Promise<void> | undefined;

  private sub: Subscription | undefined;

  private constructor(
    readonly opts: LoadOptions,
    private readonly pubNc: NatsConnection,
    private readonly subNc: NatsConnection,
  ) {}

  static async open(opts: LoadOptions): Promise<SteadyLoad> {
    const common = { maxReconnectAttempts: -1, reconnectTimeWait: 100, noRandomize: true } as const;
    const pubNc = await connect({ servers: opts.servers, name: "faults-publisher", ...common });
    const subNc = await connect({ servers: opts.servers, name: "faults-results", ...common });
    const load = new SteadyLoad(opts, pubNc, subNc);
    const prefix = `infer.res.${opts.tenant}.`;
    load.sub = subNc.subscribe(`${prefix}>`, {
      callback: (err, m) => {
        if (err) return;
        const id = m.subject.slice(prefix.length);
        load.seen.set(id, (load.seen.get(id) ?? 0) + 1);
        const st = statusOf(m.data);
        const first = load.status.get(id);
        if (first === undefined) load.status.set(id, st);
        else if (first !== st) load.conflicting.add(id);
      },
    });
    await subNc.flush();
    return load;
  }

  /** Starts publishing; resolves when every request was published (or given up on). */
  start(): Promise<void> {
    this.running ??= this.publishAll();
    return this.running;
  }

  /** How many distinct requests have been answered so far (as seen by the subscriber). */
  get answeredSeen(): number {
    let n = 0;
    for (const id of this.acked) if (this.seen.has(id)) n++;
    return n;
  }

  get sentSoFar(): number {
    return this.acked.size;
  }

  private async publishAll(): Promise<void> {
    const { count, rate, tenant, model } = this.opts;
    const js = jetstream(this.pubNc);
    const started = Date.now();
    const inflight = new Set<Promise<void>>();
    for (let i = 0; i < count; i++) {
      const due = started + (i * 1000) / rate;
      const wait = due - Date.now();
      if (wait > 0) await delay(wait);
      const id = `${tenant}-${i}`;
      this.ids.push(id);
      const p = this.publishOne(js, `infer.req.normal.${tenant}.${model}`, id).finally(() => inflight.delete(p));
      inflight.add(p);
      if (inflight.size >= 256) await Promise.race(inflight);
    }
    await Promise.all(inflight);
  }

  private async publishOne(js: ReturnType<typeof jetstream>, subject: string, id: string): Promise<void> {
    const deadline = Date.now() + (this.opts.publishRetryMs ?? 30_000);
    const body = enc.encode(JSON.stringify({ prompt: id }));
    for (let attempt = 0; ; attempt++) {
      const h = natsHeaders();
      h.set("Content-Type", "application/json");
      try {
        await js.publish(subject, body, { msgID: id, headers: h, timeout: 2_000 });
        this.acked.add(id);
        return;
      } catch {
        if (Date.now() > deadline) return;
        this.publishRetries++;
        await delay(Math.min(1_000, 50 * 2 ** attempt));
      }
    }
  }

  /**
   * Waits (bounded) until every acknowledged request has a result on the subscription, then
   * looks up the stored result of any the subscriber missed (its connection may have been on a
   * node that died), and reports.
   */
  async finish(timeoutMs: number, settleMs = 500): Promise<LoadReport> {
    await this.start();
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline && this.answeredSeen < this.acked.size) await delay(100);
    // Let a late duplicate arrive before counting.
    await delay(settleMs);
    const missing: string[] = [];
    let answered = 0;
    let storedOnly = 0;
    const jsm = await jetstreamManager(this.pubNc);
    for (const id of this.acked) {
      if (this.seen.has(id)) {
        answered++;
        continue;
      }
      const stored = await getStoredResult(jsm, this.opts.tenant, id).catch(() => null);
      if (stored) {
        answered++;
        storedOnly++;
        this.status.set(id, statusOf(stored.data));
      } else missing.push(id);
    }
    let duplicated = 0;
    for (const n of this.seen.values()) duplicated += Math.max(0, n - 1);
    const byStatus: Record<string, number> = {};
    for (const id of this.acked) {
      const s = this.status.get(id);
      if (s) byStatus[s] = (byStatus[s] ?? 0) + 1;
    }
    return {
      sent: this.acked.size,
      answered,
      duplicated,
      lost: this.acked.size - answered,
      byStatus,
      missing: missing.slice(0, 10),
      conflicting: this.conflicting.size,
      storedOnly,
      publishRetries: this.publishRetries,
    };
  }

  async close(): Promise<void> {
    this.sub?.unsubscribe();
    await this.pubNc.close().catch(() => undefined);
    await this.subNc.close().catch(() => undefined);
  }
}

function statusOf(data: Uint8Array): string {
  try {
    const r = JSON.parse(dec.decode(data)) as { status?: string; error?: { code?: string } };
    return r.status === "ok" ? "ok" : (r.error?.code ?? "error");
  } catch {
    return "unreadable";
  }
}

/** Prints the report line every fault case ends with and returns it. */
export function reportLine(fault: string, r: LoadReport): string {
  const line = `fault=${fault} sent=${r.sent} answered=${r.answered} duplicated=${r.duplicated} lost=${r.lost}`;
  console.log(line);
  console.log(
    `  detail: byStatus=${JSON.stringify(r.byStatus)} (first result seen per request) conflicting=${r.conflicting} storedOnly=${r.storedOnly} publishRetries=${r.publishRetries}${r.missing.length ? ` missing=${r.missing.join(",")}` : ""}`,
  );
  return line;
}

/** Resolves once `f()` is true, or after `timeoutMs` (then with false). */
export async function until(f: () => boolean, timeoutMs: number, everyMs = 25): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!f()) {
    if (Date.now() > deadline) return false;
    await delay(everyMs);
  }
  return true;
}

/** The stack of a fault suite: an in-process pipeline and a simulated worker, and the suite's load. */
export interface FaultStack {
  readonly pipeline: PipelineService;
  /** The test's load, closed after the suite when set. */
  load: SteadyLoad | undefined;
}

/**
 * Registers before/after hooks in the calling `describe`: a quick simulated worker and a
 * pipeline serving model `echo` before the suite; the load, the pipeline and the worker closed
 * after it.
 */
export function useFaultStack(nats: NatsFixture): FaultStack {
  let worker: TestWorker | undefined;
  let pipeline: PipelineService | undefined;
  const stack: FaultStack = {
    get pipeline(): PipelineService {
      if (!pipeline) throw new Error("the fault stack is not started yet");
      return pipeline;
    },
    load: undefined,
  };
  before(async () => {
    worker = await startWorker({ base_ms: 2, per_item_ms: 0.05 });
    pipeline = await startPipeline(
      testConfig(nats.url, {
        models: models(["echo"]),
        workers: [{ model: "echo", version: "v1", endpoint: worker.server.endpoint }],
        consumer: { ackWaitMs: 3_000 },
      }),
    );
  });
  after(async () => {
    await stack.load?.close();
    await pipeline?.stop(2_000);
    await worker?.stop();
  });
  return stack;
}
