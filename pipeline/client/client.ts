/**
 * The client library: publish inference requests and await their results.
 *
 * ```ts
 * const client = await InferenceClient.connect({ servers: "nats://127.0.0.1:4222", tenant: "acme" });
 * const result = await client.infer("llama3-8b", { prompt: "Write a haiku about queues" });
 * console.log(result.output?.text);
 * await client.close();
 * ```
 */
import { headers as natsHeaders, nuid, type MsgHdrs, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JetStreamClient, type JetStreamManager } from "@nats-io/jetstream";
import type { InferResult } from "../../operators/types.js";
import { PRIORITIES, H, ID_RE, subjects, TOKEN_RE, VERSION_RE, DEFAULT_MAX_PAYLOAD_BYTES } from "../../proto/wire.js";
import { getStoredResultDirect } from "../settle/stored-result.js";
import type { TraceCarrier, Tracing } from "../telemetry/types.js";
import { connectNats } from "../connection.js";
import { PayloadError } from "../payloads/errors.js";
import { ClientClaimCheck, type ClientPayloadOptions } from "../payloads/client-claim-check.js";
import { InferenceError, publishError } from "./errors.js";
import type { ClientOptions, InferBody, InferOptions, PublishReceipt, StreamEvent } from "./options.js";


export const DEFAULT_RESULT_TIMEOUT_MS = 60_000;


interface Waiter {
  resolve: (r: InferResult) => void;
  reject: (e: Error) => void;
}

const encoder = new TextEncoder();

/** Size of a header block on the wire: `NATS/1.0`, a line per value, a blank line. */
function headerBytes(h: ReturnType<typeof natsHeaders>): number {
  let n = "NATS/1.0\r\n\r\n".length;
  for (const [k, vs] of h) for (const v of vs) n += encoder.encode(`${k}: ${v}\r\n`).length;
  return n;
}

function kib(bytes: number): string {
  return bytes % 1024 === 0 ? `${bytes / 1024} KiB` : `${(bytes / 1024).toFixed(1)} KiB`;
}
const decoder = new TextDecoder();

export class InferenceClient {
  private sub: Subscription | undefined;
  private readonly waiters = new Map<string, Waiter[]>();
  private readonly js: JetStreamClient;
  private jsm: Promise<JetStreamManager> | undefined;
  private closed = false;
  /** Bodies over the threshold through the tenant's object store (docs/protocol.md, "Large bodies"). */
  private readonly claimCheck: ClientClaimCheck;

  constructor(
    readonly nc: NatsConnection,
    readonly tenant: string,
    private readonly ownsConnection = false,
    private readonly tracing?: Tracing,
    private readonly maxPayloadBytes: number = DEFAULT_MAX_PAYLOAD_BYTES,
    payloads: ClientPayloadOptions = {},
  ) {
    if (!TOKEN_RE.test(tenant)) throw new InferenceError("INVALID_ARGUMENT", `tenant '${tenant}' must be 1-64 of a-z 0-9 _ -`);
    // No API check: a tenant's user may use its own streams' API subjects and nothing else.
    this.js = jetstream(nc, { checkAPI: false });
    this.claimCheck = new ClientClaimCheck(this.js, tenant, () => this.manager(), payloads);
  }

  static async connect(opts: ClientOptions): Promise<InferenceClient> {
    const nc = await connectNats(opts.servers, opts.name ?? `sluice-client-${opts.tenant}`);
    return new InferenceClient(nc, opts.tenant, true, opts.tracing, opts.maxPayloadBytes, opts.payloads);
  }

  /** Publishes a request and resolves with its `ok` result; rejects with an InferenceError. */
  async infer(model: string, body: InferBody, opts: InferOptions = {}): Promise<InferResult> {
    const result = await this.request(model, body, opts);
    if (result.status !== "ok") {
      throw new InferenceError(result.error?.code ?? "INTERNAL", result.error?.message ?? "request failed", result);
    }
    return result;
  }

  /** Publishes a request and resolves with its result, `ok` or error. */
  async request(model: string, body: InferBody, opts: InferOptions = {}): Promise<InferResult> {
    const id = opts.id ?? nuid.next();
    const waiting = this.result(id, { timeoutMs: opts.timeoutMs, checkStored: false });
    try {
      const receipt = await this.publish(model, body, { ...opts, id });
      if (receipt.duplicate) this.deliverStored(id);
    } catch (err) {
      this.dropWaiters(id, err as Error);
      await waiting.catch(() => undefined);
      throw err;
    }
    return waiting;
  }

  /**
   * Streams a generation: yields each chunk (`{ seq, text }`, in order, no gaps or repeats) as
   * the worker makes it, then the final result (`{ result }`), then ends. Leaving the loop early
   * cancels the request (the worker stops generating).
   *
   * ```ts
   * for await (const ev of client.stream("llm", { prompt: "Tell me a story" })) {
   *   if ("text" in ev) process.stdout.write(ev.text);
   *   else console.log("\n", ev.result.usage);
   * }
   * ```
   */
  async *stream(model: string, body: InferBody, opts: InferOptions = {}): AsyncGenerator<StreamEvent, void, undefined> {
    const id = opts.id ?? nuid.next();
    const events: Array<StreamEvent | Error> = [];
    let wake: (() => void) | undefined;
    const push = (e: StreamEvent | Error): void => {
      events.push(e);
      wake?.();
    };
    const tokens = this.nc.subscribe(subjects.tokens(this.tenant, id), {
      callback: (err, msg) => {
        if (err) return;
        try {
          const c = JSON.parse(decoder.decode(msg.data)) as { seq: number; text: string };
          if (Number.isInteger(c.seq) && typeof c.text === "string") push({ seq: c.seq, text: c.text });
        } catch {
          // an unreadable chunk is skipped; the final result carries the whole text
        }
      },
    });
    let finished = false;
    const resultP = this.result(id, { timeoutMs: opts.timeoutMs, checkStored: false });
    resultP.then(
      (result) => push({ result }),
      (err: unknown) => push(err instanceof Error ? err : new Error(String(err))),
    );
    try {
      const receipt = await this.publish(model, body, { ...opts, id, stream: true });
      if (receipt.duplicate) this.deliverStored(id);
      let next = 0;
      const pending = new Map<number, string>();
      for (;;) {
        while (events.length === 0) await new Promise<void>((r) => (wake = r));
        wake = undefined;
        const e = events.shift()!;
        if (e instanceof Error) throw e;
        if ("result" in e) {
          finished = true;
          yield e;
          return;
        }
        // In order, without repeats: a generation that was started over (a redelivery) sends
        // its chunks again from 0; those already seen are skipped.
        if (e.seq < next) continue;
        pending.set(e.seq, e.text);
        while (pending.has(next)) {
          const text = pending.get(next)!;
          pending.delete(next);
          yield { seq: next, text };
          next++;
        }
      }
    } finally {
      tokens.unsubscribe();
      if (!finished) {
        this.dropWaiters(id, new InferenceError("CANCELLED", "stream left by the caller"));
        await resultP.catch(() => undefined);
        try {
          this.nc.publish(subjects.cancel(this.tenant, id));
        } catch {
          // the connection is gone: nothing to cancel with
        }
      }
    }
  }

  /** Asks the pipeline to cancel a request still queued or running (`CANCELLED` result). */
  cancel(id: string): void {
    this.nc.publish(subjects.cancel(this.tenant, id));
  }

  /**
   * Sends a request without waiting for its result; resolves once it is queued. A request id
   * used before (within the duplicate window) queues nothing: the receipt says `duplicate`.
   */
  async publish(model: string, body: InferBody | Uint8Array, opts: InferOptions = {}): Promise<PublishReceipt> {
    if (!TOKEN_RE.test(model)) throw new InferenceError("INVALID_ARGUMENT", `model '${model}' must be 1-64 of a-z 0-9 _ -`);
    const id = opts.id ?? nuid.next();
    if (!ID_RE.test(id)) throw new InferenceError("INVALID_ARGUMENT", `request id '${id}' must be 1-128 of A-Z a-z 0-9 _ -`);
    const priority = opts.priority ?? "normal";
    if (!PRIORITIES.includes(priority)) {
      throw new InferenceError("INVALID_ARGUMENT", `priority '${String(priority)}' must be one of ${PRIORITIES.join(", ")}`);
    }
    if (opts.version !== undefined && !VERSION_RE.test(opts.version)) {
      throw new InferenceError("INVALID_ARGUMENT", `version '${opts.version}' must be 1-64 of A-Z a-z 0-9 . _ -`);
    }
    if (opts.deadlineMs !== undefined && !(Number.isFinite(opts.deadlineMs) && opts.deadlineMs >= 1)) {
      throw new InferenceError("INVALID_ARGUMENT", `deadlineMs ${String(opts.deadlineMs)} is not an absolute time in Unix epoch milliseconds`);
    }
    const h = natsHeaders();
    if (body instanceof Uint8Array) h.set(H.contentType, "application/x-protobuf");
    else h.set(H.contentType, "application/json");
    if (opts.version) h.set(H.version, opts.version);
    if (opts.deadlineMs !== undefined) h.set(H.deadline, String(Math.floor(opts.deadlineMs)));
    if (opts.stream) h.set(H.stream, "1");
    if (opts.session !== undefined) h.set(H.inferSession, opts.session);
    let data = body instanceof Uint8Array ? body : encoder.encode(JSON.stringify(body));
    const bodyBytes = data.length;
    let claimed = false;
    // Over the threshold, or over what the server takes in one message: through the object store.
    if (this.claimCheck.wants(data.length, this.nc.info?.max_payload)) {
      // Claim check: the body goes to the object store, the request carries its reference.
      try {
        await this.claimCheck.claim(h, id, data);
      } catch (err) {
        const e = err as PayloadError;
        throw new InferenceError(e.code, e.message, undefined, e.cause !== undefined ? { cause: e.cause } : undefined);
      }
      data = new Uint8Array(0);
      claimed = true;
    } else this.checkBodySize(data.length);
    const subject = subjects.request(priority, this.tenant, model);
    const parent: TraceCarrier = {};
    if (opts.traceparent) parent.traceparent = opts.traceparent;
    if (opts.tracestate) parent.tracestate = opts.tracestate;
    const span = this.tracing?.startPublish({ subject, id, tenant: this.tenant, model, priority, bodyBytes }, parent);
    const carrier = span?.carrier ?? parent;
    if (carrier.traceparent) h.set(H.traceparent, carrier.traceparent);
    if (carrier.tracestate) h.set(H.tracestate, carrier.tracestate);
    // The message as the server counts it: body and headers, with the Nats-Msg-Id JetStream adds.
    const overServer = this.overServerMax(data.length, headerBytes(h) + `${H.msgId}: ${id}\r\n`.length);
    if (overServer) {
      span?.end(overServer.code, overServer);
      if (claimed) await this.claimCheck.unclaim(id);
      throw overServer;
    }
    try {
      const ack = await this.js.publish(subject, data, { msgID: id, headers: h });
      span?.setAttributes({ "sluice.stream.sequence": ack.seq, ...(ack.duplicate ? { "sluice.duplicate": true } : {}) });
      span?.end();
      const receipt: PublishReceipt = { id, seq: ack.seq, duplicate: ack.duplicate };
      if (carrier.traceparent) receipt.traceparent = carrier.traceparent;
      try {
        opts.onPublished?.(receipt);
      } catch {
        // the caller's hook is its own
      }
      return receipt;
    } catch (err) {
      const e = publishError(err, { bodyBytes, maxPayload: this.nc.info?.max_payload });
      span?.end(e.code, e);
      // Nothing refers to the body now: remove it (the sweeper would, later).
      if (claimed) await this.claimCheck.unclaim(id);
      throw e;
    }
  }

  private manager(): Promise<JetStreamManager> {
    this.jsm ??= jetstreamManager(this.nc, { checkAPI: false });
    return this.jsm;
  }

  /** A result message as the whole result: its body, or the object its reference names. */
  private async readResult(id: string, headers: MsgHdrs | undefined, data: Uint8Array): Promise<InferResult> {
    try {
      return await this.claimCheck.readResult(id, headers, data);
    } catch (err) {
      if (err instanceof PayloadError) throw new InferenceError(err.code, err.message, undefined, { cause: err });
      throw new InferenceError("INTERNAL", `unreadable result for request '${id}': ${(err as Error).message}`, undefined, { cause: err });
    }
  }

  /**
   * Waits for the result of a request published earlier. With `checkStored` (the default) it
   * also looks in the results stream, so a client that joins late still gets its answer.
   */
  async result(id: string, opts: { timeoutMs?: number | undefined; checkStored?: boolean } = {}): Promise<InferResult> {
    this.ensureSubscribed();
    const timeoutMs = opts.timeoutMs ?? DEFAULT_RESULT_TIMEOUT_MS;
    const p = new Promise<InferResult>((resolve, reject) => {
      const list = this.waiters.get(id) ?? [];
      list.push({ resolve, reject });
      this.waiters.set(id, list);
    });
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>(() => {
      timer = setTimeout(() => {
        void this.stored(id).then(
          (r) => (r ? this.deliver(id, r) : this.dropWaiters(id, new InferenceError("DEADLINE_EXCEEDED", `no result for request '${id}' within ${timeoutMs} ms`))),
          () => this.dropWaiters(id, new InferenceError("DEADLINE_EXCEEDED", `no result for request '${id}' within ${timeoutMs} ms`)),
        );
      }, timeoutMs);
    });
    if (opts.checkStored !== false) {
      void this.stored(id).then(
        (r) => r && this.deliver(id, r),
        () => undefined,
      );
    }
    try {
      return await Promise.race([p, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Refuses a body the pipeline would answer INVALID_ARGUMENT for its size. */
  private checkBodySize(bytes: number): void {
    if (bytes > this.maxPayloadBytes) {
      throw new InferenceError(
        "INVALID_ARGUMENT",
        `request body of ${bytes} bytes is over the request size limit of ${this.maxPayloadBytes} bytes (${kib(this.maxPayloadBytes)})`,
      );
    }
  }

  /** The error for a message the NATS server would refuse (over its `max_payload`), if it is one. */
  private overServerMax(bodyBytes: number, headerBytes: number): InferenceError | undefined {
    const serverMax = this.nc.info?.max_payload;
    if (serverMax === undefined || serverMax <= 0 || bodyBytes + headerBytes <= serverMax) return undefined;
    return new InferenceError(
      "INVALID_ARGUMENT",
      `request body of ${bodyBytes} bytes with ${headerBytes} bytes of headers is over the NATS server's max_payload of ${serverMax} bytes (${kib(serverMax)}): ` +
        `send the body through the object store (the client does so above payloads.thresholdBytes; docs/protocol.md, "Large bodies")`,
    );
  }

  /**
   * A duplicate request id: its result may have been published before this client listened, so
   * look it up now instead of waiting for the timeout; a result still to come arrives live.
   */
  private deliverStored(id: string): void {
    void this.stored(id).then(
      (r) => r && this.deliver(id, r),
      () => undefined,
    );
  }

  /** The stored result of a request, if there is one. */
  async stored(id: string): Promise<InferResult | undefined> {
    // No API check: a tenant's user may use the direct get of its own results and nothing else.
    const m = await getStoredResultDirect(await this.manager(), this.tenant, id);
    return m ? this.readResult(id, m.header, m.data) : undefined;
  }

  private ensureSubscribed(): void {
    if (this.closed) throw new InferenceError("UNAVAILABLE", "client is closed");
    if (this.sub) return;
    this.sub = this.nc.subscribe(subjects.resultsOfTenant(this.tenant), {
      callback: (err, msg) => {
        if (err) return;
        const id = msg.subject.slice(msg.subject.lastIndexOf(".") + 1);
        if (!this.waiters.has(id)) return;
        this.readResult(id, msg.headers, msg.data).then(
          (r) => this.deliver(id, r),
          (err: unknown) => this.dropWaiters(id, err as Error),
        );
      },
    });
  }

  private deliver(id: string, r: InferResult): void {
    const list = this.waiters.get(id);
    if (!list) return;
    this.waiters.delete(id);
    for (const w of list) w.resolve(r);
  }

  private dropWaiters(id: string, err: Error): void {
    const list = this.waiters.get(id);
    if (!list) return;
    this.waiters.delete(id);
    for (const w of list) w.reject(err);
  }

  /** Closes the client; pending calls reject with UNAVAILABLE. Safe to call twice. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.sub?.unsubscribe();
    for (const id of [...this.waiters.keys()]) this.dropWaiters(id, new InferenceError("UNAVAILABLE", "client closed"));
    if (this.ownsConnection) await this.nc.drain().catch(() => undefined);
  }
}
