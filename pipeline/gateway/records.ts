/**
 * Records of async requests (`Prefer: respond-async`, `callback_url`), kept in the KV bucket
 * `infer_http_requests` under `<tenant>.<id>` for `asyncRecordTtlMs`: any gateway can answer
 * `GET /v1/requests/{id}` for a request another one accepted. The result itself stays in
 * `INFER_RES`; the record says how to present it and that the request exists (404 otherwise).
 */
import { Kvm, type KV } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";
import { HTTP_REQUESTS_BUCKET } from "../../proto/wire.js";

export { HTTP_REQUESTS_BUCKET };

/** Which endpoint accepted the request: how its result is presented. */
export type RequestKind = "chat" | "completion" | "embeddings" | "infer";

export interface AsyncRecord {
  kind: RequestKind;
  model: string;
  /** Sluice requests behind it: more than one for an embeddings array (ids `<id>-<i>`). */
  n: number;
  max_tokens?: number;
  encoding?: "float" | "base64";
  callback_url?: string;
  /** Epoch ms. */
  created: number;
}

/** The sluice request ids behind an HTTP request id. */
export function partIds(id: string, n: number, kind: RequestKind): string[] {
  return kind === "embeddings" ? Array.from({ length: n }, (_, i) => `${id}-${i}`) : [id];
}

export class AsyncRecords {
  private constructor(private readonly kv: KV) {}

  static async open(nc: NatsConnection, ttlMs: number, replicas = 1): Promise<AsyncRecords> {
    return new AsyncRecords(await new Kvm(nc).create(HTTP_REQUESTS_BUCKET, { history: 1, ttl: ttlMs, replicas }));
  }

  async put(tenant: string, id: string, r: AsyncRecord): Promise<void> {
    await this.kv.put(`${tenant}.${id}`, JSON.stringify(r));
  }

  async get(tenant: string, id: string): Promise<AsyncRecord | undefined> {
    const e = await this.kv.get(`${tenant}.${id}`);
    if (!e || e.operation !== "PUT") return undefined;
    return e.json<AsyncRecord>();
  }
}
