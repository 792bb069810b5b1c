import { expect } from "chai";
import { throwError, type Observable } from "rxjs";
import { TestScheduler } from "rxjs/testing";
import { storeInCache, type AnswerStore } from "../../operators/store-in-cache.js";
import { errorResult, type InferResult, type Outcome, type RoutedJob } from "../../operators/types.js";
import { inertDelivery } from "../support/deliveries.js";

const delivery = inertDelivery();

const job = (id: string, extra: Partial<RoutedJob> = {}): RoutedJob => ({ id, tenant: "acme", model: "m", version: "v1", priority: "normal", prompt: id, stream: false, delivery, ...extra });
const timing = { queue_ms: 1, batch_size: 4, worker_ms: 2, total_ms: 3 };
const ok = (j: RoutedJob): Outcome => ({ kind: "result", job: j, result: { id: j.id, status: "ok", model: "m", version: "v1", output: { text: j.id }, timing } });
const missed = (o: Outcome): Outcome => (o.kind === "result" ? { ...o, result: { ...o.result, timing: { ...o.result.timing!, cache: "miss" } } } : o);

describe("storeInCache", () => {
  let ts: TestScheduler;
  beforeEach(() => {
    ts = new TestScheduler((actual, expected) => {
      expect(actual).to.deep.equal(expected);
    });
  });

  function store(done: () => Observable<unknown>, puts: Array<[string, InferResult]>): AnswerStore {
    return {
      put: (key, result) => {
        puts.push([key, result]);
        return done();
      },
    };
  }

  it("stores the ok result of a looked-up request under its key, then lets it on marked as a miss", () => {
    ts.run(({ cold, expectObservable }) => {
      const puts: Array<[string, InferResult]> = [];
      const a = ok(job("a", { cacheKey: "k-a" }));
      expectObservable(cold("a|", { a }).pipe(storeInCache(store(() => cold("--(x|)", { x: true }), puts)))).toBe("--(A|)", { A: missed(a) });
      ts.flush();
      expect(puts).to.deep.equal([["k-a", a.kind === "result" ? a.result : undefined]]);
    });
  });

  it("lets everything else on at once and unchanged, storing nothing: no key, errors (marked), retries, stored answers, shadows", () => {
    ts.run(({ cold, expectObservable }) => {
      const puts: Array<[string, InferResult]> = [];
      const plain = ok(job("p"));
      const e = job("e", { cacheKey: "k-e" });
      const err: Outcome = { kind: "result", job: e, result: { ...errorResult(e, "INTERNAL", "boom"), timing } };
      const retry: Outcome = { kind: "retry", job: job("r", { cacheKey: "k-r" }), delayMs: 10, lastResort: errorResult(job("r"), "UNAVAILABLE", "x") };
      const again: Outcome = { ...ok(job("s", { cacheKey: "k-s" })), alreadyStored: true } as Outcome;
      const shadow = ok(job("h", { cacheKey: "k-h", shadow: true }));
      const values = { p: plain, e: err, r: retry, s: again, h: shadow };
      expectObservable(cold("persh|", values).pipe(storeInCache(store(() => cold("-(x|)", { x: true }), puts)))).toBe("persh|", {
        ...values,
        e: missed(err),
      });
      ts.flush();
      expect(puts).to.deep.equal([]);
    });
  });

  it("lets the outcome on when the store fails (the answer goes out all the same)", () => {
    ts.run(({ cold, expectObservable }) => {
      const a = ok(job("a", { cacheKey: "k-a" }));
      expectObservable(cold("a|", { a }).pipe(storeInCache(store(() => throwError(() => new Error("bucket full")), [])))).toBe("a|", { a: missed(a) });
    });
  });

  it("emits each outcome once whatever the store emits, and nothing waits behind a slow store", () => {
    ts.run(({ cold, expectObservable }) => {
      const a = ok(job("a", { cacheKey: "k-a" }));
      const b = ok(job("b"));
      expectObservable(cold("ab|", { a, b }).pipe(storeInCache(store(() => cold("-xyz|", { x: 1, y: 2, z: 3 }), [])))).toBe("-b--(A|)", { A: missed(a), b });
    });
  });

  it("cancels a store under way when unsubscribed", () => {
    ts.run(({ cold, hot, expectObservable, expectSubscriptions }) => {
      const a = ok(job("a", { cacheKey: "k-a" }));
      const put = cold("-----(x|)", { x: true });
      expectObservable(hot("a", { a }).pipe(storeInCache(store(() => put, []))), "^--!").toBe("---");
      expectSubscriptions(put.subscriptions).toBe("^--!");
    });
  });
});
