/**
 * Tenant lanes at low load: a lane that served a request lately keeps a standing pull for one
 * request while idle, so the tenant's next request is delivered straight from its lane, without
 * waiting for the discovery consumer; standing pulls never take more than their share of the
 * credits.
 */
import { expect } from "chai";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import type { Subscription } from "rxjs";
import { defaultConfig } from "../../pipeline/config.js";
import { ensureStreams } from "../../pipeline/intake/jetstream.js";
import { STREAM_REQUESTS } from "../../proto/wire.js";
import { discoveryName, ensureDiscoveryConsumers, laneName, tenantLaneSource } from "../../pipeline/intake/tenant-lanes.js";
import type { Delivery } from "../../operators/types.js";
import { useNats, waitFor } from "../support/nats.js";

describe("tenant lanes: standing pulls of idle lanes", function () {
  this.timeout(60_000);
  const nats = useNats();
  const consumer = defaultConfig().consumer;
  let sub: Subscription | undefined;
  const delivered: Delivery[] = [];
  let jsm: JetStreamManager;
  let n = 0;

  const publish = async (tenant: string): Promise<string> => {
    const id = `lane-${tenant}-${n++}`;
    const h = natsHeaders();
    h.set("Content-Type", "application/json");
    await jetstream(nats.nc).publish(`infer.req.normal.${tenant}.echo`, new TextEncoder().encode('{"prompt":"x"}'), { msgID: id, headers: h });
    return id;
  };
  const seen = (id: string): boolean => delivered.some((d) => d.header("Nats-Msg-Id") === id);
  const waitingOn = async (tenant: string): Promise<number> => (await jsm.consumers.info(STREAM_REQUESTS, laneName(consumer, "normal", tenant))).num_waiting;

  before(async () => {
    jsm = await jetstreamManager(nats.nc);
    await ensureStreams(jsm, defaultConfig().streams);
    await ensureDiscoveryConsumers(jsm, consumer, ["normal"]);
    sub = tenantLaneSource({
      js: jetstream(nats.nc),
      jsm,
      consumer,
      priorities: ["normal"],
      weights: { high: 8, normal: 4, low: 1 },
      // A quarter of 8 credits: at most 2 standing pulls.
      maxUnsettled: 8,
      expiresMs: 5_000,
      workingIntervalMs: 0,
      // No sweep during the test: deliveries come from pulls alone.
      sweepIntervalMs: 600_000,
    }).subscribe((d) => {
      delivered.push(d);
      d.ack();
    });
  });
  after(() => sub?.unsubscribe());

  it("keeps a standing pull on a lane that served lately, and delivers through it without discovery", async () => {
    const first = await publish("a");
    await waitFor("first request of tenant a", () => seen(first));
    await waitFor("a standing pull on a's lane", async () => (await waitingOn("a")) >= 1);

    // Without the discovery consumer, only the lane's own standing pull can deliver.
    await jsm.consumers.delete(STREAM_REQUESTS, discoveryName(consumer, "normal"));
    const second = await publish("a");
    await waitFor("second request of tenant a, through the standing pull", () => seen(second), 10_000);
    expect(delivered.filter((d) => d.header("Nats-Msg-Id") === second)).to.have.length(1);
    await ensureDiscoveryConsumers(jsm, consumer, ["normal"]);
  });

  it("holds no more standing pulls than their share of the credits", async () => {
    for (const t of ["b", "c", "d", "e"]) {
      const id = await publish(t);
      await waitFor(`request of tenant ${t}`, () => seen(id), 15_000);
    }
    // Every lane is idle now; each would like a standing pull, but 2 of 8 credits may stand: at
    // most 2 pulls (of one request each), or one of two.
    await new Promise((r) => setTimeout(r, 500));
    let standing = 0;
    for (const t of ["a", "b", "c", "d", "e"]) standing += await waitingOn(t);
    expect(standing).to.be.within(1, 2);
  });
});
