/**
 * A delivery that wraps another: what it reads (subject, body, sequence, counts, times,
 * headers) passes through to the wrapped one; how it settles is the subclass's.
 */
import type { Delivery } from "../types.js";

export abstract class WrappedDelivery implements Delivery {
  constructor(protected readonly inner: Delivery) {}

  abstract get settled(): boolean;
  abstract ack(): void;
  abstract nak(delayMs?: number): void;
  abstract term(reason?: string): void;
  abstract working(): void;

  get subject(): string {
    return this.inner.subject;
  }
  get data(): Uint8Array {
    return this.inner.data;
  }
  get seq(): number {
    return this.inner.seq;
  }
  get deliveryCount(): number {
    return this.inner.deliveryCount;
  }
  get storedAtMs(): number {
    return this.inner.storedAtMs;
  }
  get pulledAtMs(): number {
    return this.inner.pulledAtMs;
  }
  header(name: string): string | undefined {
    return this.inner.header(name);
  }
  headerEntries(): Array<[string, string]> {
    return this.inner.headerEntries();
  }
}
