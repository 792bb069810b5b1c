/**
 * The claim check as a client uses it (docs/protocol.md, "Large bodies"): a request body over
 * the threshold (or over what the server takes in one message) goes to the tenant's object
 * store bucket and the request carries its reference; a result message with a reference is read
 * whole from the store.
 */
import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import type { MsgHdrs } from "@nats-io/transport-node";
import type { InferResult } from "../../operators/types.js";
import { PayloadError } from "./errors.js";
import { DEFAULT_CLAIM_CHECK_THRESHOLD_BYTES, DEFAULT_MAX_OBJECT_BYTES, payloadKey } from "./names.js";
import { setReference } from "./reference.js";
import { HEADER_HEADROOM_BYTES, resolveResult } from "./results.js";
import { PayloadStore } from "./store.js";

export interface ClientPayloadOptions {
  /**
   * Request bodies larger than this (or than the server's max_payload less 16 KiB) go to the
   * tenant's object store bucket and the request carries a reference (default 256 KiB).
   * `Infinity`: always inline; then a body over `maxPayloadBytes` or the server's max_payload is
   * refused with INVALID_ARGUMENT before it is sent.
   */
  thresholdBytes?: number;
  /** Largest request body sent through the object store (default 64 MiB, the pipeline's `payloads.maxObjectBytes`). */
  maxBodyBytes?: number;
  /** Largest result read from the object store (default 64 MiB). */
  maxResultBytes?: number;
}

export class ClientClaimCheck {
  /** The tenant's object store bucket. */
  private readonly store: PayloadStore;
  private readonly thresholdBytes: number;
  private readonly maxResultBytes: number;
  private readonly maxBodyBytes: number;

  constructor(
    js: JetStreamClient,
    private readonly tenant: string,
    private readonly jsm: () => Promise<JetStreamManager>,
    payloads: ClientPayloadOptions = {},
  ) {
    this.store = new PayloadStore(js);
    this.thresholdBytes = payloads.thresholdBytes ?? DEFAULT_CLAIM_CHECK_THRESHOLD_BYTES;
    this.maxResultBytes = payloads.maxResultBytes ?? DEFAULT_MAX_OBJECT_BYTES;
    this.maxBodyBytes = payloads.maxBodyBytes ?? DEFAULT_MAX_OBJECT_BYTES;
  }

  /** True when a body of `bytes` goes through the object store, given the server's max_payload. */
  wants(bytes: number, maxPayload: number | undefined): boolean {
    const limit = Number.isFinite(this.thresholdBytes) && maxPayload !== undefined ? Math.min(this.thresholdBytes, maxPayload - HEADER_HEADROOM_BYTES) : this.thresholdBytes;
    return bytes > limit;
  }

  /**
   * Writes the request body to the object store and sets its reference in `h`. Throws a
   * PayloadError: INVALID_ARGUMENT over `maxBodyBytes` (no cause), UNAVAILABLE when the write
   * fails (the write's error as the cause).
   */
  async claim(h: MsgHdrs, id: string, data: Uint8Array): Promise<void> {
    if (data.length > this.maxBodyBytes) {
      throw new PayloadError("INVALID_ARGUMENT", `request body of ${data.length} bytes is over the limit of ${this.maxBodyBytes} bytes for bodies through the object store`);
    }
    try {
      setReference(h, await this.store.put(this.tenant, payloadKey("req", id), data));
    } catch (err) {
      throw new PayloadError("UNAVAILABLE", `the request body of ${data.length} bytes could not be written to the object store: ${(err as Error).message}`, { cause: err });
    }
  }

  /** Removes the body written for request `id`, best effort (the sweeper removes objects nothing refers to). */
  async unclaim(id: string): Promise<void> {
    try {
      await this.store.remove(await this.jsm(), this.tenant, payloadKey("req", id));
    } catch {
      // best effort
    }
  }

  /** A result message as the whole result: its body, or the object its reference names. */
  readResult(id: string, headers: MsgHdrs | undefined, data: Uint8Array): Promise<InferResult> {
    return resolveResult(this.store, this.tenant, id, (n) => headers?.get(n) || undefined, data, this.maxResultBytes);
  }
}
