/**
 * A bound on the bytes of large bodies held in memory: a reader reserves a body's size before
 * it reads the body and gives it back when the body is no longer needed. A reservation that does
 * not fit waits (first come, first served), so a reader slows down instead of going over.
 *
 * ```ts
 * const gate = new ByteGate(256 * 1024 * 1024);
 * const release = await gate.reserve(size);
 * try { use(await read()); } finally { release(); }
 * ```
 */
export class ByteGate {
  private held = 0;
  private peak = 0;
  private readonly waiting: Array<{ bytes: number; grant: () => void }> = [];

  constructor(readonly limitBytes: number) {
    if (!(limitBytes > 0)) throw new RangeError(`limitBytes must be > 0, got ${limitBytes}`);
  }

  /** Bytes reserved now. */
  get heldBytes(): number {
    return this.held;
  }

  /** Most bytes reserved at once so far. */
  get peakBytes(): number {
    return this.peak;
  }

  /** Reservations waiting for room. */
  get waitingCount(): number {
    return this.waiting.length;
  }

  /**
   * Resolves with a release function once `bytes` fit. A body larger than the whole limit is
   * reserved as the whole limit (it waits until nothing else is held), so it is served alone
   * rather than never. The release function is safe to call twice.
   */
  reserve(bytes: number): Promise<() => void> {
    const n = Math.min(Math.max(0, bytes), this.limitBytes);
    return new Promise((resolve) => {
      const grant = (): void => {
        this.held += n;
        if (this.held > this.peak) this.peak = this.held;
        let released = false;
        resolve(() => {
          if (released) return;
          released = true;
          this.held -= n;
          this.admit();
        });
      };
      if (this.waiting.length === 0 && this.held + n <= this.limitBytes) grant();
      else this.waiting.push({ bytes: n, grant });
    });
  }

  private admit(): void {
    while (this.waiting.length > 0 && this.held + this.waiting[0]!.bytes <= this.limitBytes) this.waiting.shift()!.grant();
  }
}
