/**
 * The claim check's wire names (docs/protocol.md, "Large bodies"): the headers a message carries
 * instead of a large body, the per-tenant object store bucket and the key layout inside it.
 */

import { H, ID_RE, PAYLOADS_BUCKET_PREFIX, TOKEN_RE } from "../../proto/wire.js";

/** Header naming the object that holds the body, a key in the tenant's bucket (`req/<id>`, `res/<id>`). */
export const BODY_REF_HEADER = H.bodyRef;
/** Header with the object's size in bytes (lets a reader reserve memory before it reads). */
export const BODY_SIZE_HEADER = H.bodySize;
/** Header with the object's SHA-256 digest, as the object store writes it (`SHA-256=<base64url>`). */
export const BODY_DIGEST_HEADER = H.bodyDigest;

/** Bodies larger than this go to the object store by default (well under the default 1 MiB max_payload). */
export const DEFAULT_CLAIM_CHECK_THRESHOLD_BYTES = 256 * 1024;
/** Largest body accepted through the object store by default (what a worker takes by default). */
export const DEFAULT_MAX_OBJECT_BYTES = 64 * 1024 * 1024;
/** Chunk size written to the object store (each chunk is one JetStream message). */
export const OBJECT_CHUNK_BYTES = 128 * 1024;

const TENANT_RE = TOKEN_RE;

/** The object store bucket of a tenant: `infer_payloads_<tenant>` (stream `OBJ_infer_payloads_<tenant>`). */
export function payloadBucket(tenant: string): string {
  if (!TENANT_RE.test(tenant)) throw new RangeError(`tenant '${tenant}' must be 1-64 of a-z 0-9 _ -`);
  return `${PAYLOADS_BUCKET_PREFIX}${tenant}`;
}

/** The tenant a bucket belongs to, or undefined when it is not a payload bucket. */
export function tenantOfBucket(bucket: string): string | undefined {
  const t = bucket.startsWith(PAYLOADS_BUCKET_PREFIX) ? bucket.slice(PAYLOADS_BUCKET_PREFIX.length) : "";
  return TENANT_RE.test(t) ? t : undefined;
}

export type PayloadKind = "req" | "res";

/** Key of a request's body (`req/<id>`) or a result's body (`res/<id>`): the owner is in the key. */
export function payloadKey(kind: PayloadKind, id: string): string {
  if (!ID_RE.test(id)) throw new RangeError(`request id '${id}' must be 1-128 of A-Z a-z 0-9 _ -`);
  return `${kind}/${id}`;
}

/** The kind and request id of a key, or undefined when the key is not of the layout. */
export function parsePayloadKey(key: string): { kind: PayloadKind; id: string } | undefined {
  const m = /^(req|res)\/([A-Za-z0-9_-]{1,128})$/.exec(key);
  return m ? { kind: m[1] as PayloadKind, id: m[2]! } : undefined;
}
