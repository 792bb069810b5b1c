/**
 * grpc-js service definitions for the worker contract (docs/protocol.md, "Workers (gRPC)"): the
 * `infer.v1.Worker` service and the standard `grpc.health.v1.Health` service, serialized with
 * the generated protobufjs code (no proto-loader at run time).
 */
import * as grpc from "@grpc/grpc-js";
import type * as gen from "./gen/inference.js";
import { infer, grpc as grpcHealth } from "./gen/inference.js";

// The wire types under the generated names. `infer` is a keyword in type positions, so
// TypeScript cannot parse `infer.v1.X` as a type; code elsewhere imports these aliases instead.
// An `I...` name is the message interface (what encode accepts, plain objects included); the
// bare name is the decoded message class.
export type IInferRequest = gen.infer.v1.IInferRequest;
export type InferRequest = gen.infer.v1.InferRequest;
export type IInferBatch = gen.infer.v1.IInferBatch;
export type InferBatch = gen.infer.v1.InferBatch;
export type IOutput = gen.infer.v1.IOutput;
export type IUsage = gen.infer.v1.IUsage;
export type IError = gen.infer.v1.IError;
export type IInferItemResult = gen.infer.v1.IInferItemResult;
export type InferItemResult = gen.infer.v1.InferItemResult;
export type IInferBatchResult = gen.infer.v1.IInferBatchResult;
export type InferBatchResult = gen.infer.v1.InferBatchResult;
export type IGenerateRequest = gen.infer.v1.IGenerateRequest;
export type GenerateRequest = gen.infer.v1.GenerateRequest;
export type IGenerateChunk = gen.infer.v1.IGenerateChunk;
export type GenerateChunk = gen.infer.v1.GenerateChunk;
export type ILoadRequest = gen.infer.v1.ILoadRequest;
export type LoadRequest = gen.infer.v1.LoadRequest;
export type IWorkerLoad = gen.infer.v1.IWorkerLoad;
export type WorkerLoad = gen.infer.v1.WorkerLoad;
export type IHealthCheckRequest = gen.grpc.health.v1.IHealthCheckRequest;
export type HealthCheckRequest = gen.grpc.health.v1.HealthCheckRequest;
export type IHealthCheckResponse = gen.grpc.health.v1.IHealthCheckResponse;
export type HealthCheckResponse = gen.grpc.health.v1.HealthCheckResponse;

/** Fully qualified name of the worker service, also the name its health status is kept under. */
export const WORKER_SERVICE_NAME = "infer.v1.Worker";
/** Fully qualified name of the standard health service. */
const HEALTH_SERVICE_NAME = "grpc.health.v1.Health";

/** What the generated message classes offer for the wire. */
interface MessageCodec<Encoded, Decoded> {
  encode(message: Encoded): { finish(): Uint8Array };
  decode(bytes: Uint8Array): Decoded;
}

function toBuffer(bytes: Uint8Array): Buffer {
  // protobufjs already hands out a Buffer on Node; wrap without copying either way.
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/**
 * A method whose sent and received types differ: what a side sends may be a plain object of the
 * message interface, what it receives is the decoded message class.
 */
export interface WireMethodDefinition<Req, Res, DecodedReq, DecodedRes> {
  readonly path: string;
  readonly requestStream: boolean;
  readonly responseStream: boolean;
  readonly requestSerialize: grpc.serialize<Req>;
  readonly requestDeserialize: grpc.deserialize<DecodedReq>;
  readonly responseSerialize: grpc.serialize<Res>;
  readonly responseDeserialize: grpc.deserialize<DecodedRes>;
  readonly originalName?: string;
}

function method<Req, Res, DecodedReq, DecodedRes>(
  path: string,
  originalName: string,
  responseStream: boolean,
  req: MessageCodec<Req, DecodedReq>,
  res: MessageCodec<Res, DecodedRes>,
): WireMethodDefinition<Req, Res, DecodedReq, DecodedRes> {
  return {
    path,
    originalName,
    requestStream: false,
    responseStream,
    requestSerialize: (message: Req) => toBuffer(req.encode(message).finish()),
    requestDeserialize: (bytes: Buffer) => req.decode(bytes),
    responseSerialize: (message: Res) => toBuffer(res.encode(message).finish()),
    responseDeserialize: (bytes: Buffer) => res.decode(bytes),
  };
}

const v1 = infer.v1;
const health = grpcHealth.health.v1;

/**
 * The `infer.v1.Worker` service. Handlers receive decoded messages (`InferBatch`,
 * `GenerateRequest`) and may answer with plain objects of the message interfaces.
 */
export interface WorkerServiceDefinitionType extends grpc.ServiceDefinition {
  readonly Infer: WireMethodDefinition<IInferBatch, IInferBatchResult, InferBatch, InferBatchResult>;
  readonly Generate: WireMethodDefinition<IGenerateRequest, IGenerateChunk, GenerateRequest, GenerateChunk>;
  readonly GetLoad: WireMethodDefinition<ILoadRequest, IWorkerLoad, LoadRequest, WorkerLoad>;
}

export const WorkerServiceDefinition: WorkerServiceDefinitionType = {
  Infer: method<IInferBatch, IInferBatchResult, InferBatch, InferBatchResult>(
    `/${WORKER_SERVICE_NAME}/Infer`,
    "infer",
    false,
    v1.InferBatch,
    v1.InferBatchResult,
  ),
  Generate: method<IGenerateRequest, IGenerateChunk, GenerateRequest, GenerateChunk>(
    `/${WORKER_SERVICE_NAME}/Generate`,
    "generate",
    true,
    v1.GenerateRequest,
    v1.GenerateChunk,
  ),
  GetLoad: method<ILoadRequest, IWorkerLoad, LoadRequest, WorkerLoad>(
    `/${WORKER_SERVICE_NAME}/GetLoad`,
    "getLoad",
    false,
    v1.LoadRequest,
    v1.WorkerLoad,
  ),
};

/** The standard `grpc.health.v1.Health` service. */
export interface HealthServiceDefinitionType extends grpc.ServiceDefinition {
  readonly Check: WireMethodDefinition<IHealthCheckRequest, IHealthCheckResponse, HealthCheckRequest, HealthCheckResponse>;
  readonly Watch: WireMethodDefinition<IHealthCheckRequest, IHealthCheckResponse, HealthCheckRequest, HealthCheckResponse>;
}

export const HealthServiceDefinition: HealthServiceDefinitionType = {
  Check: method<IHealthCheckRequest, IHealthCheckResponse, HealthCheckRequest, HealthCheckResponse>(
    `/${HEALTH_SERVICE_NAME}/Check`,
    "check",
    false,
    health.HealthCheckRequest,
    health.HealthCheckResponse,
  ),
  Watch: method<IHealthCheckRequest, IHealthCheckResponse, HealthCheckRequest, HealthCheckResponse>(
    `/${HEALTH_SERVICE_NAME}/Watch`,
    "watch",
    true,
    health.HealthCheckRequest,
    health.HealthCheckResponse,
  ),
};

/** Serving status of the health protocol (the generated enum). */
export const ServingStatus = health.HealthCheckResponse.ServingStatus;
export type ServingStatus = gen.grpc.health.v1.HealthCheckResponse.ServingStatus;

/** Handlers a server implements for {@link WorkerServiceDefinition}. */
export interface WorkerServiceHandlers extends grpc.UntypedServiceImplementation {
  Infer: grpc.handleUnaryCall<InferBatch, IInferBatchResult>;
  Generate: grpc.handleServerStreamingCall<GenerateRequest, IGenerateChunk>;
  /** A server whose engine reports no load answers UNIMPLEMENTED, as one older than it does. */
  GetLoad: grpc.handleUnaryCall<LoadRequest, IWorkerLoad>;
}

/** Handlers a server implements for {@link HealthServiceDefinition}. */
export interface HealthServiceHandlers extends grpc.UntypedServiceImplementation {
  Check: grpc.handleUnaryCall<HealthCheckRequest, IHealthCheckResponse>;
  Watch: grpc.handleServerStreamingCall<HealthCheckRequest, IHealthCheckResponse>;
}

/**
 * Generic client constructors (`new WorkerGrpcClient(address, credentials, options)`). The
 * instances are `grpc.Client`s with one method per RPC; typed code can instead call
 * `makeUnaryRequest` / `makeServerStreamRequest` on them with the definitions above.
 */
export const WorkerGrpcClient: grpc.ServiceClientConstructor = grpc.makeGenericClientConstructor(
  WorkerServiceDefinition,
  "Worker",
);
export const HealthGrpcClient: grpc.ServiceClientConstructor = grpc.makeGenericClientConstructor(
  HealthServiceDefinition,
  "Health",
);
