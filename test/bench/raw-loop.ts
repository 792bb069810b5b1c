/**
 * The `jetstream-raw` baseline: what a hand-written consumer loop does, with no pipeline logic
 * (no batching, no routing, no retries, no redelivery checks, no tracing). It pulls from a
 * durable consumer on INFER_REQ with `consume()`, sends each message to the worker as a batch of
 * one, publishes the result on `infer.res.<tenant>.<id>` (JetStream, `Nats-Msg-Id` = id) and
 * acks. Up to `--window` messages are worked on at once, the same bound as the pipeline's
 * default in-flight limit, so the comparison is about what the pipeline adds, not about
 * concurrency.
 *
 *   node --import tsx test/bench/raw-loop.ts --server URL --worker HOST:PORT [--window N] [--version V]
 *
 * Prints `raw-loop ready` once it consumes; stops on SIGTERM / SIGINT.
 */
import { parseArgs } from "node:util";
import { connect, headers as natsHeaders } from "@nats-io/transport-node";
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager, type JsMsg } from "@nats-io/jetstream";
import { nanos } from "@nats-io/transport-node";
import { defaultConfig } from "../../pipeline/config.js";
import { ensureStreams, STREAM_REQUESTS } from "../../pipeline/jetstream.js";
import { WorkerClient } from "../../pipeline/worker-client.js";

const RAW_DURABLE = "raw-normal";
const RAW_FILTER = "infer.req.normal.*.*";
const DEFAULT_RAW_WINDOW = 256;
const ACK_WAIT_MS = 30_000;
const CALL_TIMEOUT_MS = 30_000;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

interface Body {
  prompt?: string;
  inputs?: unknown;
  parameters?: Record<string, unknown>;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      server: { type: "string" },
      worker: { type: "string" },
      window: { type: "string" },
      version: { type: "string" },
    },
    strict: true,
  });
  if (!values.server || !values.worker) throw new Error("usage: raw-loop --server URL --worker HOST:PORT [--window N] [--version V]");
  const window = Number(values.window ?? DEFAULT_RAW_WINDOW);
  const version = values.version ?? "v1";

  const nc = await connect({ servers: values.server, name: "bench-raw-loop" });
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
  const worker = new WorkerClient(values.worker);
  const consumer = await js.consumers.get(STREAM_REQUESTS, RAW_DURABLE);
  const messages = await consumer.consume({ max_messages: window });

  let stopping = false;
  const stop = (): void => {
    if (stopping) return;
    stopping = true;
    messages.stop();
  };
  process.once("SIGTERM", stop);
  process.once("SIGINT", stop);

  const handle = async (m: JsMsg): Promise<void> => {
    // infer.req.<priority>.<tenant>.<model>
    const [, , , tenant = "", model = ""] = m.subject.split(".");
    const id = m.headers?.get("Nats-Msg-Id") ?? String(m.seq);
    let result: Record<string, unknown>;
    try {
      const body = JSON.parse(decoder.decode(m.data)) as Body;
      const reply = await worker.infer(
        {
          model,
          version,
          requests: [
            {
              id,
              tenant,
              ...(body.prompt !== undefined ? { prompt: body.prompt } : {}),
              ...(body.inputs !== undefined ? { inputs: body.inputs } : {}),
              ...(body.parameters !== undefined ? { parameters: body.parameters } : {}),
            },
          ],
        },
        { deadlineMs: Date.now() + CALL_TIMEOUT_MS },
      );
      const item = reply.results[0];
      result = item
        ? { id, status: item.status, model, version, output: item.output, usage: item.usage, error: item.error, timing: { batch_size: 1 } }
        : { id, status: "error", error: { code: "INTERNAL", message: "no result" } };
    } catch (err) {
      result = { id, status: "error", error: { code: "INTERNAL", message: (err as Error).message } };
    }
    const h = natsHeaders();
    h.set("Infer-Status", result["status"] === "ok" ? "ok" : "INTERNAL");
    h.set("Content-Type", "application/json");
    try {
      await js.publish(`infer.res.${tenant}.${id}`, encoder.encode(JSON.stringify(result)), { msgID: id, headers: h });
      m.ack();
    } catch {
      m.nak();
    }
  };

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
  worker.close();
  await nc.drain();
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    console.error(`raw-loop: ${(err as Error)?.stack ?? String(err)}`);
    process.exit(1);
  },
);
