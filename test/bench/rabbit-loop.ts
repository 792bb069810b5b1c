/**
 * The `rabbitmq` baseline's consumer: amqplib on RabbitMQ, as its users tune it for RPC work.
 * It consumes the run's durable request queue with manual acks and a prefetch of `--prefetch`
 * (the broker keeps that many unacked deliveries in flight to it), sends each request to the
 * worker as a batch of one, publishes the result to the request's `replyTo` queue with its
 * `correlationId`, then acks. Nagle is off on the socket (`noDelay`).
 *
 *   node --import tsx test/bench/rabbit-loop.ts --queue NAME --worker HOST:PORT [--prefetch N] [--model M] [--version V] [--priorities]
 *
 * The model of a message is its `model` header (`--model` when it has none); `--priorities`
 * declares the queue as a priority queue (a scenario that mixes priorities).
 *
 * Prints `rabbit-loop ready` once it consumes; stops on SIGTERM / SIGINT.
 */
import { parseArgs } from "node:util";
import * as amqp from "amqplib";
import { WorkerClient } from "../../pipeline/workers/mod.js";
import { AMQP_URL, CONNECT_TIMEOUT_MS, rabbitQueueOptions } from "./brokers.js";
import { inferOne } from "./worker-call.js";

const DEFAULT_PREFETCH = 256;
const TENANT = "bench";

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      queue: { type: "string" },
      worker: { type: "string" },
      prefetch: { type: "string" },
      model: { type: "string" },
      priorities: { type: "boolean" },
      version: { type: "string" },
    },
    strict: true,
  });
  if (!values.queue || !values.worker)
    throw new Error("usage: rabbit-loop --queue NAME --worker HOST:PORT [--prefetch N] [--model M] [--version V]");
  const prefetch = Number(values.prefetch ?? DEFAULT_PREFETCH);
  const model = values.model ?? "bench";
  const version = values.version ?? "v1";

  const conn = await amqp.connect(AMQP_URL, { noDelay: true, timeout: CONNECT_TIMEOUT_MS });
  const failed = new Promise<Error>((resolve) => {
    conn.once("error", (err: Error) => resolve(err));
    conn.once("close", () => resolve(new Error("connection closed")));
  });
  const ch = await conn.createChannel();
  await ch.assertQueue(values.queue, rabbitQueueOptions(values.priorities === true));
  await ch.prefetch(prefetch);
  const worker = new WorkerClient(values.worker);

  const inflight = new Set<Promise<void>>();
  const handle = async (msg: amqp.ConsumeMessage): Promise<void> => {
    const id = (msg.properties.correlationId as string | undefined) ?? String(msg.fields.deliveryTag);
    const headers = msg.properties.headers;
    const m = typeof headers?.["model"] === "string" ? headers["model"] : model;
    const result = await inferOne(worker, { id, tenant: TENANT, model: m, version, body: msg.content });
    const replyTo = msg.properties.replyTo as string | undefined;
    if (replyTo) ch.publish("", replyTo, Buffer.from(result.json), { correlationId: id, contentType: "application/json" });
    ch.ack(msg);
  };
  const { consumerTag } = await ch.consume(
    values.queue,
    (msg) => {
      if (!msg) return;
      const p: Promise<void> = handle(msg)
        .catch((err: unknown) => console.error(`rabbit-loop: ${(err as Error).message}`))
        .finally(() => inflight.delete(p));
      inflight.add(p);
    },
    { noAck: false },
  );
  console.log(`rabbit-loop ready: consuming ${values.queue} (prefetch ${prefetch})`);

  const stopped = new Promise<void>((resolve) => {
    process.once("SIGTERM", () => resolve());
    process.once("SIGINT", () => resolve());
  });
  const outcome = await Promise.race([stopped.then(() => undefined), failed]);
  if (outcome instanceof Error) throw outcome;
  await ch.cancel(consumerTag).catch(() => undefined);
  await Promise.all(inflight);
  worker.close();
  await conn.close().catch(() => undefined);
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    console.error(`rabbit-loop: ${(err as Error)?.stack ?? String(err)}`);
    process.exit(1);
  },
);
