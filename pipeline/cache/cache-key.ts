/**
 * Which requests the result cache may answer, and the key of each: pure functions of the request
 * and its model's registry entry.
 *
 * The key is `tenant.<tenant>.<model>.<hash>` (or `shared.<model>.<hash>` for a model whose
 * cache is shared by all tenants), the hash a SHA-256 of the canonical JSON (RFC 8785: keys in
 * a fixed order, one spelling per number) of the scope, model, version, prompt, inputs and
 * parameters. The same request written with its keys in another order is the same request; a
 * tenant's key never matches another tenant's.
 */
import { createHash } from "node:crypto";
import canonicalize from "canonicalize";
import type { RoutedJob } from "../../operators/types.js";
import type { ModelSpec } from "../routing/registry.js";

/**
 * True when the same request always gets the same answer, so a stored answer may stand in for
 * running it: a non-generative model (unless the request asks for sampling with a temperature
 * above 0), or a generative one asked for temperature 0 with a seed. Streamed requests are never
 * answered from the cache (their client waits for chunks).
 */
export function isDeterministic(job: Pick<RoutedJob, "parameters" | "stream">, spec: Pick<ModelSpec, "generate">): boolean {
  if (job.stream) return false;
  const temperature = job.parameters?.["temperature"];
  if (spec.generate === true) {
    const seed = job.parameters?.["seed"];
    return temperature === 0 && typeof seed === "number" && Number.isInteger(seed);
  }
  return temperature === undefined || temperature === 0;
}

/**
 * The cache key of a request, or undefined when it may not be cached: its model has no `cache`,
 * it is not deterministic, or it cannot be written canonically (a lone surrogate in a string).
 */
export function resultCacheKey(job: RoutedJob, spec: ModelSpec | undefined): string | undefined {
  const cache = spec?.cache;
  if (spec === undefined || cache === undefined || !isDeterministic(job, spec)) return undefined;
  const scope = cache.shared === true ? "shared" : `tenant.${job.tenant}`;
  let canonical: string | undefined;
  try {
    canonical = canonicalize({
      scope,
      model: job.model,
      version: job.version,
      prompt: job.prompt,
      inputs: job.inputs,
      parameters: job.parameters,
    });
  } catch {
    return undefined;
  }
  if (canonical === undefined) return undefined;
  const hash = createHash("sha256").update(canonical).digest("base64url");
  return `${scope}.${job.model}.${hash}`;
}
