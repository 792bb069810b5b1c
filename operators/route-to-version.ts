import { map, type OperatorFunction } from "rxjs";
import { errorResult, type ErrorInfo, type InferJob, type Outcome, type RoutedJob } from "./types.js";

export type RouteDecision = { ok: true; version: string } | { ok: false; error: ErrorInfo };

/**
 * Chooses the model version of each job (pinned, weighted, ...: the `decide` function knows how)
 * and stamps it on the job; a job that cannot be routed becomes an error result.
 *
 * ```
 * input:  a(llama) b(unknown)
 * output: a@v1     B(NOT_FOUND)
 * ```
 */
export function routeToVersion(decide: (job: InferJob) => RouteDecision): OperatorFunction<InferJob, RoutedJob | Outcome> {
  return map((job) => {
    let d: RouteDecision;
    try {
      d = decide(job);
    } catch (err) {
      d = { ok: false, error: { code: "INTERNAL", message: `routing failed: ${(err as Error).message}` } };
    }
    if (d.ok) return { ...job, version: d.version } satisfies RoutedJob;
    return { kind: "result", job, result: errorResult(job, d.error.code, d.error.message) } satisfies Outcome;
  });
}
