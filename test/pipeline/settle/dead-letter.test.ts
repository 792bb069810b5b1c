import { expect } from "chai";
import type { DeadLetter } from "../../../operators/settle-outcome.js";
import type { Delivery } from "../../../operators/types.js";
import { H, UNKNOWN_TOKEN } from "../../../proto/wire.js";
import { deadLetterHeaders, deadLetterTokens } from "../../../pipeline/settle/dead-letter.js";
import { inertDelivery } from "../../support/deliveries.js";

function delivery(headers: Array<[string, string]>): Delivery {
  return inertDelivery({
    subject: "infer.req.normal.acme.echo",
    data: new TextEncoder().encode("{}"),
    header: (name) => headers.find(([k]) => k.toLowerCase() === name.toLowerCase())?.[1],
    headerEntries: () => headers,
    seq: 42,
    deliveryCount: 3,
  });
}

const letter = (headers: Array<[string, string]>, extra: Partial<DeadLetter> = {}): DeadLetter => ({
  delivery: delivery(headers),
  tenant: "acme",
  model: "echo",
  error: { code: "UNAVAILABLE", message: "no worker\nat all" },
  ...extra,
});

describe("deadLetterHeaders", () => {
  it("copies the request's headers but its publish guards, and says why and where from", () => {
    const h = deadLetterHeaders(letter([["Nats-Msg-Id", "r1"], ["Nats-Expected-Stream", "INFER_REQ"], ["Infer-Version", "v2"]]));
    expect(h.get(H.version)).to.equal("v2");
    expect(h.has(H.msgId)).to.equal(false);
    expect(h.has("Nats-Expected-Stream")).to.equal(false);
    expect(h.get(H.requestId)).to.equal("r1");
    expect(h.get(H.originalSubject)).to.equal("infer.req.normal.acme.echo");
    expect(h.get(H.errorCode)).to.equal("UNAVAILABLE");
    expect(h.get(H.errorReason)).to.equal("no worker at all");
    expect(h.get(H.deliveries)).to.equal("3");
    expect(h.get(H.originalSeq)).to.equal("42");
    expect(h.has(H.bodyOmitted)).to.equal(false);
  });

  it("brief: copies none of the request's headers, cuts the id, and says where the request is", () => {
    const h = deadLetterHeaders(letter([["Nats-Msg-Id", "r".repeat(300)], ["Infer-Version", "v2"]]), { brief: true });
    expect(h.has(H.version)).to.equal(false);
    expect(h.get(H.requestId)).to.have.length(128);
    expect(h.get(H.bodyOmitted)).to.contain("INFER_REQ sequence 42");
    expect(h.get(H.errorCode)).to.equal("UNAVAILABLE");
  });
});

describe("deadLetterTokens", () => {
  it("keeps usable names and replaces the rest with the unknown token", () => {
    expect(deadLetterTokens(letter([]))).to.deep.equal({ tenant: "acme", model: "echo" });
    expect(deadLetterTokens(letter([], { tenant: "Bad.Tenant", model: undefined }))).to.deep.equal({ tenant: UNKNOWN_TOKEN, model: UNKNOWN_TOKEN });
  });
});
