/** Requests to their wire form and results, health statuses and batch parts from it. */
import { ERROR_CODES } from "../../proto/wire.js";
import { fromValue, toStruct, toValue } from "../../proto/json.js";
import { ServingStatus, type IInferItemResult, type IInferRequest } from "../../proto/service.js";
import type { HealthStatus, WorkerItemResult, WorkerRequest } from "./worker-messages.js";

/**
 * A request to its wire form (`InferRequest`). Throws a `JsonValueError` for inputs or
 * parameters that JSON cannot carry (NaN, Infinity, functions, ...).
 */
export function toWireRequest(r: WorkerRequest): IInferRequest {
  const m: IInferRequest = { id: r.id };
  if (r.tenant !== undefined) m.tenant = r.tenant;
  if (r.prompt !== undefined) m.prompt = r.prompt;
  if (r.inputs !== undefined) m.inputs = toValue(r.inputs);
  if (r.parameters !== undefined) m.parameters = toStruct(r.parameters);
  if (r.deadlineMs !== undefined && r.deadlineMs > 0) m.deadline_unix_ms = Math.floor(r.deadlineMs);
  return m;
}

export function fromItemResult(r: IInferItemResult): WorkerItemResult {
  const id = r.id ?? "";
  const notStarted = r.not_started === true;
  if (r.status === "ok") {
    const output: { text: string; data?: unknown } = { text: r.output?.text ?? "" };
    if (r.output?.data !== null && r.output?.data !== undefined) output.data = fromValue(r.output.data);
    return {
      id,
      status: "ok",
      output,
      usage: { prompt_tokens: r.usage?.prompt_tokens ?? 0, completion_tokens: r.usage?.completion_tokens ?? 0 },
      not_started: notStarted,
    };
  }
  const sent = r.error?.code ?? "";
  const code = ERROR_CODES.find((c) => c === sent);
  let message = r.error?.message ?? "";
  if (r.status !== "error") message = `worker answered status '${r.status ?? ""}'${message ? `: ${message}` : ""}`;
  else if (!code) message = `${sent || "no error code"}${message ? `: ${message}` : ""}`;
  return { id, status: "error", error: { code: code ?? "INTERNAL", message }, not_started: notStarted };
}

export function statusName(status: ServingStatus | null | undefined): HealthStatus {
  switch (status) {
    case ServingStatus.SERVING:
      return "SERVING";
    case ServingStatus.NOT_SERVING:
      return "NOT_SERVING";
    case ServingStatus.SERVICE_UNKNOWN:
      return "SERVICE_UNKNOWN";
    default:
      return "UNKNOWN";
  }
}

/** Consecutive parts of `requests` with at most `maxBytes` of inputs each (a larger request alone). */
export function splitByBytes(requests: readonly WorkerRequest[], maxBytes: number): WorkerRequest[][] {
  const parts: WorkerRequest[][] = [];
  let part: WorkerRequest[] = [];
  let bytes = 0;
  for (const r of requests) {
    // Characters, not UTF-8 bytes: a cheap bound that is exact for ASCII and within 3x otherwise.
    const size = (r.prompt?.length ?? 0) + (r.inputs === undefined ? 0 : approxJsonLength(r.inputs));
    if (part.length > 0 && bytes + size > maxBytes) {
      parts.push(part);
      part = [];
      bytes = 0;
    }
    part.push(r);
    bytes += size;
  }
  if (part.length > 0) parts.push(part);
  return parts;
}

/** Length of a JSON value's text; 0 when it has none (the encoder reports that later). */
function approxJsonLength(v: unknown): number {
  if (typeof v === "string") return v.length;
  try {
    return JSON.stringify(v)?.length ?? 0;
  } catch {
    return 0;
  }
}
