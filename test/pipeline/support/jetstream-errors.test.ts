import { JetStreamApiError, jetstreamManager } from "@nats-io/jetstream";
import { expect } from "chai";
import { isJsApiError, JsApiCode } from "../../../pipeline/support/jetstream-errors.js";
import { useNats } from "../../support/nats.js";

describe("JetStream API error codes by name (against nats-server)", () => {
  const nats = useNats();

  it("names what the server answers: stream not found, consumer not found, name in use", async () => {
    const jsm = await jetstreamManager(nats.nc);
    const streamErr = await jsm.streams.info("NOPE").catch((e: unknown) => e);
    expect(isJsApiError(streamErr, JsApiCode.StreamNotFound)).to.equal(true);
    expect(isJsApiError(streamErr, JsApiCode.ConsumerNotFound)).to.equal(false);

    await jsm.streams.add({ name: "S", subjects: ["s.>"] });
    const consumerErr = await jsm.consumers.info("S", "nope").catch((e: unknown) => e);
    expect(isJsApiError(consumerErr, JsApiCode.ConsumerNotFound)).to.equal(true);

    const inUse = await jsm.streams.add({ name: "S", subjects: ["other.>"] }).catch((e: unknown) => e);
    expect(inUse).to.be.instanceOf(JetStreamApiError);
    expect(isJsApiError(inUse, JsApiCode.StreamNameInUse)).to.equal(true);
  });

  it("is false for anything that is not a JetStream API error", () => {
    expect(isJsApiError(new Error("x"), JsApiCode.StreamNotFound)).to.equal(false);
    expect(isJsApiError(undefined, JsApiCode.StreamNotFound)).to.equal(false);
  });
});
