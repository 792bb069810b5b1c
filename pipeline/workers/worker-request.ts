/** A batch or a request as sent to a worker, its deadline, and any failure as a DispatchError. */
import { DispatchError } from "../../operators/dispatch-batch.js";
import type { Batch, RoutedJob } from "../../operators/types.js";
import type { ErrorCode } from "../../proto/wire.js";
import type { WorkerBatch, WorkerRequest } from "./worker-messages.js";

/** The latest request deadline of the batch, when every request has one. */
export function latestDeadline(batch: Batch): number | undefined {
  const deadlines = batch.jobs.map((j) => j.deadlineMs);
  return deadlines.every((x): x is number => x !== undefined) ? Math.max(...deadlines) : undefined;
}

export function batchDeadline(batch: Batch, timeoutMs: number): number {
  let d = Date.now() + timeoutMs;
  // The call need not outlive the latest request deadline in the batch.
  const deadlines = batch.jobs.map((j) => j.deadlineMs);
  if (deadlines.every((x): x is number => x !== undefined)) d = Math.min(d, Math.max(...deadlines));
  return d;
}

export function toWorkerRequest(job: RoutedJob): WorkerRequest {
  return {
    id: job.id,
    tenant: job.tenant,
    ...(job.prompt !== undefined ? { prompt: job.prompt } : {}),
    ...(job.inputs !== undefined ? { inputs: job.inputs } : {}),
    ...(job.parameters !== undefined ? { parameters: job.parameters } : {}),
    ...(job.deadlineMs !== undefined ? { deadlineMs: job.deadlineMs } : {}),
  };
}

export function toWorkerBatch(batch: Batch): WorkerBatch {
  return { model: batch.model, version: batch.version, requests: batch.jobs.map(toWorkerRequest) };
}

export function asDispatchError(err: unknown): DispatchError {
  if (err instanceof DispatchError) return err;
  const e = err as { code?: unknown; retriable?: unknown; message?: string };
  const code = typeof e?.code === "string" ? (e.code as ErrorCode) : "INTERNAL";
  return new DispatchError(e?.message ?? String(err), code, e?.retriable === true, { cause: err });
}
