/**
 * The reference a message carries instead of a large body: reading it from headers (checked
 * against who sent the message) and writing it.
 */
import type { MsgHdrs } from "@nats-io/transport-node";
import { PayloadError } from "./errors.js";
import { BODY_DIGEST_HEADER, BODY_REF_HEADER, BODY_SIZE_HEADER, payloadKey, type PayloadKind } from "./names.js";
import type { WrittenObject } from "./store.js";

/** A body held in the object store: the key in the tenant's bucket, its size and digest. */
export interface BodyReference {
  readonly key: string;
  readonly size: number;
  readonly digest?: string | undefined;
}

/** Sets the reference headers for a written object. */
export function setReference(h: MsgHdrs, obj: WrittenObject): void {
  h.set(BODY_REF_HEADER, obj.key);
  h.set(BODY_SIZE_HEADER, String(obj.size));
  h.set(BODY_DIGEST_HEADER, obj.digest);
}

/**
 * The reference of a message, or undefined when its body is inline. A reference is only valid
 * for the message's own request: `req/<id>` on a request with `Nats-Msg-Id: <id>`, `res/<id>`
 * on a result of request `<id>`; anything else is INVALID_ARGUMENT (it could point at another
 * request's body).
 */
export function readReference(header: (name: string) => string | undefined, kind: PayloadKind, id: string): BodyReference | undefined {
  const key = header(BODY_REF_HEADER);
  if (key === undefined) return undefined;
  const own = payloadKey(kind, id);
  if (key !== own) throw new PayloadError("INVALID_ARGUMENT", `header ${BODY_REF_HEADER} '${key.slice(0, 140)}' is not this request's object '${own}'`);
  const sizeText = header(BODY_SIZE_HEADER);
  const size = Number(sizeText);
  if (sizeText === undefined || !/^[0-9]{1,15}$/.test(sizeText) || !Number.isSafeInteger(size)) {
    throw new PayloadError("INVALID_ARGUMENT", `header ${BODY_SIZE_HEADER} '${(sizeText ?? "").slice(0, 40)}' is not a size in bytes (required with ${BODY_REF_HEADER})`);
  }
  const digest = header(BODY_DIGEST_HEADER);
  return { key, size, digest };
}
