/**
 * The `bullmq` baseline's consumer: a BullMQ Worker on Redis, as its users run IO-bound jobs:
 * one process, `concurrency` jobs at once (`--concurrency`), each job a call to the worker
 * with a batch of one; the job's return value is the result, which the load generator hears
 * as a QueueEvents `completed` event.
 *
 *   node --import tsx test/bench/bullmq-loop.ts --queue NAME --worker HOST:PORT [--concurrency N] [--model M] [--version V]
 *
 * Prints `bullmq-loop ready` once it consumes; stops on SIGTERM / SIGINT.
 */
import { parseArgs } from "node:util";
import { Worker } from "bullmq";
import { WorkerClient } from "../../pipeline/workers/mod.js";
import { loadRedisDriver, redisConnection } from "./brokers.js";
import { inferOne } from "./worker-call.js";

const DEFAULT_CONCURRENCY = 256;
const TENANT = "bench";

interface JobData {
  id: string;
  body: string;
  /** The request's model (`--model` when absent). */
  model?: string;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      queue: { type: "string" },
      worker: { type: "string" },
      concurrency: { type: "string" },
      model: { type: "string" },
      version: { type: "string" },
    },
    strict: true,
  });
  if (!values.queue || !values.worker)
    throw new Error("usage: bullmq-loop --queue NAME --worker HOST:PORT [--concurrency N] [--model M] [--version V]");
  const concurrency = Number(values.concurrency ?? DEFAULT_CONCURRENCY);
  const model = values.model ?? "bench";
  const version = values.version ?? "v1";
  const Redis = await loadRedisDriver();
  if (typeof Redis === "string") throw new Error(Redis);

  const grpc = new WorkerClient(values.worker);
  const { client, connection } = redisConnection(Redis, "bench-bullmq-worker");
  const worker = new Worker<JobData, string>(
    values.queue,
    async (job) => (await inferOne(grpc, { id: job.data.id, tenant: TENANT, model: job.data.model ?? model, version, body: job.data.body })).json,
    { connection, concurrency, autorun: false },
  );
  // Connection errors are retried by BullMQ itself; say so, do not stop.
  worker.on("error", (err) => console.error(`bullmq-loop: ${err.message}`));
  await worker.waitUntilReady();
  const running = worker.run();
  console.log(`bullmq-loop ready: consuming ${values.queue} (concurrency ${concurrency})`);

  const stopped = new Promise<void>((resolve) => {
    process.once("SIGTERM", () => resolve());
    process.once("SIGINT", () => resolve());
  });
  const outcome = await Promise.race([stopped.then(() => undefined), running.then(() => new Error("worker stopped"))]);
  await worker.close();
  await running.catch(() => undefined);
  grpc.close();
  await client.quit().catch(() => client.disconnect());
  if (outcome instanceof Error) throw outcome;
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    console.error(`bullmq-loop: ${(err as Error)?.stack ?? String(err)}`);
    process.exit(1);
  },
);
