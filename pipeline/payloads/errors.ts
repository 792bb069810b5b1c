/** Typed errors of the claim check, with the protocol's error codes. */
import { CodedError } from "../../proto/coded-error.js";

export type PayloadErrorCode = "INVALID_ARGUMENT" | "UNAVAILABLE" | "RESOURCE_EXHAUSTED";

/**
 * A body that could not be written or read through the object store. `INVALID_ARGUMENT`: the
 * reference is bad (missing, corrupt, not the sender's, too large), retrying cannot help.
 * `UNAVAILABLE`: the object store did not answer; the same operation may work later.
 */
export class PayloadError extends CodedError<PayloadErrorCode> {
  override readonly name = "PayloadError";
}
