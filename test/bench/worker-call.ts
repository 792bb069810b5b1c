/**
 * What every hand-written baseline does with one request: send it to the worker as a batch of
 * one and shape the result as docs/protocol.md has it (`timing.batch_size` 1). Shared by the
 * JetStream, RabbitMQ and BullMQ loops so they differ only in the broker.
 */
import type { WorkerClient } from "../../pipeline/workers/mod.js";

/** Deadline of one worker call. */
export const CALL_TIMEOUT_MS = 30_000;

const decoder = new TextDecoder();

interface Body {
  prompt?: string;
  inputs?: unknown;
  parameters?: Record<string, unknown>;
}

export interface OneResult {
  readonly ok: boolean;
  /** The result document, JSON. */
  readonly json: string;
}

/** Calls the worker for one request (a batch of one); never throws: failures become error results. */
export async function inferOne(
  worker: WorkerClient,
  req: { id: string; tenant: string; model: string; version: string; body: Uint8Array | string },
): Promise<OneResult> {
  const { id, tenant, model, version } = req;
  let result: Record<string, unknown>;
  try {
    const body = JSON.parse(typeof req.body === "string" ? req.body : decoder.decode(req.body)) as Body;
    const reply = await worker.infer(
      {
        model,
        version,
        requests: [
          {
            id,
            tenant,
            ...(body.prompt !== undefined ? { prompt: body.prompt } : {}),
            ...(body.inputs !== undefined ? { inputs: body.inputs } : {}),
            ...(body.parameters !== undefined ? { parameters: body.parameters } : {}),
          },
        ],
      },
      { deadlineMs: Date.now() + CALL_TIMEOUT_MS },
    );
    const item = reply.results[0];
    result = item
      ? { id, status: item.status, model, version, output: item.output, usage: item.usage, error: item.error, timing: { batch_size: 1 } }
      : { id, status: "error", error: { code: "INTERNAL", message: "no result" } };
  } catch (err) {
    result = { id, status: "error", error: { code: "INTERNAL", message: (err as Error).message } };
  }
  return { ok: result["status"] === "ok", json: JSON.stringify(result) };
}
