/**
 * The claim check as one pipeline process uses it: the store, the byte bound on large bodies in
 * memory, the step that reads request bodies, the result side, and the sweeper; one `stop()`.
 */
import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import type { OperatorFunction } from "rxjs";
import type { Delivery } from "../../operators/types.js";
import type { PayloadSettings, StreamsConfig } from "../config.js";
import { ByteGate } from "./byte-gate.js";
import { resolveRequestBodies } from "./resolve-requests.js";
import type { ResultClaimCheck } from "./results.js";
import { PayloadStore } from "./store.js";
import { PayloadSweeper } from "./sweeper.js";

export interface PipelineClaimCheckOptions {
  js: JetStreamClient;
  jsm: JetStreamManager;
  /** The server's max_payload (the connection's INFO), for results that would not fit. */
  maxPayload?: () => number | undefined;
  settings: PayloadSettings;
  streams: StreamsConfig;
  maxDeliver: number;
  retryDelayMs: (deliveryCount: number) => number;
  onSweepError?: (err: unknown) => void;
}

export class PipelineClaimCheck {
  readonly store: PayloadStore;
  /** Bytes of large request bodies held now; a caller with its own credit gate may wait on it too. */
  readonly gate: ByteGate;
  readonly sweeper: PayloadSweeper;
  readonly results: ResultClaimCheck;

  constructor(private readonly opts: PipelineClaimCheckOptions) {
    const s = opts.streams;
    // Objects live as long as the longest-kept message that may refer to them; the sweeper
    // removes them earlier when their message goes earlier.
    this.store = new PayloadStore(opts.js, { ttlMs: Math.max(s.requestsMaxAgeMs, s.resultsMaxAgeMs), replicas: s.replicas });
    this.gate = new ByteGate(opts.settings.memoryBytes);
    this.sweeper = new PayloadSweeper({ js: opts.js, jsm: opts.jsm, store: this.store, graceMs: opts.settings.orphanGraceMs, ...(opts.onSweepError ? { onError: opts.onSweepError } : {}) });
    this.results = { store: this.store, thresholdBytes: opts.settings.thresholdBytes, ...(opts.maxPayload ? { maxPayload: opts.maxPayload } : {}) };
  }

  /** The step before decoding that reads request bodies from the object store. */
  resolveBodies(): OperatorFunction<Delivery, Delivery> {
    const { settings } = this.opts;
    return resolveRequestBodies({
      read: (tenant, key, digest) => this.store.read(tenant, key, { maxBytes: settings.maxObjectBytes, digest }),
      gate: this.gate,
      maxDeliver: this.opts.maxDeliver,
      retryDelayMs: this.opts.retryDelayMs,
      onResolved: (tenant, key, d) => {
        // Which message refers to the object, for the sweeper; a lost note is found again by scanning.
        this.store.noteMessage(tenant, key, d.seq).catch(() => undefined);
      },
    });
  }

  start(): void {
    this.sweeper.start(this.opts.settings.sweepIntervalMs);
  }

  async stop(): Promise<void> {
    await this.sweeper.stop();
  }
}
