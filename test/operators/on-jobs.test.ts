import { expect } from "chai";
import { delay, filter, map, of, take, type OperatorFunction } from "rxjs";
import { TestScheduler } from "rxjs/testing";
import { onJobs } from "../../operators/on-jobs.js";
import { errorResult, type InferJob, type Outcome } from "../../operators/types.js";
import { inertDelivery } from "../support/deliveries.js";

const delivery = inertDelivery();

function job(id: string): InferJob {
  return { id, tenant: "acme", model: "m", priority: "normal", prompt: id, stream: false, delivery };
}

function answered(id: string): Outcome {
  const j = job(id);
  return { kind: "result", job: j, result: errorResult(j, "NOT_FOUND", "no such model") };
}

/** The op under test: stamps a version, so a job that went through it is recognisable. */
const stamp: OperatorFunction<InferJob, InferJob> = map((j) => ({ ...j, version: "v1" }));

describe("onJobs", () => {
  let ts: TestScheduler;
  beforeEach(() => {
    ts = new TestScheduler((actual, expected) => {
      expect(actual).to.deep.equal(expected);
    });
  });

  const a = job("a");
  const b = job("b");
  const x = answered("x");
  const A = { ...a, version: "v1" };
  const B = { ...b, version: "v1" };

  it("applies op to jobs and lets outcomes pass around it, in order", () => {
    ts.run(({ cold, expectObservable, expectSubscriptions }) => {
      const source = cold<InferJob | Outcome>("-a-x-b-|", { a, b, x });
      expectObservable(source.pipe(onJobs(stamp))).toBe("-A-x-B-|", { A, B, x });
      // One subscription to the source, shared by both branches.
      expectSubscriptions(source.subscriptions).toBe("^------!");
    });
  });

  it("never shows an outcome to op", () => {
    ts.run(({ cold, expectObservable, flush }) => {
      const seen: string[] = [];
      const source = cold<InferJob | Outcome>("-a-x-b-|", { a, b, x });
      const spy: OperatorFunction<InferJob, InferJob> = map((j) => {
        seen.push(j.id);
        return j;
      });
      expectObservable(source.pipe(onJobs(spy))).toBe("-a-x-b-|", { a, b, x });
      flush();
      expect(seen).to.deep.equal(["a", "b"]);
    });
  });

  it("does not hold outcomes back behind a slow op", () => {
    ts.run(({ cold, expectObservable }) => {
      const source = cold<InferJob | Outcome>("-a-x-b-|", { a, b, x });
      const slow: OperatorFunction<InferJob, InferJob> = (s) => s.pipe(stamp, delay(5));
      // x leaves at 3; a and b leave 5 frames after they came; completion waits for the op.
      expectObservable(source.pipe(onJobs(slow))).toBe("---x--A---(B|)", { A, B, x });
    });
  });

  it("lets op drop jobs (filter) without touching outcomes", () => {
    ts.run(({ cold, expectObservable }) => {
      const source = cold<InferJob | Outcome>("-a-x-b-|", { a, b, x });
      const dropA: OperatorFunction<InferJob, InferJob> = filter((j) => j.id !== "a");
      expectObservable(source.pipe(onJobs(dropA))).toBe("---x-b-|", { b, x });
    });
  });

  it("loses nothing from a source that emits synchronously on subscribe", () => {
    ts.run(({ expectObservable }) => {
      // Both branches must be subscribed before the source starts, or the first branch
      // would see every value and the jobs branch none of them.
      const items: Array<InferJob | Outcome> = [a, x, b];
      const source = of(...items);
      expectObservable(source.pipe(onJobs(stamp))).toBe("(AxB|)", { A, B, x });
    });
  });

  it("forwards an error of the source once, and unsubscribes from it", () => {
    ts.run(({ cold, expectObservable, expectSubscriptions }) => {
      const source = cold<InferJob | Outcome>("-a-x-#", { a, x }, new Error("boom"));
      expectObservable(source.pipe(onJobs(stamp))).toBe("-A-x-#", { A, x }, new Error("boom"));
      expectSubscriptions(source.subscriptions).toBe("^----!");
    });
  });

  it("forwards an error raised by op", () => {
    ts.run(({ cold, expectObservable, expectSubscriptions }) => {
      const source = cold<InferJob | Outcome>("-a-x-b-|", { a, b, x });
      const failOnB: OperatorFunction<InferJob, InferJob> = map((j) => {
        if (j.id === "b") throw new Error("op failed");
        return j;
      });
      expectObservable(source.pipe(onJobs(failOnB))).toBe("-a-x-#", { a, x }, new Error("op failed"));
      expectSubscriptions(source.subscriptions).toBe("^----!");
    });
  });

  it("keeps passing outcomes after op completes early", () => {
    ts.run(({ cold, expectObservable }) => {
      const source = cold<InferJob | Outcome>("-a-x-b-x-|", { a, b, x });
      const first: OperatorFunction<InferJob, InferJob> = (s) => s.pipe(stamp, take(1));
      expectObservable(source.pipe(onJobs(first))).toBe("-A-x---x-|", { A, x });
    });
  });

  it("unsubscribes from the source when unsubscribed", () => {
    ts.run(({ cold, expectObservable, expectSubscriptions }) => {
      const source = cold<InferJob | Outcome>("-a-x-b-x-|", { a, b, x });
      expectObservable(source.pipe(onJobs(stamp)), "^----!").toBe("-A-x-", { A, x });
      expectSubscriptions(source.subscriptions).toBe("^----!");
    });
  });
});
