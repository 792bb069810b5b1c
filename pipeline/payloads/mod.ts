/**
 * The claim check (docs/protocol.md, "Large bodies"): bodies over a threshold travel through the
 * tenant's object store bucket and the message carries a reference. The client library does this
 * for requests and resolves results; a door built on other code (HTTP) writes a request body with
 * {@link PayloadStore.put} + {@link setReference} and reads a result with {@link resolveResult}.
 */
export {
  BODY_DIGEST_HEADER,
  BODY_REF_HEADER,
  BODY_SIZE_HEADER,
  DEFAULT_CLAIM_CHECK_THRESHOLD_BYTES,
  DEFAULT_MAX_OBJECT_BYTES,
  parsePayloadKey,
  payloadBucket,
  payloadKey,
  tenantOfBucket,
  type PayloadKind,
} from "./names.js";
export { PayloadError, type PayloadErrorCode } from "./errors.js";
export { PayloadStore, DEFAULT_BUCKET_TTL_MS, type PayloadStoreOptions, type ReadOptions, type WrittenObject } from "./store.js";
export { readReference, setReference, type BodyReference } from "./reference.js";
export { claimResult, resolveResult, HEADER_HEADROOM_BYTES, type ResultClaimCheck, type ResultMessage } from "./results.js";
export { ByteGate } from "./byte-gate.js";
export { resolveRequestBodies, originalDelivery, type ReadBody, type ResolveRequestOptions } from "./resolve-requests.js";
export { PayloadSweeper, type SweeperOptions, type SweepReport } from "./sweeper.js";
export { PipelineClaimCheck, type PipelineClaimCheckOptions } from "./pipeline-claim-check.js";
