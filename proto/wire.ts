/**
 * The wire vocabulary of docs/protocol.md in one place: error codes, priorities, the rules for
 * names, subjects, header names, and the names of streams and buckets. Everything else imports
 * these from here (this module imports nothing), so a name on the wire is written once.
 */

// ---- error codes and priorities -----------------------------------------------------------

/** Error codes, named as gRPC's (protocol, "Error codes"). */
export type ErrorCode =
  | "INVALID_ARGUMENT"
  | "NOT_FOUND"
  | "RESOURCE_EXHAUSTED"
  | "DEADLINE_EXCEEDED"
  | "CANCELLED"
  | "UNAVAILABLE"
  | "INTERNAL";

export const ERROR_CODES: readonly ErrorCode[] = [
  "INVALID_ARGUMENT",
  "NOT_FOUND",
  "RESOURCE_EXHAUSTED",
  "DEADLINE_EXCEEDED",
  "CANCELLED",
  "UNAVAILABLE",
  "INTERNAL",
];

export type Priority = "high" | "normal" | "low";
/** Highest first. */
export const PRIORITIES: readonly Priority[] = ["high", "normal", "low"];

// ---- names --------------------------------------------------------------------------------

/** A tenant or model name: one subject token. */
export const TOKEN_RE = /^[a-z0-9_-]{1,64}$/;
/** A request id (`Nats-Msg-Id`). */
export const ID_RE = /^[A-Za-z0-9_-]{1,128}$/;
/** A model version name (`Infer-Version`, registry keys, worker registrations). */
export const VERSION_RE = /^[A-Za-z0-9._-]{1,64}$/;
/** A worker id in the worker registry. */
export const WORKER_ID_RE = /^[A-Za-z0-9_-]{1,64}$/;
/** A replay session name. */
export const SESSION_RE = /^[A-Za-z0-9_-]{1,64}$/;
/** `Infer-Session`: a conversation, kept on one worker while it can take it. */
export const INFER_SESSION_RE = /^[A-Za-z0-9._:@-]{1,128}$/;
/** `Infer-Deadline`: epoch milliseconds, digits only. */
export const DEADLINE_RE = /^[1-9][0-9]*$/;

/** Largest request body the pipeline accepts by default (256 KiB). */
export const DEFAULT_MAX_PAYLOAD_BYTES = 262_144;

/** Placeholder token for a DLQ subject when the request's tenant or model is unusable. */
export const UNKNOWN_TOKEN = "_unknown";

// ---- subjects -----------------------------------------------------------------------------

export const subjects = {
  resultsAll: "infer.res.>",
  tokensAll: "infer.tok.>",
  dlqAll: "infer.dlq.>",
  requestsOfPriority: (p: Priority): string => `infer.req.${p}.*.*`,
  request: (p: Priority, tenant: string, model: string): string => `infer.req.${p}.${tenant}.${model}`,
  result: (tenant: string, id: string): string => `infer.res.${tenant}.${id}`,
  /**
   * A result that reached `infer.res.<tenant>.<id>` live while INFER_RES refused to store it,
   * stored here afterwards so the client does not get it twice (pipeline only, never delivered
   * to clients). A request's stored result is under one of the two subjects.
   */
  kept: (tenant: string, id: string): string => `infer.kept.${tenant}.${id}`,
  keptAll: "infer.kept.>",
  resultsOfTenant: (tenant: string): string => `infer.res.${tenant}.>`,
  tokens: (tenant: string, id: string): string => `infer.tok.${tenant}.${id}`,
  cancel: (tenant: string, id: string): string => `infer.cancel.${tenant}.${id}`,
  cancelAll: "infer.cancel.*.*",
  dlq: (tenant: string, model: string): string => `infer.dlq.${tenant}.${model}`,
  /** Results of shadow copies, for comparison; never seen by clients (core NATS). */
  shadow: (tenant: string, id: string): string => `infer.shadow.${tenant}.${id}`,
  shadowAll: "infer.shadow.>",
};

/** A request subject `infer.req.<priority>.<tenant>.<model>`: groups 1-3 are priority, tenant, model. */
export const REQUEST_SUBJECT_RE = /^infer\.req\.(high|normal|low)\.([a-z0-9_-]{1,64})\.([a-z0-9_-]{1,64})$/;

/** Subjects of a replay session (`infer.replay.<session>.>`). */
export const replaySubjects = {
  all: (session: string): string => `infer.replay.${session}.>`,
  result: (session: string, tenant: string, id: string): string => `infer.replay.${session}.res.${tenant}.${id}`,
  results: (session: string): string => `infer.replay.${session}.res.>`,
  /** Chunks of a replayed streamed request (live: `infer.tok.<tenant>.<id>`). */
  tokens: (session: string, tenant: string, id: string): string => `infer.replay.${session}.tok.${tenant}.${id}`,
  dlq: (session: string, tenant: string, model: string): string => `infer.replay.${session}.dlq.${tenant}.${model}`,
};

// ---- headers ------------------------------------------------------------------------------

export const H = {
  msgId: "Nats-Msg-Id",
  contentType: "Content-Type",
  traceparent: "traceparent",
  tracestate: "tracestate",
  version: "Infer-Version",
  deadline: "Infer-Deadline",
  stream: "Infer-Stream",
  /** A conversation: its requests go to the worker the last one went to, while it can take them. */
  inferSession: "Infer-Session",
  status: "Infer-Status",
  errorCode: "Infer-Error-Code",
  errorReason: "Infer-Error-Reason",
  originalSubject: "Infer-Original-Subject",
  deliveries: "Infer-Deliveries",
  /** Dead letter: the request's `Nats-Msg-Id`. */
  requestId: "Infer-Request-Id",
  /** Dead letter: the request's sequence in INFER_REQ. */
  originalSeq: "Infer-Original-Seq",
  /** Dead letter: the request's body and headers were too large to keep; why, and where it is. */
  bodyOmitted: "Infer-Body-Omitted",
  /** Claim check: the body is the object of this key in the tenant's payload bucket (`req/<id>`, `res/<id>`). */
  bodyRef: "Infer-Body-Ref",
  /** Claim check: the object's size in bytes. */
  bodySize: "Infer-Body-Size",
  /** Claim check (optional): the object's digest, `SHA-256=<base64url>`. */
  bodyDigest: "Infer-Body-Digest",
} as const;

/** Headers a replay adds to its results and dead letters. */
export const REPLAY_HEADERS = {
  /** The original request's `traceparent`: the link from the replayed trace to the original. */
  ofTraceparent: "Infer-Replay-Of-Traceparent",
  session: "Infer-Replay-Session",
  /** Stream sequence of the original request in `INFER_REQ`. */
  ofSeq: "Infer-Replay-Of-Seq",
  /** A result too large for one message went without its output (the report compares it whole). */
  outputOmitted: "Infer-Replay-Output-Omitted",
} as const;

// ---- streams and buckets ------------------------------------------------------------------

export const STREAM_REQUESTS = "INFER_REQ";
export const STREAM_RESULTS = "INFER_RES";
export const STREAM_DLQ = "INFER_DLQ";

/** Model registry: key `<model>`. */
export const MODELS_BUCKET = "infer_models";
/** Tenant limits: key `<tenant>`. */
export const TENANTS_BUCKET = "infer_tenants";
/** Worker registrations: key `<model>.<version>.<worker-id>`. */
export const WORKERS_BUCKET = "infer_workers";
/** Large bodies (claim check): object store bucket `infer_payloads_<tenant>`, keys `req/<id>`, `res/<id>`. */
export const PAYLOADS_BUCKET_PREFIX = "infer_payloads_";
/** API keys of the HTTP gateway: key the SHA-256 hex of an API key, value `{"tenant": …}`. */
export const API_KEYS_BUCKET = "infer_api_keys";
/** Async requests accepted by the HTTP gateway: key `<tenant>.<id>`. */
export const HTTP_REQUESTS_BUCKET = "infer_http_requests";
/** Result cache: key `tenant.<tenant>.<model>.<hash>` or `shared.<model>.<hash>`. */
export const CACHE_BUCKET = "infer_cache";
