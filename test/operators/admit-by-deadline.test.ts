import { expect } from "chai";
import { lastValueFrom, of, toArray } from "rxjs";
import { TestScheduler } from "rxjs/testing";
import { admitByDeadline } from "../../operators/admit-by-deadline.js";
import { isOutcome } from "../../operators/outcome.js";
import { errorResult, type InferJob, type Outcome } from "../../operators/types.js";
import { inertDelivery } from "../support/deliveries.js";

const delivery = inertDelivery();

function job(id: string, deadlineMs?: number): InferJob {
  const j: InferJob = { id, tenant: "acme", model: "m", priority: "normal", prompt: id, stream: false, delivery };
  return deadlineMs === undefined ? j : { ...j, deadlineMs };
}

function expired(j: InferJob): Outcome {
  const msg = `deadline ${new Date(j.deadlineMs!).toISOString()} passed before the request was served`;
  return { kind: "result", job: j, result: errorResult(j, "DEADLINE_EXCEEDED", msg) };
}

describe("admitByDeadline", () => {
  let ts: TestScheduler;
  beforeEach(() => {
    ts = new TestScheduler((actual, expected) => {
      expect(actual).to.deep.equal(expected);
    });
  });

  it("passes jobs without a deadline and jobs before their deadline unchanged", () => {
    ts.run(({ cold, expectObservable }) => {
      const a = job("a");
      const b = job("b", 10);
      const source = cold("-a-b-|", { a, b });
      expectObservable(source.pipe(admitByDeadline({ now: () => ts.now() }))).toBe("-a-b-|", { a, b });
    });
  });

  it("answers a job whose deadline passed with DEADLINE_EXCEEDED, and lets the next one on", () => {
    ts.run(({ cold, expectObservable }) => {
      const a = job("a", 100);
      const b = job("b", 2);
      const c = job("c");
      const source = cold("-a-b-c|", { a, b, c });
      expectObservable(source.pipe(admitByDeadline({ now: () => ts.now() }))).toBe("-a-B-c|", { a, B: expired(b), c });
    });
  });

  it("treats the deadline instant itself as passed", () => {
    ts.run(({ cold, expectObservable }) => {
      // Same deadline (3): alive at 2, answered at 3.
      const early = job("early", 3);
      const onTime = job("on-time", 3);
      const source = cold("--eo-|", { e: early, o: onTime });
      expectObservable(source.pipe(admitByDeadline({ now: () => ts.now() }))).toBe("--eO-|", { e: early, O: expired(onTime) });
    });
  });

  it("passes the very same job object through (no copy)", () => {
    const a = job("a", Date.now() + 60_000);
    let seen: InferJob | Outcome | undefined;
    of(a)
      .pipe(admitByDeadline())
      .subscribe((x) => (seen = x));
    expect(seen).to.equal(a);
  });

  it("uses the wall clock by default", async () => {
    const past = job("past", Date.now() - 1);
    const future = job("future", Date.now() + 60_000);
    const out = await lastValueFrom(of(past, future).pipe(admitByDeadline(), toArray()));
    const summary = out.map((x) => (!isOutcome(x) ? x.id : x.kind === "result" ? x.result.error?.code : x.kind));
    expect(summary).to.deep.equal(["DEADLINE_EXCEEDED", "future"]);
  });

  it("forwards an error of the source", () => {
    ts.run(({ cold, expectObservable, expectSubscriptions }) => {
      const a = job("a");
      const source = cold("-a-#", { a }, new Error("upstream"));
      expectObservable(source.pipe(admitByDeadline())).toBe("-a-#", { a }, new Error("upstream"));
      expectSubscriptions(source.subscriptions).toBe("^--!");
    });
  });

  it("unsubscribes from the source when unsubscribed", () => {
    ts.run(({ cold, expectObservable, expectSubscriptions }) => {
      const a = job("a");
      const source = cold("-a-a-a-|", { a });
      expectObservable(source.pipe(admitByDeadline()), "^--!").toBe("-a-", { a });
      expectSubscriptions(source.subscriptions).toBe("^--!");
    });
  });
});
