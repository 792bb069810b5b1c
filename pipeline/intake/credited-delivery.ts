/**
 * The delivery the credit gate hands on: it wraps the pull source's delivery and hands its
 * credit back the first time it is settled (acked, naked or termed).
 */
import type { Delivery } from "../../operators/types.js";
import { WrappedDelivery } from "../../operators/support/wrapped-delivery.js";

/** A delivery that hands its credit back the first time it is settled. */
export class CreditedDelivery extends WrappedDelivery {
  private done = false;
  constructor(
    inner: Delivery,
    private readonly onSettle: (d: CreditedDelivery, how: "ack" | "nak" | "term") => void,
  ) {
    super(inner);
  }
  /** The delivery as the pull source made it. */
  get source(): Delivery {
    return this.inner;
  }
  get settled(): boolean {
    return this.done;
  }
  private settle(how: "ack" | "nak" | "term", f: () => void): void {
    if (this.done) return;
    this.done = true;
    try {
      f();
    } finally {
      this.onSettle(this, how);
    }
  }
  ack(): void {
    this.settle("ack", () => this.inner.ack());
  }
  nak(delayMs?: number): void {
    this.settle("nak", () => this.inner.nak(delayMs));
  }
  term(reason?: string): void {
    this.settle("term", () => this.inner.term(reason));
  }
  working(): void {
    if (!this.done) this.inner.working();
  }
}
