import { expect } from "chai";
import { TestScheduler } from "rxjs/testing";
import { routeToVersion, type RouteDecision } from "../../operators/route-to-version.js";
import { errorResult, type InferJob, type Outcome, type RoutedJob } from "../../operators/types.js";
import { inertDelivery } from "../support/deliveries.js";

const delivery = inertDelivery();

function job(id: string, model: string, pinnedVersion?: string): InferJob {
  const j: InferJob = { id, tenant: "acme", model, priority: "normal", prompt: id, stream: false, delivery };
  return pinnedVersion === undefined ? j : { ...j, pinnedVersion };
}

/** A registry of two models; a pinned version wins when the model has it. */
const versions: Record<string, string[]> = { llama: ["v1", "v2"], mistral: ["v7"] };
function decide(j: InferJob): RouteDecision {
  const vs = versions[j.model];
  if (!vs) return { ok: false, error: { code: "NOT_FOUND", message: `unknown model '${j.model}'` } };
  if (j.pinnedVersion !== undefined) {
    return vs.includes(j.pinnedVersion)
      ? { ok: true, version: j.pinnedVersion }
      : { ok: false, error: { code: "NOT_FOUND", message: `unknown version '${j.pinnedVersion}'` } };
  }
  return { ok: true, version: vs[0]! };
}

const routed = (j: InferJob, version: string): RoutedJob => ({ ...j, version });
const failed = (j: InferJob, code: "NOT_FOUND" | "INTERNAL", message: string): Outcome => ({
  kind: "result",
  job: j,
  result: errorResult(j, code, message),
});

describe("routeToVersion", () => {
  let ts: TestScheduler;
  beforeEach(() => {
    ts = new TestScheduler((actual, expected) => {
      expect(actual).to.deep.equal(expected);
    });
  });

  const a = job("a", "llama");
  const p = job("p", "llama", "v2");
  const m = job("m", "mistral");
  const u = job("u", "unknown");
  const bad = job("bad", "llama", "v9");

  it("stamps the chosen version on each job, keeping every other field", () => {
    ts.run(({ cold, expectObservable }) => {
      const source = cold("-a-p-m-|", { a, p, m });
      expectObservable(source.pipe(routeToVersion(decide))).toBe("-a-p-m-|", {
        a: routed(a, "v1"),
        p: routed(p, "v2"),
        m: routed(m, "v7"),
      });
    });
  });

  it("answers a job that cannot be routed with the decision's error, and goes on", () => {
    ts.run(({ cold, expectObservable }) => {
      const source = cold("-u-b-a-|", { u, b: bad, a });
      expectObservable(source.pipe(routeToVersion(decide))).toBe("-U-B-a-|", {
        U: failed(u, "NOT_FOUND", "unknown model 'unknown'"),
        B: failed(bad, "NOT_FOUND", "unknown version 'v9'"),
        a: routed(a, "v1"),
      });
    });
  });

  it("turns a throwing decide into an INTERNAL result, without ending the stream", () => {
    ts.run(({ cold, expectObservable }) => {
      const source = cold("-a-u-a-|", { a, u });
      const throwsOnUnknown = (j: InferJob): RouteDecision => {
        if (j.model === "unknown") throw new Error("registry not loaded");
        return decide(j);
      };
      expectObservable(source.pipe(routeToVersion(throwsOnUnknown))).toBe("-a-U-a-|", {
        a: routed(a, "v1"),
        U: failed(u, "INTERNAL", "routing failed: registry not loaded"),
      });
    });
  });

  it("asks decide once per job, with the job, and never changes the job it was given", () => {
    ts.run(({ cold, expectObservable, flush }) => {
      const asked: InferJob[] = [];
      const source = cold("-a-u-|", { a, u });
      const spy = (j: InferJob): RouteDecision => {
        asked.push(j);
        return decide(j);
      };
      expectObservable(source.pipe(routeToVersion(spy))).toBe("-a-U-|", {
        a: routed(a, "v1"),
        U: failed(u, "NOT_FOUND", "unknown model 'unknown'"),
      });
      flush();
      expect(asked).to.have.length(2);
      expect(asked[0]).to.equal(a);
      expect(asked[1]).to.equal(u);
      expect(a.version).to.equal(undefined);
    });
  });

  it("forwards an error of the source", () => {
    ts.run(({ cold, expectObservable, expectSubscriptions }) => {
      const source = cold("-a-#", { a }, new Error("upstream"));
      expectObservable(source.pipe(routeToVersion(decide))).toBe("-a-#", { a: routed(a, "v1") }, new Error("upstream"));
      expectSubscriptions(source.subscriptions).toBe("^--!");
    });
  });

  it("unsubscribes from the source when unsubscribed", () => {
    ts.run(({ cold, expectObservable, expectSubscriptions }) => {
      const source = cold("-a-a-a-|", { a });
      expectObservable(source.pipe(routeToVersion(decide)), "^---!").toBe("-a-a", { a: routed(a, "v1") });
      expectSubscriptions(source.subscriptions).toBe("^---!");
    });
  });
});
