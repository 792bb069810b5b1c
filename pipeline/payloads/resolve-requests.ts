/**
 * The pipeline's side of a request's claim check: before decoding, a request that carries a
 * reference gets its body from the object store, within the byte bound of a {@link ByteGate}.
 *
 * ```
 * deliveries:              -a---R---b---|     R carries Infer-Body-Ref
 * resolveRequestBodies():  -a-------R'b-|     R' = R with the object's bytes as its body
 * ```
 *
 * The reserved bytes are given back when the request is settled (acked, naked or termed), so
 * while large bodies fill the bound, the requests that hold credits of the pull wait here and
 * pulling slows down. A missing or corrupt object, or one that is not the request's own, is
 * answered INVALID_ARGUMENT with the reason; an object store that does not answer puts the
 * request back (nak with a growing delay) until its last delivery, which is answered UNAVAILABLE.
 */
import { defer, EMPTY, mergeMap, of, type Observable, type OperatorFunction } from "rxjs";
import type { Delivery, ErrorInfo } from "../../operators/types.js";
import { H, ID_RE, TOKEN_RE as TENANT_RE } from "../../proto/wire.js";
import type { ByteGate } from "./byte-gate.js";
import { PayloadError } from "./errors.js";
import { readReference } from "./reference.js";
import { WrappedDelivery } from "../../operators/support/wrapped-delivery.js";

/** Reads a request body: the pipeline's {@link PayloadStore.read}, bound to its limits. */
export type ReadBody = (tenant: string, key: string, digest: string | undefined) => Promise<Uint8Array>;

export interface ResolveRequestOptions {
  read: ReadBody;
  gate: ByteGate;
  /** A delivery this far along is answered instead of put back when the store does not answer. */
  maxDeliver: number;
  /** Delay of a put-back after the n-th delivery. */
  retryDelayMs: (deliveryCount: number) => number;
  /** Called once a body is read (e.g. to note the referring message for the sweeper); must not throw. */
  onResolved?: (tenant: string, key: string, d: Delivery) => void;
}


export function resolveRequestBodies(opts: ResolveRequestOptions): OperatorFunction<Delivery, Delivery> {
  return mergeMap((d: Delivery): Observable<Delivery> => {
    const id = d.header(H.msgId);
    const tenant = d.subject.split(".")[3];
    // Without a usable id or tenant the decoder dead-letters it, reference or not.
    if (id === undefined || !ID_RE.test(id) || tenant === undefined || !TENANT_RE.test(tenant)) return of(d);
    let ref;
    try {
      ref = readReference((n) => d.header(n), "req", id);
    } catch (err) {
      return of(withBodyError(d, errorInfo(err)));
    }
    if (!ref) return of(d);
    const { key, digest, size } = ref;
    return defer(async (): Promise<Delivery | undefined> => {
      const release = await opts.gate.reserve(size);
      try {
        const body = await opts.read(tenant, key, digest);
        opts.onResolved?.(tenant, key, d);
        return new ResolvedDelivery(d, body, release);
      } catch (err) {
        release();
        const info = errorInfo(err);
        if (info.code === "UNAVAILABLE" && d.deliveryCount < opts.maxDeliver) {
          d.nak(opts.retryDelayMs(d.deliveryCount));
          return undefined;
        }
        return withBodyError(d, info);
      }
    }).pipe(mergeMap((x) => (x === undefined ? EMPTY : of(x))));
  });
}

function errorInfo(err: unknown): ErrorInfo {
  if (err instanceof PayloadError) return { code: err.code === "RESOURCE_EXHAUSTED" ? "RESOURCE_EXHAUSTED" : err.code, message: err.message };
  return { code: "UNAVAILABLE", message: `the body could not be read from the object store: ${(err as Error)?.message ?? String(err)}` };
}

function withBodyError(d: Delivery, bodyError: ErrorInfo): Delivery {
  return new ResolvedDelivery(d, new Uint8Array(0), () => undefined, bodyError);
}

/** The delivery as it came from the source, under a body read from the object store. */
export function originalDelivery(d: Delivery): Delivery {
  return d instanceof ResolvedDelivery ? d.original : d;
}

/** A delivery whose body was read from the object store; settling it gives the bytes back. */
class ResolvedDelivery extends WrappedDelivery {
  constructor(
    inner: Delivery,
    private readonly body: Uint8Array,
    private readonly release: () => void,
    readonly bodyError?: ErrorInfo,
  ) {
    super(inner);
  }
  /** The delivery as the pull source made it. */
  get original(): Delivery {
    return this.inner;
  }
  override get data(): Uint8Array {
    return this.body;
  }
  get wireData(): Uint8Array {
    return this.inner.data;
  }
  get settled(): boolean {
    return this.inner.settled;
  }
  ack(): void {
    this.inner.ack();
    this.release();
  }
  nak(delayMs?: number): void {
    this.inner.nak(delayMs);
    this.release();
  }
  term(reason?: string): void {
    this.inner.term(reason);
    this.release();
  }
  working(): void {
    this.inner.working();
  }
}
