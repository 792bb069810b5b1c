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

/** A delivery that records how it was settled (and each `working()`), for the credit gate's virtual-time tests. */
export class RecordingDelivery implements Delivery {
  readonly settles: string[] = [];
  workingCalls = 0;
  readonly data = new Uint8Array();
  readonly deliveryCount = 1;
  readonly storedAtMs = 0;
  pulledAtMs = 0;
  /** The consumer's pending count once this message was handed out (JetStream's num_pending), when a test sets it. */
  pending: number | undefined = undefined;
  constructor(
    readonly subject: string,
    readonly seq: number,
  ) {}
  get settled(): boolean {
    return this.settles.length > 0;
  }
  header(): undefined {
    return undefined;
  }
  headerEntries(): Array<[string, string]> {
    return [];
  }
  ack(): void {
    this.settles.push("ack");
  }
  nak(): void {
    this.settles.push("nak");
  }
  term(): void {
    this.settles.push("term");
  }
  working(): void {
    this.workingCalls++;
  }
}
