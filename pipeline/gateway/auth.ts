/**
 * API keys: `Authorization: Bearer <key>` names a tenant. Keys are kept only as their SHA-256
 * (hex), in the configuration (`gateway.apiKeys`) and in the KV bucket `infer_api_keys` (key: the
 * hash, value `{"tenant": "<tenant>"}`), which is watched: a key added or removed there takes
 * effect without a restart.
 */
import { createHash } from "node:crypto";
import type { IncomingHttpHeaders } from "node:http";
import { Kvm, type KV } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";
import { watchBucket, type BucketWatch } from "../routing/kv-watch.js";
import { API_KEYS_BUCKET, TOKEN_RE } from "../../proto/wire.js";
import { HttpError } from "./errors.js";

export { API_KEYS_BUCKET };


/** The hex SHA-256 of a key: what is stored in place of the key. */
export function hashApiKey(key: string): string {
  return createHash("sha256").update(key, "utf8").digest("hex");
}

/** Opens (creating if needed) the API keys bucket. */
export async function openApiKeysBucket(nc: NatsConnection, replicas = 1): Promise<KV> {
  return new Kvm(nc).create(API_KEYS_BUCKET, { history: 1, replicas });
}

/** Writes a key (as its hash) for a tenant into the bucket. */
export async function putApiKey(kv: KV, key: string, tenant: string): Promise<string> {
  if (!TOKEN_RE.test(tenant)) throw new HttpError("INVALID_ARGUMENT", `tenant '${tenant}' must be 1-64 of a-z 0-9 _ -`);
  const hash = hashApiKey(key);
  await kv.put(hash, JSON.stringify({ tenant }));
  return hash;
}

export class ApiKeys {
  private constructor(
    private readonly fromConfig: ReadonlyMap<string, string>,
    private readonly fromBucket: ReadonlyMap<string, string>,
    private readonly watch: BucketWatch | undefined,
  ) {}

  /** Keys from the configuration, and from the bucket when `nc` is given (watched). */
  static async open(config: Readonly<Record<string, string>>, nc?: NatsConnection, onInvalid?: (key: string, err: Error) => void): Promise<ApiKeys> {
    const fromConfig = new Map(Object.entries(config));
    const fromBucket = new Map<string, string>();
    if (!nc) return new ApiKeys(fromConfig, fromBucket, undefined);
    const kv = await openApiKeysBucket(nc);
    const watch = await watchBucket(kv, {
      put: (hash, value) => {
        const tenant = (value as { tenant?: unknown } | null)?.tenant;
        if (typeof tenant !== "string" || !TOKEN_RE.test(tenant)) throw new Error(`entry '${hash}' needs {"tenant": "<1-64 of a-z 0-9 _ ->"}`);
        fromBucket.set(hash, tenant);
      },
      remove: (hash) => fromBucket.delete(hash),
      onError: (key, err) => onInvalid?.(key ?? API_KEYS_BUCKET, err),
    });
    return new ApiKeys(fromConfig, fromBucket, watch);
  }

  /** The tenant of a request's bearer key; a 401 when the key is missing or unknown. */
  tenantOf(headers: IncomingHttpHeaders): string {
    const auth = headers.authorization;
    if (!auth) throw new HttpError("UNAUTHENTICATED", "missing API key: send 'Authorization: Bearer <key>'");
    const m = /^Bearer\s+(\S+)\s*$/i.exec(auth);
    if (!m) throw new HttpError("UNAUTHENTICATED", "malformed Authorization header: expected 'Bearer <key>'");
    const hash = hashApiKey(m[1]!);
    const tenant = this.fromConfig.get(hash) ?? this.fromBucket.get(hash);
    if (!tenant) throw new HttpError("UNAUTHENTICATED", "invalid API key");
    return tenant;
  }

  /** Stops watching the bucket. Safe to call twice. */
  async stop(): Promise<void> {
    await this.watch?.stop();
  }
}
