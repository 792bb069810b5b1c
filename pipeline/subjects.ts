/** Subject names of PROTOCOL.md, in one place. */
import type { Priority } from "../operators/types.js";

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

/** Placeholder token for a DLQ subject when the request's tenant or model is unusable. */
export const UNKNOWN_TOKEN = "_unknown";

export const TOKEN_RE = /^[a-z0-9_-]{1,64}$/;
export const ID_RE = /^[A-Za-z0-9_-]{1,128}$/;

export const H = {
  msgId: "Nats-Msg-Id",
  contentType: "Content-Type",
  traceparent: "traceparent",
  tracestate: "tracestate",
  version: "Infer-Version",
  deadline: "Infer-Deadline",
  stream: "Infer-Stream",
  session: "Infer-Session",
  status: "Infer-Status",
  errorCode: "Infer-Error-Code",
  errorReason: "Infer-Error-Reason",
  originalSubject: "Infer-Original-Subject",
  deliveries: "Infer-Deliveries",
} as const;
