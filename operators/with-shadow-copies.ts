import { mergeMap, of, type OperatorFunction } from "rxjs";
import type { Delivery, RoutedJob } from "./types.js";
import { WrappedDelivery } from "./support/wrapped-delivery.js";

export interface WithShadowCopiesOptions {
  /** The shadow version of the job's model, if it has one. */
  shadowVersionOf: (job: RoutedJob) => string | undefined;
  /** Copies in flight at most; beyond it a copy is skipped (shadow traffic never builds a queue). */
  maxInFlight: number;
  /** Hears of each skipped copy. Must not throw. */
  onSkipped?: (job: RoutedJob) => void;
}

/**
 * After each job, emits a copy for the model's shadow version, if it names one. The copy is
 * marked `shadow`; its delivery is its own (settling it only frees the copy's slot), so nothing
 * done with the copy can touch the request. Copies are bounded: when `maxInFlight` copies are
 * unsettled, further copies are skipped.
 *
 * ```
 * input:  a        b
 * output: a a'     b b'      (a' = a for the shadow version)
 * ```
 */
export function withShadowCopies(opts: WithShadowCopiesOptions): OperatorFunction<RoutedJob, RoutedJob> {
  return (source) => {
    let inFlight = 0;
    return source.pipe(
      mergeMap((job) => {
        if (job.shadow) return of(job);
        let version: string | undefined;
        try {
          version = opts.shadowVersionOf(job);
        } catch {
          version = undefined;
        }
        if (version === undefined || version === job.version) return of(job);
        if (inFlight >= opts.maxInFlight) {
          try {
            opts.onSkipped?.(job);
          } catch {
            // ignore
          }
          return of(job);
        }
        inFlight++;
        const copy: RoutedJob = { ...job, version, shadow: true, delivery: new ShadowDelivery(job.delivery, () => inFlight--) };
        return of(job, copy);
      }),
    );
  };
}

/** The delivery of a shadow copy: reads like the request's, settles only itself. */
class ShadowDelivery extends WrappedDelivery {
  private done = false;
  constructor(
    request: Delivery,
    private readonly onSettle: () => void,
  ) {
    super(request);
  }
  get settled(): boolean {
    return this.done;
  }
  private settle(): void {
    if (this.done) return;
    this.done = true;
    this.onSettle();
  }
  ack(): void {
    this.settle();
  }
  nak(): void {
    this.settle();
  }
  term(): void {
    this.settle();
  }
  working(): void {
    // the request's own delivery is kept alive by its holder
  }
}
