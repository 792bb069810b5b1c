import { headers as natsHeaders } from "@nats-io/transport-node";
import { expect } from "chai";
import { headerValue, MAX_HEADER_VALUE, sanitizeHeader } from "../../../pipeline/support/headers.js";

describe("headerValue", () => {
  it("finds a NATS header by any case, first value", () => {
    const h = natsHeaders();
    h.append("Infer-Version", "v2");
    h.append("Infer-Version", "v3");
    expect(headerValue(h, "infer-version")).to.equal("v2");
    expect(headerValue(h, "INFER-VERSION")).to.equal("v2");
    expect(headerValue(h, "Infer-Deadline")).to.equal(undefined);
  });

  it("reads recorded pairs, and nothing from no headers", () => {
    expect(headerValue([["Nats-Msg-Id", "a"], ["nats-msg-id", "b"]], "NATS-MSG-ID")).to.equal("a");
    expect(headerValue(undefined, "x")).to.equal(undefined);
  });
});

describe("sanitizeHeader", () => {
  it("makes one printable line, cut to the longest value", () => {
    expect(sanitizeHeader("a\r\nb\u0000\u0007c\u007f")).to.equal("a b c ");
    expect(sanitizeHeader("x".repeat(5_000))).to.have.length(MAX_HEADER_VALUE);
  });
});
