/** Getting a recorded request ready to run again: its headers as replayed, its recorded result, and a warmed worker directory. */
import { type NatsConnection } from "@nats-io/transport-node";
import { type JetStreamManager, type JsMsg } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import type { InferResult } from "../../../operators/types.js";
import { H, ID_RE, TOKEN_RE, WORKERS_BUCKET, DEADLINE_RE, REPLAY_HEADERS } from "../../../proto/wire.js";
import { getStoredResult } from "../../settle/stored-result.js";
import type { WorkerDirectory } from "../../workers/directory.js";
import { headerValue, sanitizeHeader } from "../../support/headers.js";
import { DEFAULT_MAX_OBJECT_BYTES } from "../../payloads/names.js";
import { resolveResult } from "../../payloads/results.js";
import { PayloadStore } from "../../payloads/store.js";

/** How long to wait for the worker directory to load the registered workers. */
const DIRECTORY_WARMUP_MS = 2_000;

/** Waits `ms`, or less when the signal aborts. */
export function pause(ms: number, signal?: AbortSignal): Promise<void> {
  if (ms <= 0 || signal?.aborted) return Promise.resolve();
  return new Promise<void>((resolve) => {
    const done = (): void => {
      clearTimeout(t);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const t = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}

/** The request's headers as a replay presents them, for an injection at `nowMs`. */
export function replayHeaders(m: JsMsg, session: string, traceparent: string, nowMs: number): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  const storedAt = m.info.timestampNanos / 1e6;
  for (const [k, vs] of m.headers ?? []) {
    const key = k.toLowerCase();
    // A new trace: the original's trace state belongs to the original trace.
    if (key === "traceparent" || key === "tracestate") continue;
    for (const v of vs) {
      // The deadline keeps its budget, counted from the injection instead of the original
      // store: an original that expired before it was served expires again.
      if (key === "infer-deadline" && DEADLINE_RE.test(v) && Number.isSafeInteger(Number(v))) {
        out.push([k, String(Math.max(1, Math.round(nowMs + Number(v) - storedAt)))]);
      } else out.push([k, v]);
    }
  }
  out.push([H.traceparent, traceparent]);
  out.push([REPLAY_HEADERS.session, session]);
  out.push([REPLAY_HEADERS.ofSeq, String(m.seq)]);
  const original = headerValue(m.headers, H.traceparent);
  if (original !== undefined) out.push([REPLAY_HEADERS.ofTraceparent, sanitizeHeader(original)]);
  return out;
}

export async function recordedResult(jsm: JetStreamManager, store: PayloadStore, tenant: string | undefined, id: string | undefined): Promise<InferResult | undefined> {
  if (tenant === undefined || id === undefined || !TOKEN_RE.test(tenant) || !ID_RE.test(id)) return undefined;
  for (let attempt = 0; ; attempt++) {
    try {
      const m = await getStoredResult(jsm, tenant, id);
      // A large result is read whole from the object store (its message holds a reference).
      return m ? await resolveResult(store, tenant, id, (n) => m.header.get(n) || undefined, m.data, DEFAULT_MAX_OBJECT_BYTES) : undefined;
    } catch (err) {
      if (attempt >= 2) throw err;
    }
  }
}

/** Waits (briefly) until the directory has loaded the workers registered now, so the first requests find them. */
export async function warmUp(nc: NatsConnection, directory: WorkerDirectory, ttlMs: number): Promise<void> {
  let expected = 0;
  try {
    const kv = await new Kvm(nc).open(WORKERS_BUCKET);
    for await (const k of await kv.keys()) {
      const e = await kv.get(k);
      if (e && e.operation === "PUT" && Date.now() - e.created.getTime() <= ttlMs) expected++;
    }
  } catch {
    return;
  }
  const deadline = Date.now() + DIRECTORY_WARMUP_MS;
  while (directory.list().length < expected && Date.now() < deadline) await pause(10);
}

/** A selected request read from the stream, its recorded result being looked up. */
export interface Prepared {
  readonly msg: JsMsg;
  readonly tenant: string | undefined;
  readonly model: string | undefined;
  readonly id: string | undefined;
  recorded: InferResult | undefined;
  readonly ready: Promise<void>;
}
