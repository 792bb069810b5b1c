/**
 * The routing policies as pure functions (pipeline/workers/routing-policy.ts), the router's
 * prefix index, and the registry's `routing` field.
 */
import { expect } from "chai";
import { ModelSpecError, ModelTable, parseModelSpec } from "../../pipeline/routing/registry.js";
import { PrefixIndex } from "../../pipeline/workers/prefix-index.js";
import {
  chooseWorker,
  DEFAULT_LOAD_WEIGHT_TOKENS,
  isOverloaded,
  loadOf,
  prefillTokens,
  prefixCost,
  withinLoadBound,
  type Candidate,
  type RouteRequest,
} from "../../pipeline/workers/routing-policy.js";

const idle = (over: Partial<Candidate> = {}): Candidate => ({ inflight: 0, capacity: 8, cachedBlocks: 0, sessionMatch: false, tiebreak: 0, ...over });
const REQ: RouteRequest = { promptTokens: 1600, blockTokens: 16, turn: 0 };

describe("routing policy", () => {
  it("counts load as the larger of the calls in flight and what the worker reports", () => {
    expect(loadOf(idle({ inflight: 3 }))).to.equal(3);
    expect(loadOf(idle({ inflight: 3, reported: { waiting: 4, running: 2, kvUsage: 0.5 } }))).to.equal(6);
    expect(loadOf(idle({ inflight: 9, reported: { waiting: 0, running: 2, kvUsage: 0.5 } }))).to.equal(9);
  });

  it("costs the tokens to prefill plus the load, less the session bonus", () => {
    const c = idle({ cachedBlocks: 80, inflight: 2 });
    expect(prefillTokens(c, REQ)).to.equal(1600 - 80 * 16);
    expect(prefixCost(c, REQ)).to.equal(320 + 2 * DEFAULT_LOAD_WEIGHT_TOKENS);
    expect(prefixCost({ ...c, sessionMatch: true }, REQ, { sessionBonusTokens: 100 })).to.equal(320 + 2 * DEFAULT_LOAD_WEIGHT_TOKENS - 100);
    // Never below zero tokens to prefill, even when more blocks are held than the prompt has.
    expect(prefillTokens(idle({ cachedBlocks: 500 }), REQ)).to.equal(0);
  });

  it("prefix: sends the request to the worker holding its prefix", () => {
    const workers = [idle({ tiebreak: 1 }), idle({ cachedBlocks: 90, tiebreak: 2 }), idle({ cachedBlocks: 10, tiebreak: 3 })];
    expect(chooseWorker("prefix", workers, REQ)).to.equal(1);
  });

  it("prefix: trades a held prefix against load", () => {
    // Worker 1 holds 10 blocks (160 tokens) but has 2 requests more than worker 0.
    const workers = [idle(), idle({ cachedBlocks: 10, inflight: 2 })];
    expect(chooseWorker("prefix", workers, REQ)).to.equal(0);
    expect(chooseWorker("prefix", workers, REQ, { loadWeightTokens: 10, boundedLoadEpsilon: 2 })).to.equal(1);
  });

  it("prefix: bounds the load, so a hot prefix spreads instead of piling onto one worker", () => {
    // Worker 0 holds the whole prompt but carries 6 while the others carry 1: over 1.25 x mean.
    const workers = [idle({ cachedBlocks: 100, inflight: 6 }), idle({ inflight: 1, tiebreak: 1 }), idle({ inflight: 1, tiebreak: 2 })];
    expect(withinLoadBound(workers)).to.deep.equal([1, 2]);
    expect(chooseWorker("prefix", workers, REQ, { loadWeightTokens: 1 })).to.equal(1);
    // Within the bound it keeps the prefix.
    const close = [idle({ cachedBlocks: 100, inflight: 2 }), idle({ inflight: 1 }), idle({ inflight: 1 })];
    expect(chooseWorker("prefix", close, REQ, { loadWeightTokens: 1 })).to.equal(0);
  });

  it("prefix: prefers the session's worker when the prompt alone does not decide", () => {
    const workers = [idle({ tiebreak: 0 }), idle({ sessionMatch: true, tiebreak: 9 })];
    expect(chooseWorker("prefix", workers, { ...REQ, promptTokens: 10 })).to.equal(1);
  });

  it("prefix: breaks ties by load, then by the stable tiebreak", () => {
    expect(chooseWorker("prefix", [idle({ tiebreak: 5 }), idle({ tiebreak: 2 }), idle({ tiebreak: 7 })], REQ)).to.equal(1);
  });

  it("passes over a worker that reports overload while another does not", () => {
    const full = { waiting: 3, running: 8, kvUsage: 0.99 };
    expect(isOverloaded(idle({ reported: full }))).to.equal(true);
    expect(isOverloaded(idle({ reported: { ...full, waiting: 0 } }))).to.equal(false);
    const workers = [idle({ cachedBlocks: 100, reported: full }), idle({ inflight: 7, capacity: 8 })];
    for (const policy of ["prefix", "least-loaded", "round-robin"] as const) {
      for (let turn = 0; turn < 3; turn++) expect(chooseWorker(policy, workers, { ...REQ, turn }, { loadWeightTokens: 0 })).to.equal(1);
    }
    // When every worker is overloaded, one is still chosen.
    expect(chooseWorker("prefix", [idle({ reported: full })], REQ)).to.equal(0);
  });

  it("least-loaded: the lowest load against capacity", () => {
    const workers = [idle({ inflight: 4, capacity: 8 }), idle({ inflight: 3, capacity: 4 }), idle({ inflight: 2, capacity: 8 })];
    expect(chooseWorker("least-loaded", workers, REQ)).to.equal(2);
  });

  it("round-robin: each in turn, whatever the prefix", () => {
    const workers = [idle({ cachedBlocks: 100 }), idle(), idle()];
    expect([0, 1, 2, 3, 4].map((turn) => chooseWorker("round-robin", workers, { ...REQ, turn }))).to.deep.equal([0, 1, 2, 0, 1]);
  });

  it("chooses nothing from no candidates", () => {
    expect(chooseWorker("prefix", [], REQ)).to.equal(undefined);
  });
});

describe("prefix index", () => {
  it("matches the leading blocks sent to a worker, and a report replaces what it guessed", () => {
    const index = new PrefixIndex();
    index.record("w1", ["a", "b", "c"], "s1");
    expect(index.matched("w1", ["a", "b", "x", "c"])).to.equal(2);
    expect(index.matched("w1", ["x", "a"])).to.equal(0);
    expect(index.matched("w2", ["a"])).to.equal(0);
    expect(index.sessionWorker("s1")).to.equal("w1");
    index.replace("w1", ["a"], Date.now() + 10_000);
    expect(index.matched("w1", ["a", "b"])).to.equal(1);
    index.replace("w1", [], Date.now() + 10_000);
    expect(index.matched("w1", ["a"])).to.equal(0);
    // Blocks sent just before or after the report was asked for stay: it may not show them yet.
    index.record("w1", ["d"]);
    index.replace("w1", [], Date.now() - 1_000);
    expect(index.matched("w1", ["d"])).to.equal(1);
    index.forget("w1");
    expect(index.size("w1")).to.equal(0);
    index.clear();
  });

  it("forgets blocks after their time to live", async () => {
    const index = new PrefixIndex({ ttlMs: 5 });
    index.record("w1", ["a"], "s");
    expect(index.matched("w1", ["a"])).to.equal(1);
    await new Promise((r) => setTimeout(r, 30));
    expect(index.matched("w1", ["a"])).to.equal(0);
    expect(index.sessionWorker("s")).to.equal(undefined);
    index.clear();
  });
});

describe("registry routing field", () => {
  it("defaults to prefix for generative models and least-loaded for others; takes a policy per model", () => {
    const table = new ModelTable();
    table.set("llm", parseModelSpec("llm", { versions: { v1: { weight: 1 } }, generate: true }));
    table.set("cls", parseModelSpec("cls", { versions: { v1: { weight: 1 } } }));
    table.set("rr", parseModelSpec("rr", { versions: { v1: { weight: 1 } }, generate: true, routing: "round-robin" }));
    expect([table.routing("llm"), table.routing("cls"), table.routing("rr"), table.routing("unknown")]).to.deep.equal(["prefix", "least-loaded", "round-robin", "least-loaded"]);
  });

  it("refuses an unknown policy, saying which are known", () => {
    expect(() => parseModelSpec("m", { versions: { v1: { weight: 1 } }, routing: "random" })).to.throw(ModelSpecError, /'routing' must be one of prefix, least-loaded, round-robin/);
  });
});
