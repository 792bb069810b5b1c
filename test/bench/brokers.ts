/**
 * The baselines on other brokers: where their servers are, how to tell they are up, and the
 * load generator's side of each (a {@link LoadTarget}): RabbitMQ through amqplib, BullMQ on
 * Redis. The consumer side of each runs in its own process (`rabbit-loop.ts`,
 * `bullmq-loop.ts`).
 */
import { connect as netConnect } from "node:net";
import * as amqp from "amqplib";
import { Queue, QueueEvents, type ConnectionOptions } from "bullmq";
import type { LoadTarget, Priority, Route } from "./load.js";

export const REDIS_HOST = "127.0.0.1";
export const REDIS_PORT = 6379;
export const AMQP_URL = "amqp://guest:guest@127.0.0.1:5672";
/** How long a reachability check or a broker connection may take. */
export const CONNECT_TIMEOUT_MS = 2_000;

/** Undefined when a TCP connection to host:port opens within the timeout, else why not. */
export function unreachable(host: string, port: number, timeoutMs = CONNECT_TIMEOUT_MS): Promise<string | undefined> {
  return new Promise((resolve) => {
    const sock = netConnect({ host, port });
    const done = (why: string | undefined): void => {
      clearTimeout(timer);
      sock.destroy();
      resolve(why);
    };
    const timer = setTimeout(() => done(`${host}:${port} did not accept a connection within ${timeoutMs} ms`), timeoutMs);
    sock.once("connect", () => done(undefined));
    sock.once("error", (err) => done(`${host}:${port} is not reachable (${err.message})`));
  });
}

const BATCH_SIZE_RE = /"batch_size":(\d+)/;
const STATUS_OK_RE = /"status":"ok"/;

// ---------------------------------------------------------------------------------------------
// RabbitMQ

/** The durable request queue of one run, and the name the consumer process is given. */
export function rabbitRequestQueue(runId: string): string {
  return `sluice-bench.req.${runId}`;
}

/** Arguments of the request queue, the same wherever it is declared. */
export const RABBIT_QUEUE_OPTIONS: amqp.Options.AssertQueue = { durable: true, arguments: { "x-queue-type": "classic" } };
/**
 * A scenario that mixes priorities gets a priority queue (what RabbitMQ offers for that:
 * `x-max-priority`, messages with a `priority`); the others a plain queue, as priority queues
 * cost something and an expert would not ask for one without a use for it.
 */
export function rabbitQueueOptions(priorities: boolean): amqp.Options.AssertQueue {
  return priorities ? { ...RABBIT_QUEUE_OPTIONS, arguments: { ...RABBIT_QUEUE_OPTIONS.arguments, "x-max-priority": 3 } } : RABBIT_QUEUE_OPTIONS;
}
/** Message priority in a RabbitMQ priority queue: higher is served first. */
export const RABBIT_PRIORITY: Record<Priority, number> = { high: 3, normal: 2, low: 1 };
/** BullMQ job priority: 1 is served first (jobs without one are plain FIFO). */
export const BULL_PRIORITY: Record<Priority, number> = { high: 1, normal: 2, low: 3 };

/**
 * Requests as an amqplib user sends them for RPC: a confirm channel (a send resolves once the
 * broker has the message, persistent, in the durable queue), `replyTo` an exclusive,
 * server-named reply queue, `correlationId` the request id.
 */
export class RabbitLoadTarget implements LoadTarget {
  private onResult: ((id: string, ok: boolean, batchSize?: number) => void) | undefined;

  private constructor(
    private readonly conn: amqp.ChannelModel,
    private readonly ch: amqp.ConfirmChannel,
    private readonly queue: string,
    private readonly replyQueue: string,
  ) {}

  static async connect(queue: string, priorities = false): Promise<RabbitLoadTarget> {
    const conn = await amqp.connect(AMQP_URL, { noDelay: true, timeout: CONNECT_TIMEOUT_MS });
    try {
      conn.on("error", () => undefined);
      const ch = await conn.createConfirmChannel();
      ch.on("error", () => undefined);
      await ch.assertQueue(queue, rabbitQueueOptions(priorities));
      const reply = await ch.assertQueue("", { exclusive: true, autoDelete: true, durable: false });
      const target = new RabbitLoadTarget(conn, ch, queue, reply.queue);
      await ch.consume(
        reply.queue,
        (msg) => {
          if (!msg) return;
          const id = msg.properties.correlationId as string | undefined;
          if (id === undefined) return;
          const text = msg.content.toString();
          const m = BATCH_SIZE_RE.exec(text);
          target.onResult?.(id, STATUS_OK_RE.test(text), m ? Number(m[1]) : undefined);
        },
        { noAck: true },
      );
      return target;
    } catch (err) {
      await conn.close().catch(() => undefined);
      throw err;
    }
  }

  send(id: string, body: Uint8Array, route: Route): Promise<void> {
    return new Promise((resolve, reject) => {
      this.ch.publish(
        "",
        this.queue,
        Buffer.from(body.buffer, body.byteOffset, body.byteLength),
        {
          persistent: true,
          messageId: id,
          correlationId: id,
          replyTo: this.replyQueue,
          contentType: "application/json",
          headers: { model: route.model },
          ...(route.priority !== undefined ? { priority: RABBIT_PRIORITY[route.priority] } : {}),
        },
        (err) => (err ? reject(err instanceof Error ? err : new Error(String(err))) : resolve()),
      );
    });
  }

  async listen(onResult: (id: string, ok: boolean, batchSize?: number) => void): Promise<void> {
    this.onResult = onResult;
  }

  unlisten(): void {
    this.onResult = undefined;
  }

  async close(): Promise<void> {
    this.unlisten();
    // The run's queue goes with the run, so runs share no state.
    await this.ch.deleteQueue(this.queue).catch(() => undefined);
    await this.conn.close().catch(() => undefined);
  }
}

// ---------------------------------------------------------------------------------------------
// BullMQ

/** The BullMQ queue of one run. */
export function bullQueueName(runId: string): string {
  return `sluice-bench-${runId}`;
}

/**
 * Events the queue's event stream keeps (BullMQ's `streams.events.maxLen`, default 10,000).
 * A job writes several events (added, waiting, active, completed, ...); a `completed` event
 * trimmed before QueueEvents read it would be a lost result.
 */
export const BULL_EVENTS_MAX_LEN = 100_000;
/** Jobs added and not yet completed, at most: well within what the event stream keeps. */
export const BULL_MAX_OUTSTANDING = 5_000;

interface RedisClient {
  quit(): Promise<unknown>;
  disconnect(): void;
}
type RedisCtor = new (opts: Record<string, unknown>) => RedisClient;

/**
 * BullMQ 6 leaves the Redis driver to the application (`ioredis`, an optional peer
 * dependency). Loaded at run time so the benchmark still runs, and says why it skips BullMQ,
 * where it is not installed.
 */
export async function loadRedisDriver(): Promise<RedisCtor | string> {
  const name = "ioredis";
  try {
    const mod = (await import(name)) as { default?: RedisCtor };
    if (typeof mod.default === "function") return mod.default;
    return "the 'ioredis' module has no default export";
  } catch {
    return "BullMQ needs a Redis driver and 'ioredis' (its optional peer dependency) is not installed: npm install -D ioredis";
  }
}

/** A Redis connection as BullMQ asks for it: no per-command retry limit, as Worker and QueueEvents require. */
export function redisConnection(Redis: RedisCtor, name: string): { client: RedisClient; connection: ConnectionOptions } {
  const client = new Redis({
    host: REDIS_HOST,
    port: REDIS_PORT,
    connectionName: name,
    maxRetriesPerRequest: null,
    connectTimeout: CONNECT_TIMEOUT_MS,
  });
  return { client, connection: client };
}

/**
 * Jobs as a BullMQ user adds them: `queue.add()` with the request id as job id, results from
 * QueueEvents `completed` / `failed`. Sends wait while {@link BULL_MAX_OUTSTANDING} jobs are
 * outstanding, so the event stream never has to hold more than it keeps.
 */
export class BullLoadTarget implements LoadTarget {
  private onResult: ((id: string, ok: boolean, batchSize?: number) => void) | undefined;
  private outstanding = new Set<string>();
  private waiters: Array<() => void> = [];

  private constructor(
    private readonly queue: Queue,
    private readonly events: QueueEvents,
    private readonly clients: RedisClient[],
  ) {
    events.on("completed", ({ jobId, returnvalue }) => {
      const text = typeof returnvalue === "string" ? returnvalue : JSON.stringify(returnvalue);
      const m = BATCH_SIZE_RE.exec(text);
      this.settle(jobId);
      this.onResult?.(jobId, STATUS_OK_RE.test(text), m ? Number(m[1]) : undefined);
    });
    events.on("failed", ({ jobId }) => {
      this.settle(jobId);
      this.onResult?.(jobId, false);
    });
    events.on("error", () => undefined);
  }

  private settle(id: string): void {
    if (!this.outstanding.delete(id)) return;
    while (this.waiters.length > 0 && this.outstanding.size < BULL_MAX_OUTSTANDING) this.waiters.shift()!();
  }

  static async connect(Redis: RedisCtor, name: string): Promise<BullLoadTarget> {
    const q = redisConnection(Redis, "bench-load-queue");
    const e = redisConnection(Redis, "bench-load-events");
    const clients = [q.client, e.client];
    try {
      const queue = new Queue(name, {
        connection: q.connection,
        streams: { events: { maxLen: BULL_EVENTS_MAX_LEN } },
        defaultJobOptions: { removeOnComplete: true, removeOnFail: true, attempts: 1 },
      });
      queue.on("error", () => undefined);
      const events = new QueueEvents(name, { connection: e.connection });
      const target = new BullLoadTarget(queue, events, clients);
      await queue.waitUntilReady();
      await events.waitUntilReady();
      return target;
    } catch (err) {
      for (const c of clients) c.disconnect();
      throw err;
    }
  }

  async send(id: string, body: Uint8Array, route: Route): Promise<void> {
    while (this.outstanding.size >= BULL_MAX_OUTSTANDING) await new Promise<void>((r) => this.waiters.push(r));
    this.outstanding.add(id);
    try {
      await this.queue.add(
        "infer",
        { id, body: Buffer.from(body).toString("utf8"), model: route.model },
        { jobId: id, ...(route.priority !== undefined ? { priority: BULL_PRIORITY[route.priority] } : {}) },
      );
    } catch (err) {
      this.settle(id);
      throw err;
    }
  }

  async listen(onResult: (id: string, ok: boolean, batchSize?: number) => void): Promise<void> {
    this.onResult = onResult;
  }

  unlisten(): void {
    this.onResult = undefined;
    // Whatever a phase gave up on no longer holds the window of the next.
    this.outstanding.clear();
    for (const w of this.waiters.splice(0)) w();
  }

  async close(): Promise<void> {
    this.unlisten();
    await this.events.close().catch(() => undefined);
    // The run's keys go with the run, so runs share no state.
    await this.queue.obliterate({ force: true }).catch(() => undefined);
    await this.queue.close().catch(() => undefined);
    for (const c of this.clients) await c.quit().catch(() => c.disconnect());
  }
}
