/** Deliveries for operator tests: read like a request on `infer.req.normal.acme.m`, settle nothing. */
import type { Delivery } from "../../operators/types.js";

/** A delivery that settles nothing; `over` replaces any of its parts. */
export function inertDelivery(over: Partial<Delivery> = {}): Delivery {
  return {
    subject: "infer.req.normal.acme.m",
    data: new Uint8Array(),
    header: () => undefined,
    headerEntries: () => [],
    seq: 1,
    deliveryCount: 1,
    storedAtMs: 0,
    pulledAtMs: 0,
    settled: false,
    ack: () => undefined,
    nak: () => undefined,
    term: () => undefined,
    working: () => undefined,
    ...over,
  };
}
