import { expect } from "chai";
import { Observable, Subject, type SchedulerAction, type SchedulerLike, type Subscription } from "rxjs";
import { TestScheduler } from "rxjs/testing";
import { batchByModelVersion, batchKey, takeFair, type BatchSettings } from "../../operators/batch-by-model-version.js";
import type { Batch, RoutedJob } from "../../operators/types.js";
import { inertDelivery } from "../support/deliveries.js";

const delivery = inertDelivery();

function job(id: string, model = "m", version = "v1", deadlineMs?: number): RoutedJob {
  const j: RoutedJob = { id, tenant: "acme", model, version, priority: "normal", prompt: id, stream: false, delivery };
  return deadlineMs === undefined ? j : { ...j, deadlineMs };
}

function batch(closedAtMs: number, jobs: RoutedJob[]): Batch {
  const first = jobs[0]!;
  return { model: first.model, version: first.version, key: `${first.model}@${first.version}`, jobs, closedAtMs };
}

const fixed =
  (s: BatchSettings) =>
  (_key: string): BatchSettings =>
    s;

/** Wraps a scheduler and counts the scheduled actions that have neither run nor been cancelled. */
class CountingScheduler implements SchedulerLike {
  readonly live = new Set<Subscription>();
  constructor(private readonly inner: SchedulerLike) {}
  now(): number {
    return this.inner.now();
  }
  schedule<T>(work: (this: SchedulerAction<T>, state: T) => void, delay?: number, state?: T): Subscription {
    const sub = this.inner.schedule<T>(work, delay ?? 0, state as T);
    this.live.add(sub);
    // An action that has run, or was cancelled, closes its subscription.
    sub.add(() => this.live.delete(sub));
    return sub;
  }
}

describe("batchByModelVersion", () => {
  let ts: TestScheduler;
  beforeEach(() => {
    ts = new TestScheduler((actual, expected) => {
      expect(actual).to.deep.equal(expected);
    });
  });

  const a = job("a");
  const b = job("b");
  const c = job("c");
  const d = job("d");

  it("closes a batch when it reaches maxSize, at once", () => {
    ts.run(({ cold, expectObservable, expectSubscriptions }) => {
      const source = cold("-a-b-c-d---|", { a, b, c, d });
      const out = source.pipe(batchByModelVersion({ settings: fixed({ maxSize: 3, maxDelayMs: 100 }) }));
      expectObservable(out).toBe("-----x-----(y|)", { x: batch(5, [a, b, c]), y: batch(11, [d]) });
      expectSubscriptions(source.subscriptions).toBe("^----------!");
    });
  });

  it("closes a batch maxDelayMs after its first item, not on a fixed tick", () => {
    ts.run(({ cold, expectObservable }) => {
      // Items at 2, 4 and 9: a fixed 5 ms tick would close at 5, 10, 15; the window opens at the first item.
      const source = cold("--a-b----c--------|", { a, b, c });
      const out = source.pipe(batchByModelVersion({ settings: fixed({ maxSize: 10, maxDelayMs: 5 }) }));
      expectObservable(out).toBe("-------x------y---|", { x: batch(7, [a, b]), y: batch(14, [c]) });
    });
  });

  it("closes at the end of the turn with maxDelayMs 0", () => {
    ts.run(({ cold, expectObservable }) => {
      const source = cold("-(ab)-c--|", { a, b, c });
      const out = source.pipe(batchByModelVersion({ settings: fixed({ maxSize: 10, maxDelayMs: 0 }) }));
      expectObservable(out).toBe("-x----y--|", { x: batch(1, [a, b]), y: batch(6, [c]) });
    });
  });

  it("does not wait when the worker has idle capacity: items of one turn ride one batch", () => {
    ts.run(({ cold, expectObservable, flush }) => {
      const source = cold("-(ab)-c--|", { a, b, c });
      const calls: string[] = [];
      const out = source.pipe(
        batchByModelVersion({
          settings: fixed({ maxSize: 10, maxDelayMs: 100 }),
          // The end-of-turn flush runs on the given scheduler (in production: setImmediate).
          scheduler: ts,
          hasIdleCapacity: (key) => {
            calls.push(key);
            return true;
          },
        }),
      );
      expectObservable(out).toBe("-x----y--|", { x: batch(1, [a, b]), y: batch(6, [c]) });
      flush();
      // Asked once per pending flush, with the key.
      expect(calls).to.deep.equal(["m@v1", "m@v1"]);
    });
  });

  it("waits for size or delay while the worker is busy, and flushes once it becomes idle", () => {
    ts.run(({ cold, expectObservable }) => {
      let idle = false;
      const source = cold("-a--b----c|", { a, b, c });
      ts.schedule(() => (idle = true), 3);
      const out = source.pipe(
        batchByModelVersion({ settings: fixed({ maxSize: 10, maxDelayMs: 20 }), hasIdleCapacity: () => idle, scheduler: ts }),
      );
      // a waits (busy); b arrives when idle, so [a, b] leaves at the end of that turn; c too.
      expectObservable(out).toBe("----x----y|", { x: batch(4, [a, b]), y: batch(9, [c]) });
    });
  });

  it("flushes a key's open batch at once when capacityFreed$ emits that key", () => {
    ts.run(({ cold, hot, expectObservable, expectSubscriptions }) => {
      const source = cold("-a-b--------|", { a, b });
      const freed = hot("---o--k--k----", { k: "m@v1", o: "other@v1" });
      const out = source.pipe(
        batchByModelVersion({
          settings: fixed({ maxSize: 10, maxDelayMs: 50 }),
          hasIdleCapacity: () => false,
          capacityFreed$: freed,
        }),
      );
      // "other@v1" has no open batch; the second "m@v1" finds the buffer empty: no empty batch.
      expectObservable(out).toBe("------x-----|", { x: batch(6, [a, b]) });
      expectSubscriptions(freed.subscriptions).toBe("^-----------!");
    });
  });

  it("keeps each model@version independent", () => {
    ts.run(({ cold, expectObservable }) => {
      const a1 = job("a1", "llama", "v1");
      const a2 = job("a2", "llama", "v2");
      const b1 = job("b1", "mistral", "v1");
      const a3 = job("a3", "llama", "v1");
      const a4 = job("a4", "llama", "v1");
      const source = cold("-pqrst-------|", { p: a1, q: a2, r: b1, s: a3, t: a4 });
      const settings = (key: string): BatchSettings =>
        key === "llama@v1" ? { maxSize: 3, maxDelayMs: 100 } : key === "llama@v2" ? { maxSize: 5, maxDelayMs: 4 } : { maxSize: 5, maxDelayMs: 8 };
      const out = source.pipe(batchByModelVersion({ settings }));
      expectObservable(out).toBe("-----xy----z-|", {
        x: batch(5, [a1, a3, a4]),
        y: batch(6, [a2]),
        z: batch(11, [b1]),
      });
    });
  });

  it("never emits an empty batch", () => {
    ts.run(({ cold, hot, expectObservable }) => {
      const source = cold("-a-----|", { a });
      const freed = hot("k-k--k-k", { k: "m@v1" });
      const out = source.pipe(
        batchByModelVersion({ settings: fixed({ maxSize: 1, maxDelayMs: 2 }), capacityFreed$: freed, hasIdleCapacity: () => true }),
      );
      // Size 1 closes [a] at once; its delay timer and idle flush must not emit the empty buffer after it.
      expectObservable(out).toBe("-x-----|", { x: batch(1, [a]) });
    });
  });

  it("orders a batch by deadline, earliest first, no deadline last, otherwise by arrival", () => {
    ts.run(({ cold, expectObservable }) => {
      const j1 = job("j1", "m", "v1", 30);
      const j2 = job("j2");
      const j3 = job("j3", "m", "v1", 10);
      const j4 = job("j4", "m", "v1", 30);
      const j5 = job("j5");
      const j6 = job("j6", "m", "v1", 20);
      const source = cold("(123456)|", { 1: j1, 2: j2, 3: j3, 4: j4, 5: j5, 6: j6 });
      const out = source.pipe(batchByModelVersion({ settings: fixed({ maxSize: 6, maxDelayMs: 5 }) }));
      expectObservable(out).toBe("x-------|", { x: batch(0, [j3, j6, j1, j4, j2, j5]) });
    });
  });

  it("reads the settings when a batch opens, so a change applies to the next batch", () => {
    ts.run(({ cold, expectObservable, flush }) => {
      const [e, f, g] = [job("e"), job("f"), job("g")];
      let current: BatchSettings = { maxSize: 2, maxDelayMs: 100 };
      const opened: number[] = [];
      const source = cold("-ab-c-d-e-f--g------|", { a, b, c, d, e, f, g });
      // Changed at 5 while [c, ...] is open: that batch keeps maxSize 2; the next ones get 3 and 4 ms.
      ts.schedule(() => (current = { maxSize: 3, maxDelayMs: 4 }), 5);
      const out = source.pipe(
        batchByModelVersion({
          settings: () => {
            opened.push(ts.now());
            return current;
          },
        }),
      );
      expectObservable(out).toBe("--x---y-----z----w--|", {
        x: batch(2, [a, b]),
        y: batch(6, [c, d]),
        z: batch(12, [e, f]),
        w: batch(17, [g]),
      });
      flush();
      expect(opened).to.deep.equal([1, 4, 8, 13]);
    });
  });

  it("flushes every open batch when the source completes, then completes", () => {
    ts.run(({ cold, expectObservable }) => {
      const x1 = job("x1", "x", "v1");
      const y1 = job("y1", "y", "v1");
      const source = cold("-pq-r|", { p: x1, q: y1, r: a });
      const out = source.pipe(batchByModelVersion({ settings: fixed({ maxSize: 10, maxDelayMs: 100 }) }));
      expectObservable(out).toBe("-----(xyz|)", { x: batch(5, [x1]), y: batch(5, [y1]), z: batch(5, [a]) });
    });
  });

  it("completes without a batch when nothing is open", () => {
    ts.run(({ cold, expectObservable }) => {
      const out = cold<RoutedJob>("---|").pipe(batchByModelVersion({ settings: fixed({ maxSize: 1, maxDelayMs: 1 }) }));
      expectObservable(out).toBe("---|");
    });
  });

  it("forwards an error, drops the open batches and clears their timers", () => {
    ts.run(({ cold, hot, expectObservable, expectSubscriptions, flush }) => {
      const counting = new CountingScheduler(ts);
      const failure = new Error("upstream failed");
      const source = cold("-a-#", { a }, failure);
      const freed = hot("------");
      const liveAfter: number[] = [];
      ts.schedule(() => liveAfter.push(counting.live.size), 2);
      ts.schedule(() => liveAfter.push(counting.live.size), 4);
      const out = source.pipe(batchByModelVersion({ settings: fixed({ maxSize: 10, maxDelayMs: 50 }), scheduler: counting, capacityFreed$: freed }));
      expectObservable(out).toBe("---#", undefined, failure);
      expectSubscriptions(freed.subscriptions).toBe("^--!");
      flush();
      // One timer while [a] is open; none once the error went through.
      expect(liveAfter).to.deep.equal([1, 0]);
    });
  });

  it("forwards an error of capacityFreed$", () => {
    ts.run(({ cold, hot, expectObservable, expectSubscriptions }) => {
      const failure = new Error("pool failed");
      const source = cold("-a------|", { a });
      const freed = hot("----#", undefined, failure);
      const out = source.pipe(batchByModelVersion({ settings: fixed({ maxSize: 10, maxDelayMs: 50 }), capacityFreed$: freed }));
      expectObservable(out).toBe("----#", undefined, failure);
      expectSubscriptions(source.subscriptions).toBe("^---!");
    });
  });

  it("fails the stream when settings() or hasIdleCapacity() throws", () => {
    ts.run(({ cold, expectObservable, expectSubscriptions }) => {
      const failure = new Error("registry broken");
      const source = cold("-a-b----|", { a, b: job("b", "other", "v1") });
      const settings = (key: string): BatchSettings => {
        if (key === "other@v1") throw failure;
        return { maxSize: 10, maxDelayMs: 50 };
      };
      expectObservable(source.pipe(batchByModelVersion({ settings }))).toBe("---#", undefined, failure);
      expectSubscriptions(source.subscriptions).toBe("^--!");

      const idle = cold("--a--|", { a });
      const hasIdleCapacity = (): boolean => {
        throw failure;
      };
      const out = idle.pipe(batchByModelVersion({ settings: fixed({ maxSize: 10, maxDelayMs: 1 }), hasIdleCapacity }));
      expectObservable(out).toBe("--#", undefined, failure);
    });
  });

  it("on unsubscribe clears every timer and the capacityFreed$ subscription", () => {
    ts.run(({ cold, hot, expectObservable, expectSubscriptions, flush }) => {
      const counting = new CountingScheduler(ts);
      const source = cold("-a-b-c-----|", { a, b, c: job("c", "other", "v1") });
      const freed = hot("----------");
      const liveAt: number[] = [];
      for (const t of [6, 8]) ts.schedule(() => liveAt.push(counting.live.size), t);
      const out = source.pipe(
        batchByModelVersion({
          settings: fixed({ maxSize: 10, maxDelayMs: 50 }),
          hasIdleCapacity: () => false,
          capacityFreed$: freed,
          scheduler: counting,
        }),
      );
      expectObservable(out, "^------!").toBe("--------");
      expectSubscriptions(source.subscriptions).toBe("^------!");
      expectSubscriptions(freed.subscriptions).toBe("^------!");
      flush();
      // Two open batches (m@v1 and other@v1), one timer each, until the unsubscribe at 7.
      expect(liveAt).to.deep.equal([2, 0]);
    });
  });

  it("uses the given clock for closedAtMs", () => {
    ts.run(({ cold, expectObservable }) => {
      const source = cold("-a|", { a });
      const out = source.pipe(batchByModelVersion({ settings: fixed({ maxSize: 1, maxDelayMs: 5 }), now: () => 1_700_000_000_000 }));
      expectObservable(out).toBe("-x|", { x: batch(1_700_000_000_000, [a]) });
    });
  });

  it("names keys model@version", () => {
    expect(batchKey("llama3-8b", "v2")).to.equal("llama3-8b@v2");
  });

  it("is cold: each subscription has its own buffers", () => {
    ts.run(({ cold, expectObservable }) => {
      const source = cold("-a-b|", { a, b });
      const out = source.pipe(batchByModelVersion({ settings: fixed({ maxSize: 2, maxDelayMs: 50 }) }));
      expectObservable(out).toBe("---x|", { x: batch(3, [a, b]) });
      expectObservable(out).toBe("---x|", { x: batch(3, [a, b]) });
    });
  });

  it("works with the default scheduler", () => {
    ts.run(({ cold, expectObservable }) => {
      const source = cold("-a 9ms b|", { a, b });
      const out = source.pipe(batchByModelVersion({ settings: fixed({ maxSize: 10, maxDelayMs: 3 }) }));
      expectObservable(out).toBe("----x 6ms -(y|)", { x: batch(4, [a]), y: batch(12, [b]) });
    });
  });

  it("without a scheduler, flushes for an idle worker at the end of the event-loop turn: one batch per turn", async () => {
    const source = new Subject<RoutedJob>();
    const got: string[][] = [];
    const sub = source
      .pipe(batchByModelVersion({ settings: fixed({ maxSize: 10, maxDelayMs: 60_000 }), hasIdleCapacity: () => true }))
      .subscribe((x) => got.push(x.jobs.map((j) => j.id)));
    source.next(a);
    source.next(b);
    expect(got, "nothing leaves within the turn").to.deep.equal([]);
    await new Promise((r) => setImmediate(r));
    source.next(c);
    await new Promise((r) => setImmediate(r));
    expect(got).to.deep.equal([[a.id, b.id], [c.id]]);
    sub.unsubscribe();
  });

  it("gives a slot freed on a worker shared by several keys to the most urgent batch, not the key named", () => {
    // One worker serves m@v1 and n@v1 with one slot: busy until it is freed, then free once.
    let slots = 0;
    const freed = new Subject<string>();
    const source = new Subject<RoutedJob>();
    const got: string[][] = [];
    const sub = source
      .pipe(
        batchByModelVersion({
          settings: fixed({ maxSize: 10, maxDelayMs: 60_000 }),
          hasIdleCapacity: () => slots > 0,
          capacityFreed$: freed,
          holdWhileBusy: true,
          scheduler: ts,
        }),
      )
      .subscribe((b) => {
        slots--; // the dispatcher takes the slot
        got.push(b.jobs.map((j) => j.id));
      });
    const at = (j: RoutedJob, priority: RoutedJob["priority"], storedAtMs: number): RoutedJob => ({ ...j, priority, delivery: { ...delivery, storedAtMs } });
    source.next(at(job("m-old-normal", "m"), "normal", 1));
    source.next(at(job("n-new-high", "n"), "high", 5));
    source.next(at(job("m-low", "m"), "low", 0));
    expect(got).to.deep.equal([]);
    // The worker names m@v1 first (its batch ended), but n@v1 holds a high-priority request.
    slots = 1;
    freed.next("m@v1");
    freed.next("n@v1");
    expect(got).to.deep.equal([["n-new-high"]]);
    // The next slot: m@v1, normal before low.
    slots = 1;
    freed.next("n@v1");
    expect(got).to.deep.equal([["n-new-high"], ["m-old-normal", "m-low"]]);
    sub.unsubscribe();
  });

  it("delivers a throw from the source's subscribe as an error", () => {
    // A source that throws on subscribe reaches the subscriber as an error, not as an exception.
    const failing = new Observable<RoutedJob>(() => {
      throw new Error("subscribe failed");
    });
    let caught: unknown;
    failing.pipe(batchByModelVersion({ settings: fixed({ maxSize: 1, maxDelayMs: 1 }) })).subscribe({ error: (e: unknown) => (caught = e) });
    expect(caught).to.be.instanceOf(Error).with.property("message", "subscribe failed");
  });

  describe("takeFair (the pick while workers are busy)", () => {
    const of = (tenant: string, n: number, priority: RoutedJob["priority"] = "normal"): RoutedJob[] =>
      Array.from({ length: n }, (_, i) => ({ ...job(`${tenant}${i}`), tenant, priority }));
    const count = (jobs: readonly RoutedJob[], tenant: string): number => jobs.filter((j) => j.tenant === tenant).length;

    it("takes one job per tenant in turn, higher priority first", () => {
      const { taken, rest } = takeFair([...of("big", 20), ...of("small", 3), ...of("urgent", 2, "high")], 10);
      expect(count(taken, "urgent")).to.equal(2);
      expect(count(taken, "small")).to.equal(3);
      expect(count(taken, "big")).to.equal(5);
      expect(taken.length + rest.length).to.equal(25);
    });

    it("with a cost, takes in turn by cost: a tenant whose jobs cost 10x gets a tenth of the places", () => {
      const jobs = [...of("long", 20), ...of("short", 40)];
      const cost = (j: RoutedJob): number => (j.tenant === "long" ? 400 : 40);
      const byCost = takeFair(jobs, 22, cost).taken;
      expect(count(byCost, "long")).to.equal(2);
      expect(count(byCost, "short")).to.equal(20);
      // Without it, as many places each.
      const byJobs = takeFair(jobs, 22).taken;
      expect(count(byJobs, "long")).to.equal(11);
      // Each tenant's jobs in arrival order; a nonsensical cost counts as 1.
      expect(byCost.filter((j) => j.tenant === "long").map((j) => j.id)).to.deep.equal(["long0", "long1"]);
      expect(count(takeFair(jobs, 4, () => Number.NaN).taken, "long")).to.equal(2);
    });
  });
});
