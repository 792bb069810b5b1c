/**
 * Two pipeline processes share the work while tenants come and go (a flood that gets a lane,
 * many small tenants, a trickle), and one is SIGKILLed in the middle: every request is answered
 * exactly once, and the lanes are gone once everything is drained.
 */
import { expect } from "chai";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { PRIORITIES, STREAM_REQUESTS } from "../../proto/wire.js";
import { useNats, waitFor } from "../support/nats.js";
import { countResults, useCrashStack } from "../support/crash.js";

describe("intake: two pipelines, tenants coming and going, a SIGKILL", function () {
  this.timeout(300_000);
  const nats = useNats();
  const { serve } = useCrashStack(nats, {
    device: { base_ms: 2, per_item_ms: 0.1 },
    batch: { max_size: 16, max_delay_ms: 2 },
    config: {
      consumer: { ackWaitMs: 3_000, maxAckPending: 4_096 },
      pipeline: { maxInFlight: 128, retryBaseMs: 50, retryMaxMs: 500, pullExpiresMs: 1_000 },
    },
  });

  it("answers every request exactly once, and leaves one consumer per priority", async () => {
    const js = jetstream(nats.nc);
    const jsm = await jetstreamManager(nats.nc);
    const { seen } = countResults(nats.nc, "infer.res.>");
    await nats.nc.flush();
    const a = serve();
    const b = serve();
    await a.waitFor(/ready/);
    await b.waitFor(/ready/);

    const body = new TextEncoder().encode(JSON.stringify({ prompt: "p" }));
    const ids: string[] = [];
    const inflight = new Set<Promise<unknown>>();
    const send = async (tenant: string, id: string): Promise<void> => {
      ids.push(id);
      const h = natsHeaders();
      h.set("Content-Type", "application/json");
      const p = js.publish(`infer.req.normal.${tenant}.echo`, body, { msgID: id, headers: h }).finally(() => inflight.delete(p));
      inflight.add(p);
      if (inflight.size >= 500) await Promise.race(inflight);
    };
    // A tenant served lately (a flood gets a lane only beside others), then a flood, then many
    // small tenants and a trickle, in waves, while the first pipeline dies.
    await send("trickle", "warm");
    await waitFor("the warm-up answered", () => seen.has("warm"));
    for (let i = 0; i < 4_000; i++) await send("flood", `f${i}`);
    let lanesSeen = 0;
    for (let wave = 0; wave < 6; wave++) {
      for (let i = 0; i < 300; i++) await send(`w${wave}t${i % 100}`, `w${wave}-${i}`);
      await send("trickle", `t${wave}`);
      for await (const ci of jsm.consumers.list(STREAM_REQUESTS)) if (ci.name.includes("-lane-")) lanesSeen++;
      if (wave === 2) {
        a.kill("SIGKILL");
        expect(await a.exited).to.equal("SIGKILL");
      }
      if (wave === 3) await serve().waitFor(/ready/);
      await new Promise((r) => setTimeout(r, 300));
    }
    await Promise.all(inflight);
    await waitFor(`all ${ids.length} answered (have ${seen.size})`, () => ids.every((id) => seen.has(id)), 240_000, 100);
    await new Promise((r) => setTimeout(r, 1_000));
    const twice = ids.filter((id) => seen.get(id)! > 1);
    expect(twice, "answered more than once").to.deep.equal([]);
    expect(lanesSeen, "the flood had a lane").to.be.greaterThan(0);
    // Lanes left by the killed process are closed by the others once drained.
    await waitFor(
      "one consumer per priority",
      async () => {
        let n = 0;
        for await (const _ of jsm.consumers.list(STREAM_REQUESTS)) n++;
        return n === PRIORITIES.length;
      },
      60_000,
      250,
    );
  });
});
