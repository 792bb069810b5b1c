/**
 * The claim check of results: a result whose JSON is over the threshold is written to
 * `res/<id>` in the tenant's bucket, and the message on `infer.res.<tenant>.<id>` carries the
 * reference headers and, as its body, the result without its `output` (so a reader that ignores
 * the reference still sees the status, usage and timing). Readers call {@link resolveResult}.
 */
import type { MsgHdrs } from "@nats-io/transport-node";
import type { InferResult } from "../../operators/types.js";
import { PayloadError } from "./errors.js";
import { payloadKey } from "./names.js";
import { readReference, setReference } from "./reference.js";
import type { PayloadStore } from "./store.js";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** What to publish for a result: its own JSON, or a reference to it with a small body. */
export interface ResultMessage {
  readonly data: Uint8Array;
  /** Set on the result's headers (the reference), when the result went to the object store. */
  readonly reference?: (h: MsgHdrs) => void;
}

export interface ResultClaimCheck {
  readonly store: PayloadStore;
  readonly thresholdBytes: number;
  /** The server's max_payload, when known: a result that would not fit goes to the store whatever the threshold. */
  readonly maxPayload?: () => number | undefined;
}

/** Room kept under max_payload for a result's headers. */
export const HEADER_HEADROOM_BYTES = 16 * 1024;

/** Encodes a result, writing it to the object store first when it is over the threshold. */
export async function claimResult(cc: ResultClaimCheck | undefined, tenant: string, id: string, result: InferResult): Promise<ResultMessage> {
  const data = encoder.encode(JSON.stringify(result));
  const maxPayload = cc?.maxPayload?.();
  const threshold = maxPayload !== undefined ? Math.min(cc!.thresholdBytes, maxPayload - HEADER_HEADROOM_BYTES) : (cc?.thresholdBytes ?? Infinity);
  if (!cc || data.length <= threshold) return { data };
  const written = await cc.store.put(tenant, payloadKey("res", id), data, { request: id });
  const { output: _output, ...rest } = result;
  return { data: encoder.encode(JSON.stringify(rest)), reference: (h) => setReference(h, written) };
}

/**
 * The whole result a message stands for: its body, or the object its reference names (checked to
 * be this request's own result object). A missing or corrupt object is a {@link PayloadError}.
 */
export async function resolveResult(
  store: PayloadStore,
  tenant: string,
  id: string,
  header: (name: string) => string | undefined,
  data: Uint8Array,
  maxBytes: number,
): Promise<InferResult> {
  const ref = readReference(header, "res", id);
  if (!ref) return JSON.parse(decoder.decode(data)) as InferResult;
  const body = await store.read(tenant, ref.key, { maxBytes, digest: ref.digest });
  try {
    return JSON.parse(decoder.decode(body)) as InferResult;
  } catch (err) {
    throw new PayloadError("INVALID_ARGUMENT", `the result object ${ref.key} is not a JSON result: ${(err as Error).message}`, { cause: err });
  }
}
