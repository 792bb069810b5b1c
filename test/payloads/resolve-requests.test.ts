/**
 * The pipeline's step that reads request bodies from the object store: inline requests pass,
 * references become bodies within the byte bound, a store that does not answer puts the request
 * back until its last delivery (then UNAVAILABLE), a bad object is INVALID_ARGUMENT.
 */
import { expect } from "chai";
import { firstValueFrom, from, lastValueFrom, toArray } from "rxjs";
import { decodeDelivery } from "../../operators/decode-request.js";
import type { Delivery } from "../../operators/types.js";
import { ByteGate } from "../../pipeline/payloads/byte-gate.js";
import { PayloadError } from "../../pipeline/payloads/errors.js";
import { resolveRequestBodies, type ReadBody } from "../../pipeline/payloads/resolve-requests.js";

const enc = new TextEncoder();

interface FakeDelivery extends Delivery {
  settledAs: string[];
}

function delivery(headers: Record<string, string>, data = new Uint8Array(0), deliveryCount = 1): FakeDelivery {
  const settledAs: string[] = [];
  return {
    subject: "infer.req.normal.acme.echo",
    data,
    seq: 7,
    deliveryCount,
    storedAtMs: Date.now(),
    pulledAtMs: Date.now(),
    get settled() {
      return settledAs.length > 0;
    },
    header: (n) => Object.entries(headers).find(([k]) => k.toLowerCase() === n.toLowerCase())?.[1],
    headerEntries: () => Object.entries(headers),
    ack: () => void settledAs.push("ack"),
    nak: (ms?: number) => void settledAs.push(`nak:${ms ?? 0}`),
    term: () => void settledAs.push("term"),
    working: () => undefined,
    settledAs,
  };
}

const ref = (id: string, size = 20): Record<string, string> => ({ "Nats-Msg-Id": id, "Infer-Body-Ref": `req/${id}`, "Infer-Body-Size": String(size) });

function step(read: ReadBody, gate = new ByteGate(1000)) {
  return resolveRequestBodies({ read, gate, maxDeliver: 3, retryDelayMs: (n) => 100 * n });
}

describe("resolveRequestBodies", () => {
  it("passes an inline request as it is, and reads a referenced body into the delivery (the stream's body kept as wireData)", async () => {
    const body = enc.encode(JSON.stringify({ prompt: "from the store" }));
    const reads: string[] = [];
    const inline = delivery({ "Nats-Msg-Id": "a" }, enc.encode(JSON.stringify({ prompt: "inline" })));
    const referenced = delivery(ref("b", body.length));
    const gate = new ByteGate(1000);
    const out = await lastValueFrom(
      from([inline, referenced]).pipe(
        step(async (tenant, key) => (reads.push(`${tenant}/${key}`), body), gate),
        toArray(),
      ),
    );
    expect(out[0]).to.equal(inline);
    expect(reads).to.deep.equal(["acme/req/b"]);
    const resolved = out[1]!;
    expect(resolved.data).to.equal(body);
    expect(resolved.wireData).to.equal(referenced.data);
    expect(gate.heldBytes).to.equal(body.length);
    const job = decodeDelivery(resolved);
    expect(job.ok && job.job.prompt).to.equal("from the store");
    resolved.ack();
    expect(referenced.settledAs).to.deep.equal(["ack"]);
    expect(gate.heldBytes, "settling gives the bytes back").to.equal(0);
  });

  it("waits for room in the byte bound before reading", async () => {
    const gate = new ByteGate(30);
    const held = await gate.reserve(25);
    let reads = 0;
    const p = firstValueFrom(from([delivery(ref("c", 20))]).pipe(step(async () => (reads++, enc.encode('{"prompt":"x"}')), gate)));
    await new Promise((r) => setImmediate(r));
    expect(reads, "no read while the bound is full").to.equal(0);
    held();
    await p;
    expect(reads).to.equal(1);
  });

  it("puts a request back with a delay while the store does not answer, and answers UNAVAILABLE on its last delivery", async () => {
    const unavailable: ReadBody = () => Promise.reject(new PayloadError("UNAVAILABLE", "object store infer_payloads_acme did not answer: timeout"));
    const early = delivery(ref("d"), new Uint8Array(0), 2);
    const out = await lastValueFrom(from([early]).pipe(step(unavailable), toArray()));
    expect(out).to.deep.equal([]);
    expect(early.settledAs).to.deep.equal(["nak:200"]);

    const last = delivery(ref("e"), new Uint8Array(0), 3);
    const [answered] = await lastValueFrom(from([last]).pipe(step(unavailable), toArray()));
    expect(last.settledAs).to.deep.equal([]);
    const decoded = decodeDelivery(answered!);
    expect(decoded.ok).to.equal(false);
    if (!decoded.ok && decoded.outcome.kind === "result") {
      expect(decoded.outcome.result.error).to.deep.equal({ code: "UNAVAILABLE", message: "object store infer_payloads_acme did not answer: timeout" });
    } else expect.fail("expected a result outcome");
  });

  it("answers a missing or corrupt object, or a reference that is not the request's own, INVALID_ARGUMENT with the reason", async () => {
    const missing: ReadBody = () => Promise.reject(new PayloadError("INVALID_ARGUMENT", "the body's object req/f is not in object store infer_payloads_acme"));
    const foreign = delivery({ ...ref("g"), "Infer-Body-Ref": "req/someone-else" });
    let reads = 0;
    const out = await lastValueFrom(
      from([delivery(ref("f")), foreign]).pipe(
        step((t, k, dg) => (reads++, missing(t, k, dg))),
        toArray(),
      ),
    );
    const codes = out.map((d) => {
      const r = decodeDelivery(d);
      return !r.ok && r.outcome.kind === "result" ? `${r.outcome.result.error?.code}: ${r.outcome.result.error?.message}` : "ok";
    });
    expect(codes).to.have.members([
      "INVALID_ARGUMENT: the body's object req/f is not in object store infer_payloads_acme",
      "INVALID_ARGUMENT: header Infer-Body-Ref 'req/someone-else' is not this request's object 'req/g'",
    ]);
    expect(reads, "a foreign reference is never read").to.equal(1);
  });
});
