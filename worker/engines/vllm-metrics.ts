/**
 * Reads a vLLM server's load from its Prometheus endpoint (`GET /metrics`, text exposition
 * format): `vllm:num_requests_waiting`, `vllm:num_requests_running` and
 * `vllm:kv_cache_usage_perc` (a share, 0 to 1; `vllm:gpu_cache_usage_perc` on servers before
 * it was renamed). Series of several models add up (usage: the highest), or only the served
 * model's when one is named.
 */
import type { EngineLoad } from "../engine.js";

const VLLM_WAITING = "vllm:num_requests_waiting";
const VLLM_RUNNING = "vllm:num_requests_running";
const VLLM_KV_USAGE = "vllm:kv_cache_usage_perc";
const VLLM_KV_USAGE_OLD = "vllm:gpu_cache_usage_perc";

/** The page lacks a metric the load needs. */
class VllmMetricsError extends Error {
  override readonly name = "VllmMetricsError";
  readonly code = "UNAVAILABLE" as const;
}

interface Sample {
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly value: number;
}

// name{labels} value [timestamp]
const SAMPLE_RE = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$/;
const LABEL_RE = /([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

/** The samples of a Prometheus text page (comments and malformed lines skipped). */
export function parsePrometheusText(text: string): Sample[] {
  const out: Sample[] = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    const m = SAMPLE_RE.exec(line);
    if (!m) continue;
    const value = Number(m[3]);
    if (Number.isNaN(value)) continue;
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? "").matchAll(LABEL_RE)) labels[l[1]!] = l[2]!.replace(/\\(.)/g, (_, c: string) => (c === "n" ? "\n" : c));
    out.push({ name: m[1]!, labels, value });
  }
  return out;
}

/** The load a vLLM `/metrics` page shows; throws a {@link VllmMetricsError} when it shows none. */
export function vllmLoadFromMetrics(text: string, servedModel?: string): EngineLoad {
  const samples = parsePrometheusText(text).filter((s) => servedModel === undefined || s.labels["model_name"] === undefined || s.labels["model_name"] === servedModel);
  const of = (name: string): Sample[] => samples.filter((s) => s.name === name);
  const waiting = of(VLLM_WAITING);
  const running = of(VLLM_RUNNING);
  const usage = of(VLLM_KV_USAGE).length > 0 ? of(VLLM_KV_USAGE) : of(VLLM_KV_USAGE_OLD);
  const missing = [
    ...(waiting.length === 0 ? [VLLM_WAITING] : []),
    ...(running.length === 0 ? [VLLM_RUNNING] : []),
    ...(usage.length === 0 ? [VLLM_KV_USAGE] : []),
  ];
  if (missing.length > 0) {
    throw new VllmMetricsError(`vLLM /metrics lacks ${missing.join(", ")}${servedModel !== undefined ? ` for model '${servedModel}'` : ""}`);
  }
  const sum = (xs: Sample[]): number => xs.reduce((a, s) => a + s.value, 0);
  return {
    waiting: Math.max(0, Math.round(sum(waiting))),
    running: Math.max(0, Math.round(sum(running))),
    kvUsage: Math.min(1, Math.max(0, ...usage.map((s) => s.value))),
  };
}
