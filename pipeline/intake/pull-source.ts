/**
 * Pull sources of the credit gate: the interface a lane pulls through, and its adapter over pulls
 * that are opened with a promise and read as async iterables (a JetStream fetch, say).
 */
import { Observable } from "rxjs";
import type { Delivery } from "../../operators/types.js";

/** Where messages come from. A pull emits up to `max` messages and completes when it ends. */
export interface PullSource {
  pull(max: number, expiresMs: number): Observable<Delivery>;
}

/** One pull as an async iterable (a JetStream fetch, say): what {@link pullFromAsync} adapts. */
export interface AsyncPull extends AsyncIterable<Delivery> {
  close(): Promise<unknown>;
}

/**
 * A {@link PullSource} over pulls that are opened with a promise and read as async iterables.
 * Messages that arrive after the pull was closed are naked (the queue gives them to someone else
 * at once).
 */
export function pullFromAsync(open: (max: number, expiresMs: number) => Promise<AsyncPull>): PullSource {
  return {
    pull: (max, expiresMs) =>
      new Observable<Delivery>((subscriber) => {
        let closed = false;
        let batch: AsyncPull | undefined;
        const run = async (): Promise<void> => {
          batch = await open(max, expiresMs);
          if (closed) {
            await batch.close();
            return;
          }
          for await (const m of batch) {
            if (closed) m.nak();
            else subscriber.next(m);
          }
          subscriber.complete();
        };
        run().catch((err: unknown) => {
          if (!closed) subscriber.error(err);
        });
        return () => {
          closed = true;
          void batch?.close().catch(() => undefined);
        };
      }),
  };
}
