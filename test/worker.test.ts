/**
 * The worker contract end to end over real gRPC on loopback: WorkerClient -> WorkerServer ->
 * SimulatedEngine, plus the JSON <-> Struct/Value conversion the wire relies on.
 */
import * as grpc from "@grpc/grpc-js";
import { expect } from "chai";
import { google } from "../proto/gen/inference.js";
import { fromStruct, fromValue, JsonValueError, toStruct, toValue } from "../proto/json.js";
import { HealthGrpcClient, WORKER_SERVICE_NAME } from "../proto/service.js";
import { WorkerCallError, WorkerClient, type WorkerChunk, type WorkerRequest } from "../pipeline/workers/mod.js";
import { SimulatedEngine, type SimulatedEngineOptions } from "../worker/engines/simulated.js";
import { WorkerServer } from "../worker/server.js";

interface Harness {
  engine: SimulatedEngine;
  server: WorkerServer;
  client: WorkerClient;
}

const cleanups: Array<() => Promise<void> | void> = [];

async function startWorker(opts: SimulatedEngineOptions = {}, serverOpts: { stopGraceMs?: number } = {}): Promise<Harness> {
  const engine = new SimulatedEngine({ base_ms: 1, per_item_ms: 0, ...opts });
  const server = await WorkerServer.start({ engine, port: 0, stopGraceMs: 1_000, ...serverOpts });
  const client = new WorkerClient(server.endpoint);
  cleanups.push(async () => {
    client.close();
    await server.stop();
    await engine.close();
  });
  return { engine, server, client };
}

/** Polls until `check` holds, or fails the test after `timeoutMs` (only when it never holds). */
async function waitFor(what: string, check: () => boolean, timeoutMs = 20_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Counts the batches that reached the engine (when the device gets them, not when they end). */
function countArrivals(engine: SimulatedEngine): () => number {
  let n = 0;
  const infer = engine.infer.bind(engine);
  engine.infer = (batch, signal) => {
    n++;
    return infer(batch, signal);
  };
  return () => n;
}

/** The rejection of a promise that must reject. */
async function rejectionOf(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  throw new Error("expected the call to fail, but it succeeded");
}

async function collect(chunks: AsyncIterable<WorkerChunk>): Promise<WorkerChunk[]> {
  const out: WorkerChunk[] = [];
  for await (const c of chunks) out.push(c);
  return out;
}

const reverse = (s: string): string => Array.from(s).reverse().join("");

afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!();
});

describe("proto/json", () => {
  const sample = {
    nothing: null,
    int: 42,
    float: -1.5,
    text: "héllo \u{1F600}",
    yes: true,
    no: false,
    list: [1, "two", null, { deep: [false, { deeper: "x" }] }, []],
    empty: {},
  };

  it("round-trips a JSON object through Struct encode/decode", () => {
    const bytes = google.protobuf.Struct.encode(toStruct(sample)).finish();
    const back = fromStruct(google.protobuf.Struct.decode(bytes));
    expect(back).to.deep.equal(sample);
  });

  it("round-trips every kind of JSON value through Value encode/decode", () => {
    for (const v of [null, 0, 3.25, "", "s", true, false, [], [null, [1]], sample]) {
      const bytes = google.protobuf.Value.encode(toValue(v)).finish();
      expect(fromValue(google.protobuf.Value.decode(bytes))).to.deep.equal(v);
    }
  });

  it("refuses numbers JSON cannot carry, naming where", () => {
    for (const bad of [NaN, Infinity, -Infinity]) {
      let err: unknown;
      try {
        toStruct({ parameters: { temperature: bad } });
      } catch (e) {
        err = e;
      }
      expect(err).to.be.instanceOf(JsonValueError);
      expect((err as JsonValueError).code).to.equal("NON_FINITE_NUMBER");
      expect((err as JsonValueError).path).to.equal("$.parameters.temperature");
    }
    expect(() => toValue([1, () => 2])).to.throw(JsonValueError, /\$\[1\]/);
  });

  it("reads a missing Value as null and a missing Struct as {}", () => {
    expect(fromValue(undefined)).to.equal(null);
    expect(fromValue({})).to.equal(null);
    expect(fromStruct(null)).to.deep.equal({});
  });
});

describe("worker over gRPC", () => {
  it("answers a batch in order, each result derived from its own request", async () => {
    const { client } = await startWorker();
    const requests: WorkerRequest[] = Array.from({ length: 12 }, (_, i) => ({
      id: `r${i}`,
      tenant: "acme",
      prompt: `request number ${i} says ${"x".repeat(i)}`,
    }));
    const res = await client.infer({ model: "reverse", version: "v1", requests });
    expect(res.results).to.have.length(requests.length);
    res.results.forEach((r, i) => {
      const prompt = requests[i]!.prompt!;
      expect(r.id).to.equal(`r${i}`);
      expect(r.status).to.equal("ok");
      expect(r.output?.text).to.equal(reverse(prompt));
      expect(r.usage).to.deep.equal({ prompt_tokens: i === 0 ? 4 : 5, completion_tokens: i === 0 ? 4 : 5 });
    });
    expect(res.engine_ms).to.be.greaterThan(0);

    // Without a prompt the inputs stand in; other models prefix model@version.
    const other = await client.infer({
      model: "llm",
      version: "v7",
      requests: [
        { id: "a", inputs: { n: 1, list: [true, null] } },
        { id: "b", inputs: "plain" },
      ],
    });
    expect(other.results.map((r) => r.output?.text)).to.deep.equal(['llm@v7: {"n":1,"list":[true,null]}', 'llm@v7: "plain"']);
  });

  it("fails only the item that fails: the rest of the batch is answered", async () => {
    const { client } = await startWorker();
    const res = await client.infer({
      model: "upper",
      version: "v1",
      requests: [
        { id: "ok1", prompt: "first" },
        { id: "bad", prompt: "second", parameters: { simulate_error: "NOT_FOUND" } },
        { id: "empty" },
        { id: "ok2", prompt: "third" },
      ],
    });
    expect(res.results.map((r) => r.id)).to.deep.equal(["ok1", "bad", "empty", "ok2"]);
    expect(res.results.map((r) => r.status)).to.deep.equal(["ok", "error", "error", "ok"]);
    expect(res.results[0]!.output?.text).to.equal("FIRST");
    expect(res.results[1]!.error?.code).to.equal("NOT_FOUND");
    expect(res.results[2]!.error?.code).to.equal("INVALID_ARGUMENT");
    expect(res.results[2]!.not_started).to.equal(true);
    expect(res.results[3]!.output?.text).to.equal("THIRD");
  });

  it("refuses a malformed batch with INVALID_ARGUMENT, not retriable", async () => {
    const { client, engine } = await startWorker();
    for (const batch of [
      { model: "", version: "v1", requests: [{ id: "x", prompt: "p" }] },
      { model: "echo", version: "", requests: [{ id: "x", prompt: "p" }] },
      { model: "echo", version: "v1", requests: [] },
    ]) {
      const err = await rejectionOf(client.infer(batch));
      expect(err).to.be.instanceOf(WorkerCallError);
      expect((err as WorkerCallError).code).to.equal("INVALID_ARGUMENT");
      expect((err as WorkerCallError).grpcCode).to.equal(grpc.status.INVALID_ARGUMENT);
      expect((err as WorkerCallError).retriable).to.equal(false);
    }
    expect(engine.counters.batches).to.equal(0);
  });

  it("runs one batch at a time on the device", async () => {
    const { client, engine } = await startWorker({ base_ms: 60, per_item_ms: 0 });
    const [a, b] = await Promise.all([
      client.infer({ model: "echo", version: "v1", requests: [{ id: "a1", prompt: "a" }, { id: "a2", prompt: "aa" }] }),
      client.infer({ model: "echo", version: "v1", requests: [{ id: "b1", prompt: "b" }] }),
    ]);
    expect(a.results.map((r) => r.output?.text)).to.deep.equal(["a", "aa"]);
    expect(b.results.map((r) => r.output?.text)).to.deep.equal(["b"]);

    const calls = engine.calls.filter((c) => c.kind === "infer");
    expect(calls).to.have.length(2);
    const [first, second] = [...calls].sort((x, y) => x.startedAtMs - y.startedAtMs) as [typeof calls[0], typeof calls[0]];
    // One after the other: the second pass starts when the first has ended.
    expect(second.startedAtMs).to.be.at.least(first.finishedAtMs);
    // Each pass holds the device for its cost (a timer never fires early; 1 ms for rounding).
    for (const c of calls) expect(c.finishedAtMs - c.startedAtMs).to.be.at.least(engine.batchCostMs(c.ids.length) - 1);
    expect(engine.counters.batches).to.equal(2);
    expect(engine.counters.items).to.equal(3);
  });

  it("maps a passed deadline to DEADLINE_EXCEEDED and aborts the engine's work", async () => {
    const { client, engine } = await startWorker({ base_ms: 1_500, per_item_ms: 0 });
    // A connection already open, so the call reaches the device well before its deadline, which
    // passes while the device runs it.
    await client.check();
    const err = await rejectionOf(
      client.infer({ model: "echo", version: "v1", requests: [{ id: "slow", prompt: "p" }] }, { deadlineMs: Date.now() + 500 }),
    );
    expect(err).to.be.instanceOf(WorkerCallError);
    expect((err as WorkerCallError).code).to.equal("DEADLINE_EXCEEDED");
    expect((err as WorkerCallError).retriable).to.equal(false);
    // The device finishes its pass (a GPU cannot drop a running kernel) and logs it cancelled.
    await waitFor("the batch to be logged", () => engine.calls.length === 1);
    expect(engine.calls[0]!.ids).to.deep.equal(["slow"]);
    expect(engine.calls[0]!.cancelled).to.equal(true);
    expect(engine.counters.cancelledBatches).to.equal(1);
  });

  it("takes a caller's abort as CANCELLED, not retriable", async () => {
    const { client, engine } = await startWorker({ base_ms: 300, per_item_ms: 0 });
    const arrived = countArrivals(engine);
    const ac = new AbortController();
    const call = client.infer({ model: "echo", version: "v1", requests: [{ id: "c", prompt: "p" }] }, { signal: ac.signal });
    // Aborted while the device runs it (the poll's short timer fires before the device's).
    await waitFor("the call to reach the engine", () => arrived() === 1);
    ac.abort();
    const err = await rejectionOf(call);
    expect((err as WorkerCallError).code).to.equal("CANCELLED");
    expect((err as WorkerCallError).retriable).to.equal(false);
  });

  it("reports a killed worker as UNAVAILABLE and retriable, in flight and after", async () => {
    const { client, server, engine } = await startWorker({ base_ms: 500, per_item_ms: 0 });
    await client.infer({ model: "echo", version: "v1", requests: [{ id: "warm", prompt: "up" }] });
    const arrived = countArrivals(engine);
    const inFlight = client.infer({ model: "echo", version: "v1", requests: [{ id: "doomed", prompt: "p" }] });
    await waitFor("the call to reach the engine", () => arrived() === 1);
    server.kill();
    const err = await rejectionOf(inFlight);
    expect(err).to.be.instanceOf(WorkerCallError);
    expect((err as WorkerCallError).code).to.equal("UNAVAILABLE");
    expect((err as WorkerCallError).retriable).to.equal(true);

    const after = await rejectionOf(client.infer({ model: "echo", version: "v1", requests: [{ id: "late", prompt: "p" }] }));
    expect((after as WorkerCallError).code).to.equal("UNAVAILABLE");
    expect((after as WorkerCallError).grpcCode).to.equal(grpc.status.UNAVAILABLE);
    expect((after as WorkerCallError).retriable).to.equal(true);
    expect((after as WorkerCallError).endpoint).to.equal(server.endpoint);
  });

  it("flips health Check and Watch with setServing, and still answers Infer", async () => {
    const { client, server } = await startWorker();
    expect(await client.check()).to.equal("SERVING");
    expect(await client.check("")).to.equal("SERVING");
    expect(await client.check("no.such.Service")).to.equal("SERVICE_UNKNOWN");

    const seen: string[] = [];
    const watching = (async () => {
      for await (const s of client.watch()) {
        seen.push(s);
        if (seen.length === 3) break;
      }
    })();
    await waitFor("the first status", () => seen.length === 1);
    server.setServing(false);
    await waitFor("NOT_SERVING", () => seen.length === 2);
    expect(await client.check()).to.equal("NOT_SERVING");
    expect(await client.check("")).to.equal("NOT_SERVING");
    const still = await client.infer({ model: "echo", version: "v1", requests: [{ id: "x", prompt: "draining" }] });
    expect(still.results[0]!.output?.text).to.equal("draining");
    server.setServing(true);
    await watching;
    expect(seen).to.deep.equal(["SERVING", "NOT_SERVING", "SERVING"]);
    expect(await client.check(WORKER_SERVICE_NAME)).to.equal("SERVING");
  });

  it("answers Check of an unknown service with the NOT_FOUND status code", async () => {
    const { server } = await startWorker();
    const raw = new HealthGrpcClient(server.endpoint, grpc.credentials.createInsecure());
    cleanups.push(() => raw.close());
    const code = await new Promise<number | undefined>((resolve) => {
      raw["Check"]!({ service: "no.such.Service" }, (err: grpc.ServiceError | null) => resolve(err?.code));
    });
    expect(code).to.equal(grpc.status.NOT_FOUND);
  });

  it("streams a generation: seq from 0 without gaps, the joined text is the final text", async () => {
    const { client, engine } = await startWorker({ ttft_ms: 5, token_interval_ms: 1 });
    const prompt = "  the quick brown fox\tjumps over the  lazy dog ";
    const chunks = await collect(client.generate({ model: "echo", version: "v1", request: { id: "g1", prompt } }));
    const last = chunks[chunks.length - 1]!;
    const body = chunks.slice(0, -1);
    expect(body.length).to.equal(9);
    body.forEach((c, i) => {
      expect(c.seq).to.equal(i);
      expect(c.final).to.equal(undefined);
    });
    expect(last.seq).to.equal(body.length);
    expect(last.final?.status).to.equal("ok");
    expect(last.final?.id).to.equal("g1");
    expect(body.map((c) => c.text).join("")).to.equal(prompt);
    expect(last.final?.output?.text).to.equal(prompt);
    expect(last.final?.usage).to.deep.equal({ prompt_tokens: 9, completion_tokens: 9 });
    expect(engine.calls.at(-1)).to.include({ kind: "generate", cancelled: false });

    const capped = await collect(
      client.generate({ model: "upper", version: "v1", request: { id: "g2", prompt: "one two three four", parameters: { max_tokens: 2 } } }),
    );
    expect(capped.map((c) => c.text)).to.deep.equal(["ONE ", "TWO ", ""]);
    expect(capped[2]!.final?.output?.text).to.equal("ONE TWO ");
    expect(capped[2]!.final?.usage?.completion_tokens).to.equal(2);
  });

  it("ends a generation that fails on its own with an error result", async () => {
    const { client } = await startWorker({ ttft_ms: 0, token_interval_ms: 0 });
    const chunks = await collect(
      client.generate({ model: "echo", version: "v1", request: { id: "g", prompt: "p", parameters: { simulate_error: "RESOURCE_EXHAUSTED" } } }),
    );
    expect(chunks).to.have.length(1);
    expect(chunks[0]!.final?.status).to.equal("error");
    expect(chunks[0]!.final?.error?.code).to.equal("RESOURCE_EXHAUSTED");
  });

  it("cancels the engine's generation when the client leaves the loop, before it produces another chunk", async () => {
    // The engine stalls after two tokens: the generation can only end by the cancel.
    const { client, engine } = await startWorker({ ttft_ms: 5, token_interval_ms: 5, stall_after_tokens: 2 });
    const prompt = Array.from({ length: 50 }, (_, i) => `w${i}`).join(" ");
    const got: string[] = [];
    for await (const c of client.generate({ model: "echo", version: "v1", request: { id: "gc", prompt } })) {
      got.push(c.text);
      if (got.length === 2) break;
    }
    expect(got).to.deep.equal(["w0 ", "w1 "]);
    await waitFor("the engine to stop the generation", () => engine.counters.cancelledGenerations === 1);
    expect(engine.counters.currentGenerations).to.equal(0);
    const call = engine.calls.find((c) => c.kind === "generate" && c.ids.includes("gc"));
    expect(call?.cancelled).to.equal(true);
    // Nothing was produced after the chunks the client had read.
    expect(call?.tokens).to.equal(2);
  });

  it("lets calls in flight finish on a graceful stop", async () => {
    const { client, server, engine } = await startWorker({ base_ms: 150, per_item_ms: 0 });
    const arrived = countArrivals(engine);
    const call = client.infer({ model: "echo", version: "v1", requests: [{ id: "last", prompt: "finish me" }] });
    await waitFor("the call to reach the engine", () => arrived() === 1);
    const stopped = server.stop();
    const res = await call;
    expect(res.results[0]!.output?.text).to.equal("finish me");
    await stopped;
    const err = await rejectionOf(client.infer({ model: "echo", version: "v1", requests: [{ id: "x", prompt: "p" }] }));
    expect((err as WorkerCallError).code).to.equal("UNAVAILABLE");
  });

  it("hands the trace context of a call to the onCall hook and the engine", async () => {
    const engine = new SimulatedEngine({ base_ms: 0, per_item_ms: 0 });
    const seen: Array<string | undefined> = [];
    const server = await WorkerServer.start({ engine, onCall: (ctx) => seen.push(ctx.traceparent) });
    const client = new WorkerClient(server.endpoint);
    cleanups.push(async () => {
      client.close();
      await server.stop();
      await engine.close();
    });
    const traced: string[] = [];
    const infer = engine.infer.bind(engine);
    engine.infer = (batch, signal) => {
      traced.push(batch.traceparent ?? "");
      return infer(batch, signal);
    };
    const traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    await client.infer({ model: "echo", version: "v1", requests: [{ id: "t", prompt: "p" }] }, { traceparent });
    await client.infer({ model: "echo", version: "v1", requests: [{ id: "u", prompt: "p" }] });
    expect(seen).to.deep.equal([traceparent, undefined]);
    expect(traced).to.deep.equal([traceparent, ""]);
  });

  it("stops gracefully with a Watch open, without waiting out its grace period, and stop/kill are safe to repeat", async () => {
    // A grace period longer than the test's timeout: a stop that waited for it would fail the test.
    const { client, server } = await startWorker({}, { stopGraceMs: 10 * 60_000 });
    const seen: string[] = [];
    const watching = (async () => {
      for await (const s of client.watch()) seen.push(s);
    })();
    await waitFor("the first status", () => seen.length === 1);
    await Promise.all([server.stop(), server.stop()]);
    // The Watch ended cleanly (a forced shutdown would have broken it with an error).
    await watching;
    expect(seen).to.deep.equal(["SERVING", "NOT_SERVING"]);
    server.kill();
    await server.stop();
  });
});
