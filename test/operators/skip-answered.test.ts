import { expect } from "chai";
import { from, lastValueFrom, toArray } from "rxjs";
import { skipAnswered } from "../../operators/skip-answered.js";
import { isOutcome } from "../../operators/outcome.js";
import type { InferJob, InferResult, Outcome } from "../../operators/types.js";
import { inertDelivery } from "../support/deliveries.js";

const job = (id: string, deliveryCount: number): InferJob => ({ id, tenant: "acme", model: "m", priority: "normal", prompt: id, stream: false, delivery: inertDelivery({ deliveryCount }) });
const stored = (id: string): InferResult => ({ id, status: "ok", model: "m", version: "v1", output: { text: `stored ${id}` } });

function run(jobs: InferJob[], lookup: (j: InferJob) => Promise<InferResult | undefined>): Promise<Array<InferJob | Outcome>> {
  return lastValueFrom(from(jobs).pipe(skipAnswered(lookup, { now: () => 42 }), toArray()));
}

describe("skipAnswered", () => {
  it("never looks up a first delivery and passes first deliveries through in order", async () => {
    const asked: string[] = [];
    const jobs = [job("a", 1), job("b", 1), job("c", 1)];
    const out = await run(jobs, async (j) => {
      asked.push(j.id);
      return stored(j.id);
    });
    expect(asked).to.deep.equal([]);
    expect(out).to.deep.equal(jobs);
  });

  it("answers a redelivery whose result is stored from the store, once, and marks it already stored", async () => {
    const asked: string[] = [];
    const out = await run([job("a", 1), job("b", 2)], async (j) => {
      asked.push(j.id);
      return stored(j.id);
    });
    expect(asked).to.deep.equal(["b"]);
    const b = out.find((x) => isOutcome(x)) as Extract<Outcome, { kind: "result" }>;
    expect(b.kind).to.equal("result");
    expect(b.alreadyStored).to.equal(true);
    expect(b.result).to.deep.equal(stored("b"));
    expect(out.filter((x) => !isOutcome(x)).map((x) => (x as InferJob).id)).to.deep.equal(["a"]);
  });

  it("lets a redelivery without a stored result go on, noting when it was looked up", async () => {
    const out = await run([job("b", 3)], async () => undefined);
    expect(out).to.have.length(1);
    expect(isOutcome(out[0]!)).to.equal(false);
    expect((out[0] as InferJob).storedCheckedAtMs).to.equal(42);
  });

  it("lets a redelivery go on when the lookup fails (it is checked again before publishing)", async () => {
    const out = await run([job("b", 2)], () => Promise.reject(new Error("store unavailable")));
    expect(isOutcome(out[0]!)).to.equal(false);
    expect((out[0] as InferJob).storedCheckedAtMs).to.equal(undefined);
  });
});
