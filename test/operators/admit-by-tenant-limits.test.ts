import { expect } from "chai";
import { filter, map, type Observable } from "rxjs";
import { TestScheduler } from "rxjs/testing";
import { admitByTenantLimits, type AdmitByTenantLimitsOptions } from "../../operators/admit-by-tenant-limits.js";
import type { Delivery, InferJob, Outcome } from "../../operators/types.js";
import { parseTenantLimits, TenantLimiter, TenantLimitsError, type TenantLimiterOptions } from "../../pipeline/routing/tenant-limits.js";
import { TenantRegistry } from "../../pipeline/routing/tenant-registry.js";
import { useNats, waitFor } from "../support/nats.js";
import { inertDelivery } from "../support/deliveries.js";

// ---- doubles ----------------------------------------------------------------------------------

interface FakeDelivery extends Delivery {
  settled: boolean;
}

function delivery(opts: { deliveryCount?: number; storedAtMs?: number } = {}): FakeDelivery {
  return { ...inertDelivery({ deliveryCount: opts.deliveryCount ?? 1, storedAtMs: opts.storedAtMs ?? 0 }), settled: false };
}

function job(id: string, o: { tenant?: string; maxTokens?: number; deadlineMs?: number; deliveryCount?: number; storedAtMs?: number } = {}): InferJob {
  const j: InferJob = {
    id,
    tenant: o.tenant ?? "acme",
    model: "m",
    priority: "normal",
    prompt: id,
    stream: false,
    delivery: delivery(o),
    ...(o.maxTokens !== undefined ? { parameters: { max_tokens: o.maxTokens } } : {}),
  };
  return o.deadlineMs === undefined ? j : { ...j, deadlineMs: o.deadlineMs };
}

/** One line per item: `ok:a`, `RESOURCE_EXHAUSTED:c`, `retry:c:<delayMs>:<waitUntilMs>`. */
function show(x: InferJob | Outcome): string {
  if (!("kind" in x)) return `ok:${x.id}`;
  if (x.kind === "result") return `${x.result.error?.code ?? x.result.status}:${x.job.id}`;
  if (x.kind === "retry") return `retry:${x.job.id}:${x.delayMs}:${x.waitUntilMs}`;
  return `dead:${x.id ?? "?"}`;
}

describe("admitByTenantLimits", () => {
  let ts: TestScheduler;
  beforeEach(() => {
    ts = new TestScheduler((actual, expected) => {
      expect(actual).to.deep.equal(expected);
    });
  });

  const limiterOf = (opts: TenantLimiterOptions): TenantLimiter => new TenantLimiter({ now: () => ts.now(), ...opts });

  /**
   * Runs letters through the operator. A letter that names a job is admitted; any other is an
   * action run at that frame (then dropped), so a marble can release slots or change limits.
   */
  const run = (
    limiter: TenantLimiter,
    source: Observable<string>,
    jobs: Record<string, InferJob>,
    actions: Record<string, () => void> = {},
    opts: AdmitByTenantLimitsOptions = {},
  ): Observable<string> =>
    source.pipe(
      filter((k) => {
        const act = actions[k];
        if (act) act();
        return act === undefined;
      }),
      map((k) => jobs[k]!),
      admitByTenantLimits(limiter, { now: () => ts.now(), ...opts }),
      map(show),
    );

  it("lets a burst through, then the rate (token bucket)", () => {
    ts.run(({ cold, expectObservable }) => {
      const limiter = limiterOf({ tenants: { acme: { rate: 1, burst: 2, policy: "reject" } } });
      const jobs = Object.fromEntries(["a", "b", "c", "d", "e", "f"].map((k) => [k, job(k)]));
      // a b: the burst; c: bucket empty; d at 1 s: one token back; e at 2 s: another; f: empty again.
      const source = cold("abc 997ms d 999ms ef|");
      expectObservable(run(limiter, source, jobs)).toBe("abc 997ms d 999ms ef|", {
        a: "ok:a",
        b: "ok:b",
        c: "RESOURCE_EXHAUSTED:c",
        d: "ok:d",
        e: "ok:e",
        f: "RESOURCE_EXHAUSTED:f",
      });
    });
  });

  it("names the rate limit in the answer, and burst defaults to the rate", () => {
    ts.run(({ cold, expectObservable }) => {
      const limiter = limiterOf({ tenants: { acme: { rate: 3, policy: "reject" } } });
      const jobs = Object.fromEntries(["a", "b", "c", "d"].map((k) => [k, job(k)]));
      const out = cold("(abcd|)").pipe(
        map((k) => jobs[k]!),
        admitByTenantLimits(limiter, { now: () => ts.now() }),
        map((x) => ("kind" in x && x.kind === "result" ? x.result.error!.message : `ok:${(x as InferJob).id}`)),
      );
      expectObservable(out).toBe("(abcd|)", {
        a: "ok:a",
        b: "ok:b",
        c: "ok:c",
        d: "tenant 'acme' is over its rate limit of 3 requests/s (burst 3); retry in 334 ms",
      });
    });
  });

  it("counts parameters.max_tokens (or a default) against tokens per minute", () => {
    ts.run(({ cold, expectObservable }) => {
      const limiter = limiterOf({ tenants: { acme: { tokensPerMinute: 1000, policy: "delay" } }, defaultRequestTokens: 100 });
      const jobs = {
        a: job("a", { maxTokens: 600 }),
        b: job("b", { maxTokens: 600 }), // 400 left: waits for 200 more, at 1000/min = 12 s
        c: job("c"), // counts the default 100
        d: job("d", { maxTokens: 5000 }), // over the whole minute: answered, even under "delay"
        e: job("e", { maxTokens: 300 }), // 300 left, exactly enough
      };
      expectObservable(run(limiter, cold("(abcde|)"), jobs, {}, { maxWaitMs: 60_000 })).toBe("(abcde|)", {
        a: "ok:a",
        b: "retry:b:12000:60000",
        c: "ok:c",
        d: "RESOURCE_EXHAUSTED:d",
        e: "ok:e",
      });
    });
    const limiter = new TenantLimiter({ tenants: { acme: { tokensPerMinute: 1000, policy: "reject" } }, now: () => 0 });
    const big = limiter.check(job("big", { maxTokens: 5000 }));
    expect(big.ok).to.equal(false);
    if (!big.ok) {
      expect(big.final).to.equal(true);
      expect(big.limit).to.equal("tokensPerMinute");
      expect(big.reason).to.equal("request counts 5000 tokens (parameters.max_tokens), more than tenant 'acme''s limit of 1000 tokens per minute");
    }
  });

  it("holds a concurrency slot until the delivery is released", () => {
    ts.run(({ cold, expectObservable }) => {
      const limiter = limiterOf({ tenants: { acme: { maxConcurrent: 2, policy: "reject" } } });
      const jobs = Object.fromEntries(["a", "b", "c", "d", "e"].map((k) => [k, job(k)]));
      const actions = {
        R: () => limiter.released(jobs["a"]!.delivery),
        // A second release of the same delivery frees nothing more.
        S: () => limiter.released(jobs["a"]!.delivery),
      };
      expectObservable(run(limiter, cold("abc-R-dS-e|"), jobs, actions)).toBe("abc---d--e|", {
        a: "ok:a",
        b: "ok:b",
        c: "RESOURCE_EXHAUSTED:c",
        d: "ok:d",
        e: "RESOURCE_EXHAUSTED:e",
      });
      ts.schedule(() => expect(limiter.inFlight("acme")).to.equal(2), 20);
    });
  });

  it("reclaims the slot of a delivery that settled without a release", () => {
    ts.run(({ cold, expectObservable }) => {
      const limiter = limiterOf({ tenants: { acme: { maxConcurrent: 1, policy: "reject" } } });
      const jobs = { a: job("a"), b: job("b"), c: job("c") };
      const actions = { S: () => ((jobs.a.delivery as FakeDelivery).settled = true) };
      expectObservable(run(limiter, cold("ab-S-c|"), jobs, actions)).toBe("ab---c|", {
        a: "ok:a",
        b: "RESOURCE_EXHAUSTED:b",
        c: "ok:c",
      });
    });
  });

  it("releases through the outcome the pipeline settled", () => {
    const limiter = new TenantLimiter({ tenants: { acme: { maxConcurrent: 1, policy: "reject" } } });
    const a = job("a");
    expect(limiter.check(a).ok).to.equal(true);
    expect(limiter.check(job("b")).ok).to.equal(false);
    limiter.releasedOutcome({ kind: "result", job: a, result: { id: "a", status: "ok" } });
    expect(limiter.inFlight("acme")).to.equal(0);
    expect(limiter.check(job("c")).ok).to.equal(true);
  });

  it("under 'delay', retries with the time the limit needs until the deadline or the longest wait", () => {
    ts.run(({ cold, expectObservable }) => {
      const limiter = limiterOf({ tenants: { acme: { rate: 10, burst: 1, policy: "delay" } }, concurrencyRetryMs: 50 });
      const jobs = {
        a: job("a"),
        b: job("b"), // stored at 0, waits at most 500 ms
        c: job("c", { deadlineMs: 300 }), // its deadline comes first
        x: job("x"), // at 600 the bucket is full again: x takes the token
        d: job("d"), // 601 ms after it was stored: waited long enough, answered
        e: job("e", { deadlineMs: 450 }), // its deadline (before the longest wait) passed while it waited
      };
      expectObservable(run(limiter, cold("abc 597ms xde|"), jobs, {}, { maxWaitMs: 500 })).toBe("abc 597ms xde|", {
        a: "ok:a",
        b: "retry:b:99:500",
        c: "retry:c:98:300",
        x: "ok:x",
        d: "RESOURCE_EXHAUSTED:d",
        e: "DEADLINE_EXCEEDED:e",
      });
    });
  });

  it("answers at once under 'reject', with the same over-limit traffic", () => {
    ts.run(({ cold, expectObservable }) => {
      const limiter = limiterOf({ tenants: { acme: { rate: 10, burst: 1, policy: "reject" } } });
      const jobs = { a: job("a"), b: job("b"), c: job("c", { deadlineMs: 300 }) };
      expectObservable(run(limiter, cold("abc|"), jobs)).toBe("abc|", { a: "ok:a", b: "RESOURCE_EXHAUSTED:b", c: "RESOURCE_EXHAUSTED:c" });
    });
  });

  it("gives each unlisted tenant the default limits, in a bucket of its own", () => {
    ts.run(({ cold, expectObservable }) => {
      const limiter = limiterOf({
        tenants: { "*": { rate: 1, burst: 1, policy: "reject" }, vip: { rate: 100, burst: 3, policy: "reject" } },
      });
      const jobs = {
        a: job("a", { tenant: "x" }),
        b: job("b", { tenant: "x" }),
        c: job("c", { tenant: "y" }),
        d: job("d", { tenant: "vip" }),
        e: job("e", { tenant: "vip" }),
        f: job("f", { tenant: "vip" }),
      };
      expectObservable(run(limiter, cold("(abcdef|)"), jobs)).toBe("(abcdef|)", {
        a: "ok:a",
        b: "RESOURCE_EXHAUSTED:b",
        c: "ok:c",
        d: "ok:d",
        e: "ok:e",
        f: "ok:f",
      });
    });
    const open = new TenantLimiter({ tenants: { acme: { rate: 1, policy: "reject" } } });
    for (let i = 0; i < 5; i++) expect(open.check(job(`free-${i}`, { tenant: "other" })).ok).to.equal(true);
  });

  it("applies a limit change to the next request", () => {
    ts.run(({ cold, expectObservable }) => {
      const limiter = limiterOf({ tenants: { acme: { rate: 1, burst: 1, policy: "reject" } } });
      const jobs = Object.fromEntries(["a", "b", "c", "d", "e", "f"].map((k) => [k, job(k)]));
      const actions = {
        U: () => limiter.set("acme", { rate: 1000, burst: 2, policy: "reject" }),
        C: () => limiter.set("acme", { maxConcurrent: 3, policy: "reject" }),
      };
      // b: over 1/s; raised to 1000/s, c and d pass; then only 3 at once: a, c and d still hold slots.
      expectObservable(run(limiter, cold("ab-U--cd-C-e|"), jobs, actions)).toBe("ab----cd---e|", {
        a: "ok:a",
        b: "RESOURCE_EXHAUSTED:b",
        c: "ok:c",
        d: "ok:d",
        e: "RESOURCE_EXHAUSTED:e",
      });
    });
  });

  it("does not charge rate or tokens again when an admitted request is delivered again", () => {
    const limiter = new TenantLimiter({ tenants: { acme: { rate: 1, burst: 1, tokensPerMinute: 100, policy: "reject" } }, now: () => 0 });
    const first = limiter.check(job("a", { maxTokens: 100 }));
    expect(first.ok).to.equal(true);
    if (first.ok) first.release();
    // The worker was unavailable: the same request comes back (a new delivery, count 2).
    expect(limiter.check(job("a", { maxTokens: 100, deliveryCount: 2 })).ok).to.equal(true);
    // Another request delivered a second time was never admitted: it is charged.
    expect(limiter.check(job("b", { deliveryCount: 2 })).ok).to.equal(false);
  });

  it("lets shadow copies through without a check", () => {
    ts.run(({ cold, expectObservable }) => {
      const limiter = limiterOf({ tenants: { acme: { rate: 1, burst: 1, policy: "reject" } } });
      const jobs = { a: job("a"), s: { ...job("a"), shadow: true } };
      expectObservable(run(limiter, cold("as|"), jobs)).toBe("as|", { a: "ok:a", s: "ok:a" });
    });
  });

  it("validates limits", () => {
    expect(parseTenantLimits("acme", { rate: 5 })).to.deep.equal({ rate: 5, policy: "reject" });
    expect(parseTenantLimits("*", { maxConcurrent: 2, policy: "delay" })).to.deep.equal({ maxConcurrent: 2, policy: "delay" });
    const bad: Array<[string, unknown, RegExp]> = [
      ["acme", { rate: 0 }, /rate must be a number > 0/],
      ["acme", { burst: 5 }, /burst needs rate/],
      ["acme", { maxConcurrent: 1.5 }, /maxConcurrent must be an integer/],
      ["acme", { policy: "drop" }, /policy must be/],
      ["acme", { rps: 5 }, /unknown field 'rps'/],
      ["Bad.Name", { rate: 1 }, /name must be/],
      ["acme", [1], /JSON object/],
    ];
    for (const [t, v, re] of bad) expect(() => parseTenantLimits(t, v)).to.throw(TenantLimitsError, re);
  });
});

describe("TenantRegistry (KV bucket infer_tenants)", function () {
  this.timeout(30_000);
  const nats = useNats();

  it("seeds from configuration, then follows bucket writes and deletes without a restart", async () => {
    const invalid: string[] = [];
    const reg = await TenantRegistry.open(nats.nc, {
      seed: { acme: { rate: 1, policy: "reject" }, "*": { maxConcurrent: 1, policy: "delay" } },
      onInvalid: (key) => invalid.push(key),
    });
    try {
      const lim = reg.limiter;
      expect(lim.limitsOf("acme")).to.deep.equal({ rate: 1, policy: "reject" });
      expect(lim.limitsOf("someone")).to.deep.equal({ maxConcurrent: 1, policy: "delay" });
      expect((await reg.kv.get("_default"))?.json()).to.deep.equal({ maxConcurrent: 1, policy: "delay" });

      await reg.put("acme", { rate: 50, burst: 5, policy: "delay" });
      await waitFor("the new acme limits", () => lim.limitsOf("acme")?.rate === 50, 5_000);
      expect(lim.limitsOf("acme")).to.deep.equal({ rate: 50, burst: 5, policy: "delay" });

      const rev = lim.revision;
      await reg.kv.put("acme", JSON.stringify({ rate: -1 }));
      await waitFor("the invalid value to be heard", () => invalid.includes("acme"), 5_000);
      expect(lim.revision).to.equal(rev);
      expect(lim.limitsOf("acme")?.rate).to.equal(50);

      await reg.remove("acme");
      await waitFor("acme to fall back to the default", () => lim.limitsOf("acme")?.maxConcurrent === 1, 5_000);

      // A second registry (another pipeline) sees the bucket, not its own seed.
      const other = await TenantRegistry.open(nats.nc, { seed: { "*": { rate: 9, policy: "reject" } } });
      expect(other.limiter.limitsOf("x")).to.deep.equal({ maxConcurrent: 1, policy: "delay" });
      await other.stop();
    } finally {
      await reg.stop();
      await reg.stop();
    }
  });
});
