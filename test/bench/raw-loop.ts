/**
 * The JetStream baselines: what a hand-written consumer loop does, with no pipeline logic (no
 * batching, no routing, no retries, no redelivery checks, no tracing). It pulls from a durable
 * consumer on INFER_REQ, sends each message to the worker as a batch of one, publishes the
 * result on `infer.res.<tenant>.<id>` (JetStream, `Nats-Msg-Id` = id) and acks.
 *
 * - `--mode consume` (`jetstream-raw`): `consume()`, up to `--window` messages worked on at once,
 *   the same bound as the pipeline's default in-flight limit, so the comparison is about what
 *   the pipeline adds, not about concurrency.
 * - `--mode next` (`naive-loop`): the usual first design, one message at a time:
 *   `next()`, call the worker, publish the result, ack, then the next one.
 * - `--mode echo` (`broker-echo`): `consume()` as above but no worker at all: the result is
 *   published at once. The broker path's own ceiling (pull, publish with `Nats-Msg-Id`, ack).
 *
 *   node --import tsx test/bench/raw-loop.ts --server URL [--worker HOST:PORT] [--mode consume|next|echo] [--window N] [--version V]
 *
 * Prints `raw-loop ready` once it consumes; stops on SIGTERM / SIGINT.
 */
import { parseArgs } from "node:util";
import { connect, headers as natsHeaders } from "@nats-io/transport-node";
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager, type JsMsg } from "@nats-io/jetstream";
import { nanos } from "@nats-io/transport-node";
import { defaultConfig } from "../../pipeline/config.js";
import { ensureStreams } from "../../pipeline/intake/jetstream.js";
import { STREAM_REQUESTS } from "../../proto/wire.js";
import { WorkerClient } from "../../pipeline/workers/mod.js";
import { inferOne } from "./worker-call.js";

const RAW_DURABLE = "raw-loop";
/** Every priority, in stream order: a hand-written loop has no priorities of its own. */
const RAW_FILTER = "infer.req.*.*.*";
const DEFAULT_RAW_WINDOW = 256;
const ACK_WAIT_MS = 30_000;
/** How long one `next()` waits for a message before asking again (and noticing a stop). */
const NEXT_EXPIRES_MS = 1_000;

const encoder = new TextEncoder();

/** The result the echo loop answers with: the shape of a pipeline result, nothing computed. */
function echoResult(id: string, model: string, version: string): string {
  return JSON.stringify({ id, status: "ok", model, version, output: { text: "" }, timing: { queue_ms: 0, batch_size: 1, worker_ms: 0, total_ms: 0 } });
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      server: { type: "string" },
      worker: { type: "string" },
      mode: { type: "string" },
      window: { type: "string" },
      version: { type: "string" },
    },
    strict: true,
  });
  const usage = "usage: raw-loop --server URL [--worker HOST:PORT] [--mode consume|next|echo] [--window N] [--version V]";
  const mode = values.mode ?? "consume";
  if (mode !== "consume" && mode !== "next" && mode !== "echo") throw new Error(usage);
  if (!values.server || (mode !== "echo" && !values.worker)) throw new Error(usage);
  const window = mode === "next" ? 1 : Number(values.window ?? DEFAULT_RAW_WINDOW);
  const version = values.version ?? "v1";

  // noAsyncTraces: the same connection option as every sluice process (a JetStream request
  // otherwise builds two Error objects with stack traces up front), so the loops differ only in
  // what they do with a message.
  const nc = await connect({ servers: values.server, name: `bench-raw-loop-${mode}`, noAsyncTraces: true });
  const jsm = await jetstreamManager(nc);
  await ensureStreams(jsm, defaultConfig().streams);
  await jsm.consumers.add(STREAM_REQUESTS, {
    durable_name: RAW_DURABLE,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    filter_subject: RAW_FILTER,
    ack_wait: nanos(ACK_WAIT_MS),
    max_ack_pending: 4 * window,
  });
  const js = jetstream(nc);
  const worker = values.worker ? new WorkerClient(values.worker) : undefined;
  const consumer = await js.consumers.get(STREAM_REQUESTS, RAW_DURABLE);

  const handle = async (m: JsMsg): Promise<void> => {
    // infer.req.<priority>.<tenant>.<model>
    const [, , , tenant = "", model = ""] = m.subject.split(".");
    const id = m.headers?.get("Nats-Msg-Id") ?? String(m.seq);
    const result = worker ? await inferOne(worker, { id, tenant, model, version, body: m.data }) : { ok: true, json: echoResult(id, model, version) };
    const h = natsHeaders();
    h.set("Infer-Status", result.ok ? "ok" : "INTERNAL");
    h.set("Content-Type", "application/json");
    try {
      await js.publish(`infer.res.${tenant}.${id}`, encoder.encode(result.json), { msgID: id, headers: h });
      m.ack();
    } catch {
      m.nak();
    }
  };

  let stopping = false;
  if (mode === "next") {
    process.once("SIGTERM", () => (stopping = true));
    process.once("SIGINT", () => (stopping = true));
    console.log(`raw-loop ready: next() on ${RAW_DURABLE}, one message at a time`);
    while (!stopping) {
      const m = await consumer.next({ expires: NEXT_EXPIRES_MS });
      if (m) await handle(m);
    }
  } else {
    const messages = await consumer.consume({ max_messages: window });
    const stop = (): void => {
      if (stopping) return;
      stopping = true;
      messages.stop();
    };
    process.once("SIGTERM", stop);
    process.once("SIGINT", stop);

    const inflight = new Set<Promise<void>>();
    console.log(`raw-loop ready: consuming ${RAW_DURABLE} (window ${window})`);
    for await (const m of messages) {
      const p: Promise<void> = handle(m)
        .catch(() => undefined)
        .finally(() => inflight.delete(p));
      inflight.add(p);
      if (inflight.size >= window) await Promise.race(inflight);
      if (stopping) break;
    }
    await Promise.all(inflight);
  }
  worker?.close();
  await nc.drain();
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    console.error(`raw-loop: ${(err as Error)?.stack ?? String(err)}`);
    process.exit(1);
  },
);
