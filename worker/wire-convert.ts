/** Worker messages to engine requests and engine answers to worker messages and gRPC statuses. */
import * as grpc from "@grpc/grpc-js";
import { fromStruct, fromValue, toValue } from "../proto/json.js";
import { type IInferItemResult, type IInferRequest, type IOutput } from "../proto/service.js";
import { EngineError, type EngineItemResult, type EngineRequest } from "./engine.js";

/** A request of a batch that cannot go to the engine. */
export class InvalidRequest {
  constructor(readonly message: string) {}
}

export function toEngineRequest(
  r: IInferRequest,
  model: string,
  version: string,
  traceparent: string | undefined,
): EngineRequest | InvalidRequest {
  const id = r.id ?? "";
  if (id === "") return new InvalidRequest("request has no id");
  const hasInputs = r.inputs !== null && r.inputs !== undefined;
  const prompt = r.prompt ? r.prompt : undefined;
  if (prompt === undefined && !hasInputs) return new InvalidRequest(`request '${id}' has neither prompt nor inputs`);
  const deadline = Number(r.deadline_unix_ms ?? 0);
  const req: {
    -readonly [K in keyof EngineRequest]: EngineRequest[K];
  } = { id, tenant: r.tenant ?? "", model, version };
  if (prompt !== undefined) req.prompt = prompt;
  if (hasInputs) req.inputs = fromValue(r.inputs);
  if (r.parameters) req.parameters = fromStruct(r.parameters);
  if (deadline > 0) req.deadlineMs = deadline;
  if (traceparent !== undefined) req.traceparent = traceparent;
  return req;
}

export function toItemResult(id: string, answer: EngineItemResult | undefined): IInferItemResult {
  if (!answer) return { id, status: "error", error: { code: "INTERNAL", message: "engine gave no result" } };
  if (!answer.ok) {
    return {
      id,
      status: "error",
      error: { code: answer.error.code, message: answer.error.message },
      not_started: answer.notStarted === true,
    };
  }
  try {
    const output: IOutput = { text: answer.output.text ?? "" };
    if (answer.output.data !== undefined) output.data = toValue(answer.output.data);
    return { id, status: "ok", output, usage: answer.usage };
  } catch (err) {
    return { id, status: "error", error: { code: "INTERNAL", message: `bad engine output: ${errorMessage(err)}` } };
  }
}


/** Maps an error to the gRPC status a client sees. */
export function toStatus(err: unknown): Partial<grpc.StatusObject> {
  if (err instanceof EngineError) return { code: grpc.status[err.code], details: err.message };
  return { code: grpc.status.INTERNAL, details: errorMessage(err) };
}

function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
