/** The gRPC calls the worker serves: their types, deadlines, metadata, and writing a stream with backpressure. */
import * as grpc from "@grpc/grpc-js";
import { type GenerateRequest, type HealthCheckRequest, type IGenerateChunk, type IHealthCheckResponse, type IInferBatchResult, type InferBatch, type IWorkerLoad, type LoadRequest } from "../proto/service.js";

export type HealthWatchCall = grpc.ServerWritableStream<HealthCheckRequest, IHealthCheckResponse>;
export type GenerateCall = grpc.ServerWritableStream<GenerateRequest, IGenerateChunk>;
export type InferCall = grpc.ServerUnaryCall<InferBatch, IInferBatchResult>;
export type LoadCall = grpc.ServerUnaryCall<LoadRequest, IWorkerLoad>;

/** Writes one chunk, waiting for the stream to drain when its buffer is full. */
export function writeChunk(call: GenerateCall, chunk: IGenerateChunk, signal: AbortSignal): Promise<void> {
  if (call.write(chunk)) return Promise.resolve();
  return new Promise<void>((resolve) => {
    const done = (): void => {
      call.removeListener("drain", done);
      signal.removeEventListener("abort", done);
      resolve();
    };
    call.once("drain", done);
    signal.addEventListener("abort", done, { once: true });
  });
}


export function deadlineOf(call: InferCall | GenerateCall): number | undefined {
  const d = call.getDeadline();
  const ms = d instanceof Date ? d.getTime() : d;
  return Number.isFinite(ms) ? ms : undefined;
}

export function metadataString(metadata: grpc.Metadata, key: string): string | undefined {
  const v = metadata.get(key)[0];
  return typeof v === "string" && v !== "" ? v : undefined;
}

export function hostPort(host: string, port: number): string {
  return host.includes(":") && !host.startsWith("[") ? `[${host}]:${port}` : `${host}:${port}`;
}
