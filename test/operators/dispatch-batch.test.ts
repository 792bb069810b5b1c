import { expect } from "chai";
import { lastValueFrom, of, toArray } from "rxjs";
import { TestScheduler } from "rxjs/testing";
import { DispatchError, dispatchBatch, type BatchDispatcher, type BatchReply, type ItemReply } from "../../operators/dispatch-batch.js";
import { retryDelayMs } from "../../operators/outcome.js";
import { errorResult, type Batch, type Delivery, type Outcome, type RoutedJob } from "../../operators/types.js";
import { inertDelivery } from "../support/deliveries.js";

// ---- a promise that settles in virtual time ----------------------------------------------------
//
// dispatchBatch awaits a Promise from the dispatcher. A native promise settles on the microtask
// queue, which a TestScheduler never reaches inside run(); this one runs its callbacks as soon
// as it is settled, so a worker reply scheduled at frame n is seen at frame n.

type Settlement<T> = { ok: true; value: T } | { ok: false; reason: unknown };

class VirtualPromise<T> implements Promise<T> {
  readonly [Symbol.toStringTag] = "VirtualPromise";
  private state: Settlement<T> | undefined;
  private readonly waiting: Array<(s: Settlement<T>) => void> = [];

  resolve(value: T): void {
    this.settle({ ok: true, value });
  }
  reject(reason: unknown): void {
    this.settle({ ok: false, reason });
  }
  private settle(s: Settlement<T>): void {
    if (this.state) return;
    this.state = s;
    for (const w of this.waiting.splice(0)) w(s);
  }

  then<R1 = T, R2 = never>(
    onfulfilled?: ((value: T) => R1 | PromiseLike<R1>) | null,
    onrejected?: ((reason: unknown) => R2 | PromiseLike<R2>) | null,
  ): Promise<R1 | R2> {
    const next = new VirtualPromise<R1 | R2>();
    const adopt = (x: R1 | R2 | PromiseLike<R1 | R2>): void => {
      if (typeof x === "object" && x !== null && "then" in x) {
        x.then(
          (v) => next.resolve(v),
          (e: unknown) => next.reject(e),
        );
      } else next.resolve(x);
    };
    const run = (s: Settlement<T>): void => {
      try {
        if (s.ok) {
          if (onfulfilled) adopt(onfulfilled(s.value));
          else next.resolve(s.value as unknown as R1);
        } else if (onrejected) adopt(onrejected(s.reason));
        else next.reject(s.reason);
      } catch (err) {
        next.reject(err);
      }
    };
    if (this.state) run(this.state);
    else this.waiting.push(run);
    return next;
  }
  catch<R = never>(onrejected?: ((reason: unknown) => R | PromiseLike<R>) | null): Promise<T | R> {
    return this.then(undefined, onrejected);
  }
  finally(onfinally?: (() => void) | null): Promise<T> {
    return this.then(
      (v) => {
        onfinally?.();
        return v;
      },
      (e: unknown) => {
        onfinally?.();
        throw e;
      },
    );
  }
}

// ---- jobs, batches and a scripted worker --------------------------------------------------------

const delivery = (deliveryCount = 1): Delivery => inertDelivery({ deliveryCount });

function job(id: string, opts: { deadlineMs?: number; deliveryCount?: number } = {}): RoutedJob {
  const j: RoutedJob = { id, tenant: "acme", model: "m", version: "v1", priority: "normal", prompt: id, stream: false, delivery: delivery(opts.deliveryCount) };
  return opts.deadlineMs === undefined ? j : { ...j, deadlineMs: opts.deadlineMs };
}

function batch(jobs: RoutedJob[], closedAtMs = 0): Batch {
  return { model: "m", version: "v1", key: "m@v1", jobs, closedAtMs };
}

const okItem = (id: string, text = `echo ${id}`): ItemReply => ({ id, status: "ok", output: { text }, usage: { prompt_tokens: 1, completion_tokens: 2 } });
const errItem = (id: string, code: string, message?: string): ItemReply => ({ id, status: "error", error: message === undefined ? null : { code, message } });

type Answer = { reply: BatchReply } | { error: unknown } | ((b: Batch) => BatchReply);

/**
 * A worker that answers each call after `workerMs` frames of virtual time, by a script: a fixed
 * reply, a failure, or a function of the batch (default: every item ok, echoing its id).
 */
class ScriptedWorker implements BatchDispatcher {
  readonly calls: Array<{ at: number; ids: string[] }> = [];
  private readonly script: Answer[] = [];
  constructor(
    private readonly ts: TestScheduler,
    private readonly workerMs: number,
  ) {}
  answer(a: Answer): this {
    this.script.push(a);
    return this;
  }
  dispatch(b: Batch): Promise<BatchReply> {
    this.calls.push({ at: this.ts.now(), ids: b.jobs.map((j) => j.id) });
    const a = this.script.shift() ?? ((x: Batch): BatchReply => ({ results: x.jobs.map((j) => okItem(j.id)), workerMs: this.workerMs }));
    const p = new VirtualPromise<BatchReply>();
    this.ts.schedule(() => {
      if (typeof a === "function") p.resolve(a(b));
      else if ("reply" in a) p.resolve(a.reply);
      else p.reject(a.error);
    }, this.workerMs);
    return p;
  }
}

/** The ok outcome dispatchBatch makes for a job answered by `okItem`. */
function okOutcome(j: RoutedJob, o: { sentAt: number; repliedAt: number; batchSize: number; workerMs: number }): Outcome {
  return {
    kind: "result",
    job: j,
    result: {
      id: j.id,
      status: "ok",
      model: j.model,
      version: j.version,
      output: { text: `echo ${j.id}` },
      usage: { prompt_tokens: 1, completion_tokens: 2 },
      timing: { queue_ms: o.sentAt, batch_size: o.batchSize, worker_ms: o.workerMs, total_ms: o.repliedAt },
    },
  };
}

const BASE = 100;
const MAX = 1_000;
const retryOf = (j: RoutedJob, code: "UNAVAILABLE" | "RESOURCE_EXHAUSTED" | "DEADLINE_EXCEEDED", message: string): Outcome => ({
  kind: "retry",
  job: j,
  delayMs: retryDelayMs(j.delivery.deliveryCount, BASE, MAX, 0),
  lastResort: errorResult(j, code, message),
});
const resultOf = (j: RoutedJob, code: Parameters<typeof errorResult>[1], message: string): Outcome => ({
  kind: "result",
  job: j,
  result: errorResult(j, code, message),
});

describe("dispatchBatch", () => {
  let ts: TestScheduler;
  beforeEach(() => {
    ts = new TestScheduler((actual, expected) => {
      expect(actual).to.deep.equal(expected);
    });
  });
  const opts = () => ({ now: () => ts.now(), retryBaseMs: BASE, retryMaxMs: MAX, retryJitter: 0 });

  it("sends a batch once and emits one ok outcome per job, in batch order, when the reply comes", () => {
    ts.run(({ cold, expectObservable, flush }) => {
      const [a, b, c] = [job("a"), job("b"), job("c")];
      const worker = new ScriptedWorker(ts, 4);
      const source = cold("--x---|", { x: batch([a, b, c]) });
      const t = { sentAt: 2, repliedAt: 6, batchSize: 3, workerMs: 4 };
      expectObservable(source.pipe(dispatchBatch(worker, opts()))).toBe("------(abc|)", {
        a: okOutcome(a, t),
        b: okOutcome(b, t),
        c: okOutcome(c, t),
      });
      flush();
      expect(worker.calls).to.deep.equal([{ at: 2, ids: ["a", "b", "c"] }]);
    });
  });

  it("keeps batches independent: a fast reply is not held behind a slow one", () => {
    ts.run(({ cold, expectObservable }) => {
      const [a, b] = [job("a"), job("b")];
      // a's call takes 6 frames, b's 1.
      const slowThenFast: BatchDispatcher = {
        dispatch: (bt) => {
          const p = new VirtualPromise<BatchReply>();
          const ms = bt.jobs[0]!.id === "a" ? 6 : 1;
          ts.schedule(() => p.resolve({ results: bt.jobs.map((j) => okItem(j.id)), workerMs: ms }), ms);
          return p;
        },
      };
      const source = cold("-x-y-|", { x: batch([a]), y: batch([b]) });
      expectObservable(source.pipe(dispatchBatch(slowThenFast, opts()))).toBe("----b--(a|)", {
        a: okOutcome(a, { sentAt: 1, repliedAt: 7, batchSize: 1, workerMs: 6 }),
        b: okOutcome(b, { sentAt: 3, repliedAt: 4, batchSize: 1, workerMs: 1 }),
      });
    });
  });

  it("answers jobs whose deadline passed DEADLINE_EXCEEDED and never sends them", () => {
    ts.run(({ cold, expectObservable, flush }) => {
      // At frame 3: late1 (deadline 2) and late2 (deadline 3, the instant itself) have expired.
      const late1 = job("late1", { deadlineMs: 2 });
      const live = job("live", { deadlineMs: 50 });
      const late2 = job("late2", { deadlineMs: 3 });
      const free = job("free");
      const worker = new ScriptedWorker(ts, 2);
      const source = cold("---x----------|", { x: batch([late1, live, late2, free]) });
      const msg = "deadline passed while the request waited for a worker";
      const t = { sentAt: 3, repliedAt: 5, batchSize: 2, workerMs: 2 };
      expectObservable(source.pipe(dispatchBatch(worker, opts()))).toBe("-----(pqrs)---|", {
        p: resultOf(late1, "DEADLINE_EXCEEDED", msg),
        q: resultOf(late2, "DEADLINE_EXCEEDED", msg),
        r: okOutcome(live, t),
        s: okOutcome(free, t),
      });
      flush();
      expect(worker.calls).to.deep.equal([{ at: 3, ids: ["live", "free"] }]);
    });
  });

  it("answers a batch of expired jobs at once, without calling the worker", () => {
    ts.run(({ cold, expectObservable, flush }) => {
      const [a, b] = [job("a", { deadlineMs: 1 }), job("b", { deadlineMs: 2 })];
      const worker = new ScriptedWorker(ts, 5);
      const source = cold("--x-----|", { x: batch([a, b]) });
      const msg = "deadline passed while the request waited for a worker";
      expectObservable(source.pipe(dispatchBatch(worker, opts()))).toBe("--(ab)--|", {
        a: resultOf(a, "DEADLINE_EXCEEDED", msg),
        b: resultOf(b, "DEADLINE_EXCEEDED", msg),
      });
      flush();
      expect(worker.calls).to.deep.equal([]);
    });
  });

  it("gives each item its own error, with timing; an unknown code or a missing error is INTERNAL", () => {
    ts.run(({ cold, expectObservable }) => {
      const [a, b, c, d] = [job("a"), job("b"), job("c"), job("d")];
      const worker = new ScriptedWorker(ts, 3).answer({
        reply: {
          results: [okItem("a"), errItem("b", "INVALID_ARGUMENT", "prompt too long"), errItem("c", "WEIRD_CODE", "odd"), errItem("d", "NOT_FOUND")],
          workerMs: 3,
        },
      });
      const source = cold("-x-|", { x: batch([a, b, c, d]) });
      const t = { sentAt: 1, repliedAt: 4, batchSize: 4, workerMs: 3 };
      const timing = { queue_ms: 1, batch_size: 4, worker_ms: 3, total_ms: 4 };
      const withTiming = (o: Outcome): Outcome => (o.kind === "result" ? { ...o, result: { ...o.result, timing } } : o);
      expectObservable(source.pipe(dispatchBatch(worker, opts()))).toBe("----(abcd|)", {
        a: okOutcome(a, t),
        b: withTiming(resultOf(b, "INVALID_ARGUMENT", "prompt too long")),
        c: withTiming(resultOf(c, "INTERNAL", "odd")),
        d: withTiming(resultOf(d, "INTERNAL", "the worker reported an error")),
      });
    });
  });

  it("turns an UNAVAILABLE item into a retry whose delay grows with the delivery count", () => {
    ts.run(({ cold, expectObservable }) => {
      const first = job("first");
      const third = job("third", { deliveryCount: 3 });
      const ok = job("ok");
      const worker = new ScriptedWorker(ts, 1).answer({
        reply: { results: [errItem("first", "UNAVAILABLE", "engine restarting"), errItem("third", "UNAVAILABLE", "engine restarting"), okItem("ok")], workerMs: 1 },
      });
      const source = cold("-x--------|", { x: batch([first, third, ok]) });
      expectObservable(source.pipe(dispatchBatch(worker, opts()))).toBe("--(abc)---|", {
        a: retryOf(first, "UNAVAILABLE", "engine restarting"),
        b: retryOf(third, "UNAVAILABLE", "engine restarting"),
        c: okOutcome(ok, { sentAt: 1, repliedAt: 2, batchSize: 3, workerMs: 1 }),
      });
    });
  });

  it("answers INTERNAL for a job the reply has no item for, or an item of another id", () => {
    ts.run(({ cold, expectObservable }) => {
      const [a, b, c] = [job("a"), job("b"), job("c")];
      // Item 1 belongs to someone else, item 2 is missing.
      const worker = new ScriptedWorker(ts, 2).answer({ reply: { results: [okItem("a"), okItem("zzz")], workerMs: 2 } });
      const source = cold("-x-|", { x: batch([a, b, c]) });
      const msg = "the worker returned no result for this request";
      expectObservable(source.pipe(dispatchBatch(worker, opts()))).toBe("---(abc|)", {
        a: okOutcome(a, { sentAt: 1, repliedAt: 3, batchSize: 3, workerMs: 2 }),
        b: resultOf(b, "INTERNAL", msg),
        c: resultOf(c, "INTERNAL", msg),
      });
    });
  });

  it("turns a retriable call failure into a retry per job, its error kept as the last resort", () => {
    ts.run(({ cold, expectObservable }) => {
      const [a, b] = [job("a"), job("b", { deliveryCount: 2 })];
      const late = job("late", { deadlineMs: 1 });
      const worker = new ScriptedWorker(ts, 4).answer({ error: new DispatchError("no healthy worker for m@v1", "UNAVAILABLE", true) });
      const source = cold("-x-|", { x: batch([late, a, b]) });
      expectObservable(source.pipe(dispatchBatch(worker, opts()))).toBe("-----(lab|)", {
        l: resultOf(late, "DEADLINE_EXCEEDED", "deadline passed while the request waited for a worker"),
        a: retryOf(a, "UNAVAILABLE", "no healthy worker for m@v1"),
        b: retryOf(b, "UNAVAILABLE", "no healthy worker for m@v1"),
      });
    });
  });

  it("when no worker can take the call, retries until the deadline, or waitForWorkerMs after publishing", () => {
    ts.run(({ cold, expectObservable, flush }) => {
      const due = job("due", { deadlineMs: 40 });
      const free = job("free");
      const worker = new ScriptedWorker(ts, 1).answer({ error: new DispatchError("no worker for m@v1", "UNAVAILABLE", true, { noWorker: true }) });
      const source = cold("-x------|", { x: batch([due, free]) });
      const waits: string[] = [];
      const waitForWorkerMs = (model: string): number => {
        waits.push(model);
        return 25;
      };
      // storedAtMs is 0: the job without a deadline waits until 0 + 25.
      expectObservable(source.pipe(dispatchBatch(worker, { ...opts(), waitForWorkerMs }))).toBe("--(df)--|", {
        d: { ...retryOf(due, "UNAVAILABLE", "no worker for m@v1"), waitUntilMs: 40 },
        f: { ...retryOf(free, "UNAVAILABLE", "no worker for m@v1"), waitUntilMs: 25 },
      });
      flush();
      expect(waits).to.deep.equal(["m"]);
    });
  });

  it("does not wait for a worker when the failure is of a worker", () => {
    ts.run(({ cold, expectObservable }) => {
      const [a, b] = [job("a"), job("b")];
      const worker = new ScriptedWorker(ts, 1)
        .answer({ error: new DispatchError("worker crashed", "UNAVAILABLE", true) })
        .answer({ error: new DispatchError("no worker for m@v1", "UNAVAILABLE", true, { noWorker: true }) });
      const source = cold("-x-y-|", { x: batch([a]), y: batch([b]) });
      const withWait = dispatchBatch(worker, { ...opts(), waitForWorkerMs: () => 25 });
      expectObservable(source.pipe(withWait)).toBe("--a-b|", {
        a: retryOf(a, "UNAVAILABLE", "worker crashed"),
        b: { ...retryOf(b, "UNAVAILABLE", "no worker for m@v1"), waitUntilMs: 25 },
      });
    });
  });

  it("does not wait for a worker when waitForWorkerMs is not given", () => {
    ts.run(({ cold, expectObservable }) => {
      const a = job("a");
      const worker = new ScriptedWorker(ts, 1).answer({ error: new DispatchError("no worker for m@v1", "UNAVAILABLE", true, { noWorker: true }) });
      expectObservable(cold("-x-|", { x: batch([a]) }).pipe(dispatchBatch(worker, opts()))).toBe("--a|", {
        a: retryOf(a, "UNAVAILABLE", "no worker for m@v1"),
      });
    });
  });

  it("answers every job with the error of a call failure that is not retriable", () => {
    ts.run(({ cold, expectObservable }) => {
      const [a, b] = [job("a"), job("b")];
      const worker = new ScriptedWorker(ts, 2).answer({ error: new DispatchError("batch too large", "RESOURCE_EXHAUSTED", false) });
      const source = cold("-x-|", { x: batch([a, b]) });
      expectObservable(source.pipe(dispatchBatch(worker, opts()))).toBe("---(ab|)", {
        a: resultOf(a, "RESOURCE_EXHAUSTED", "batch too large"),
        b: resultOf(b, "RESOURCE_EXHAUSTED", "batch too large"),
      });
    });
  });

  it("answers INTERNAL for a call that fails with something other than a DispatchError", () => {
    ts.run(({ cold, expectObservable }) => {
      const a = job("a");
      const worker = new ScriptedWorker(ts, 2).answer({ error: new TypeError("cannot read properties of undefined") });
      const source = cold("-x-|", { x: batch([a]) });
      expectObservable(source.pipe(dispatchBatch(worker, opts()))).toBe("---(a|)", {
        a: resultOf(a, "INTERNAL", "cannot read properties of undefined"),
      });
    });
  });

  it("on a timed-out call, answers DEADLINE_EXCEEDED for jobs past their deadline and retries the others", () => {
    ts.run(({ cold, expectObservable }) => {
      // Sent at 1 (both alive); the call times out at 6, after due's deadline (5).
      const due = job("due", { deadlineMs: 5 });
      const free = job("free");
      const worker = new ScriptedWorker(ts, 5).answer({ error: new DispatchError("call timed out", "DEADLINE_EXCEEDED", true) });
      const source = cold("-x-|", { x: batch([due, free]) });
      expectObservable(source.pipe(dispatchBatch(worker, opts()))).toBe("------(df|)", {
        d: resultOf(due, "DEADLINE_EXCEEDED", "deadline passed while the worker was running the request"),
        f: retryOf(free, "DEADLINE_EXCEEDED", "call timed out"),
      });
    });
  });

  it("waits for calls in flight before completing", () => {
    ts.run(({ cold, expectObservable }) => {
      const a = job("a");
      const worker = new ScriptedWorker(ts, 8);
      const source = cold("x|", { x: batch([a]) });
      expectObservable(source.pipe(dispatchBatch(worker, opts()))).toBe("--------(a|)", {
        a: okOutcome(a, { sentAt: 0, repliedAt: 8, batchSize: 1, workerMs: 8 }),
      });
    });
  });

  it("forwards an error of the source at once, dropping replies still to come", () => {
    ts.run(({ cold, expectObservable, expectSubscriptions }) => {
      const a = job("a");
      const worker = new ScriptedWorker(ts, 5);
      const source = cold("-x-#", { x: batch([a]) }, new Error("upstream"));
      expectObservable(source.pipe(dispatchBatch(worker, opts()))).toBe("---#", {}, new Error("upstream"));
      expectSubscriptions(source.subscriptions).toBe("^--!");
    });
  });

  it("emits nothing more once unsubscribed, and unsubscribes from the source", () => {
    ts.run(({ cold, expectObservable, expectSubscriptions }) => {
      const [a, b] = [job("a"), job("b")];
      const worker = new ScriptedWorker(ts, 3);
      const source = cold("-x--y---|", { x: batch([a]), y: batch([b]) });
      // a's reply (4) arrives before the unsubscription at 6; b's (7) after it.
      expectObservable(source.pipe(dispatchBatch(worker, opts())), "^-----!").toBe("----a-", {
        a: okOutcome(a, { sentAt: 1, repliedAt: 4, batchSize: 1, workerMs: 3 }),
      });
      expectSubscriptions(source.subscriptions).toBe("^-----!");
    });
  });

  it("answers INTERNAL when the dispatcher throws instead of returning a promise", async () => {
    const a = job("a");
    const throwing: BatchDispatcher = {
      dispatch: () => {
        throw new Error("pool closed");
      },
    };
    const out = await lastValueFrom(of(batch([a])).pipe(dispatchBatch(throwing), toArray()));
    expect(out).to.deep.equal([resultOf(a, "INTERNAL", "pool closed")]);
  });

  it("works with a native promise and the wall clock by default", async () => {
    const a = job("a");
    const native: BatchDispatcher = {
      dispatch: async (b) => ({ results: b.jobs.map((j) => okItem(j.id)), workerMs: 1.234 }),
    };
    const before = Date.now();
    const out = await lastValueFrom(of(batch([a])).pipe(dispatchBatch(native), toArray()));
    const after = Date.now();
    expect(out).to.have.length(1);
    const o = out[0]!;
    if (o.kind !== "result") expect.fail(`expected a result, got ${o.kind}`);
    expect(o.result.status).to.equal("ok");
    expect(o.result.timing?.worker_ms).to.equal(1.23);
    // storedAtMs is 0, so queue and total time are the wall clock, read during the call.
    expect(o.result.timing?.total_ms).to.be.within(before, after);
  });
});
