import { expect } from "chai";
import { throwError, type Observable } from "rxjs";
import { TestScheduler } from "rxjs/testing";
import { answerFromCache, cachedResult, type CachedAnswers } from "../../operators/answer-from-cache.js";
import type { InferResult, Outcome, RoutedJob } from "../../operators/types.js";
import { inertDelivery } from "../support/deliveries.js";

const delivery = inertDelivery();

const job = (id: string, extra: Partial<RoutedJob> = {}): RoutedJob => ({ id, tenant: "acme", model: "m", version: "v1", priority: "normal", prompt: id, stream: false, delivery, ...extra });
const stored: InferResult = { id: "", status: "ok", output: { text: "cached" }, usage: { prompt_tokens: 3, completion_tokens: 5 } };

describe("answerFromCache", () => {
  let ts: TestScheduler;
  beforeEach(() => {
    ts = new TestScheduler((actual, expected) => {
      expect(actual).to.deep.equal(expected);
    });
  });

  /** A cache where prompts starting with "hit" are stored, "skip" are not cacheable; lookups take `lookup` frames. */
  function cache(lookup: (key: string) => Observable<InferResult | undefined>, asked: string[]): CachedAnswers<RoutedJob> {
    return {
      keyOf: (j) => (j.prompt!.startsWith("skip") ? undefined : `k-${j.id}`),
      get: (key) => {
        asked.push(key);
        return lookup(key);
      },
    };
  }

  it("answers a cached request from the cache, marked as a hit, without passing it on", () => {
    ts.run(({ cold, expectObservable }) => {
      const asked: string[] = [];
      const a = job("hit-a");
      const out: Outcome = { kind: "result", job: a, result: cachedResult(a, stored, 2) };
      const c = cache(() => cold("-(s|)", { s: stored }), asked);
      expectObservable(cold("-a|", { a }).pipe(answerFromCache(c, { now: () => ts.now() }))).toBe("--(A|)", { A: out });
      ts.flush();
      expect(asked).to.deep.equal(["k-hit-a"]);
      expect(out.kind === "result" && out.result.timing).to.deep.equal({ queue_ms: 2, batch_size: 0, worker_ms: 0, total_ms: 2, cache: "hit" });
      expect(out.kind === "result" && out.result.id).to.equal("hit-a");
      expect(out.kind === "result" && out.result.output).to.deep.equal({ text: "cached" });
    });
  });

  it("lets a request that may not be cached pass at once, untouched and never looked up", () => {
    ts.run(({ cold, expectObservable }) => {
      const asked: string[] = [];
      const a = job("skip-a");
      const c = cache(() => cold("-(s|)", { s: stored }), asked);
      expectObservable(cold("-a|", { a }).pipe(answerFromCache(c))).toBe("-a|", { a });
      ts.flush();
      expect(asked).to.deep.equal([]);
    });
  });

  it("passes a miss on carrying its cache key, after the lookup", () => {
    ts.run(({ cold, expectObservable }) => {
      const a = job("miss-a");
      const c = cache(() => cold("--(u|)", { u: undefined }), []);
      expectObservable(cold("a|", { a }).pipe(answerFromCache(c))).toBe("--(b|)", { b: { ...a, cacheKey: "k-miss-a" } });
    });
  });

  it("treats a failed lookup as a miss (the request runs)", () => {
    ts.run(({ cold, expectObservable }) => {
      const a = job("fail-a");
      const c = cache(() => throwError(() => new Error("bucket unavailable")), []);
      expectObservable(cold("a|", { a }).pipe(answerFromCache(c))).toBe("b|", { b: { ...a, cacheKey: "k-fail-a" } });
    });
  });

  it("never looks up a shadow copy or a streamed request", () => {
    ts.run(({ cold, expectObservable }) => {
      const asked: string[] = [];
      const s = job("hit-s", { shadow: true });
      const t = job("hit-t", { stream: true });
      const c = cache(() => cold("(s|)", { s: stored }), asked);
      expectObservable(cold("st|", { s, t }).pipe(answerFromCache(c))).toBe("st|", { s, t });
      ts.flush();
      expect(asked).to.deep.equal([]);
    });
  });

  it("does not wait for a slow lookup to let others on, and bounds the lookups under way", () => {
    ts.run(({ cold, expectObservable }) => {
      const a = job("miss-a");
      const b = job("skip-b");
      const d = job("miss-d");
      const c = cache(() => cold("---(u|)", { u: undefined }), []);
      // concurrency 1: d's lookup starts when a's ends (frame 3) and ends at frame 6.
      expectObservable(cold("abd|", { a, b, d }).pipe(answerFromCache(c, { concurrency: 1 }))).toBe("-b-A--(D|)", {
        b,
        A: { ...a, cacheKey: "k-miss-a" },
        D: { ...d, cacheKey: "k-miss-d" },
      });
    });
  });

  it("cancels a lookup under way when unsubscribed", () => {
    ts.run(({ cold, hot, expectObservable, expectSubscriptions }) => {
      const a = job("miss-a");
      const lookup = cold("-----(u|)", { u: undefined });
      const c = cache(() => lookup, []);
      expectObservable(hot("a", { a }).pipe(answerFromCache(c)), "^--!").toBe("---");
      expectSubscriptions(lookup.subscriptions).toBe("^--!");
    });
  });
});
