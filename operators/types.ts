/**
 * The values that flow between sluice's operators. Nothing here knows of NATS, gRPC or the
 * process around it: a {@link Delivery} is any message that can be settled once.
 */
import type { ErrorCode, Priority } from "../proto/wire.js";

/**
 * A message taken from the queue that must be settled exactly once: acked when its result is
 * published, naked (with a delay) to be delivered again, or termed when it must never come back.
 * Settling twice is a no-op, so a late timer can never double-settle.
 */
export interface Delivery {
  readonly subject: string;
  readonly data: Uint8Array;
  /** Header value by name (case-insensitive), or undefined. */
  header(name: string): string | undefined;
  /** All headers, names as sent; used to copy a request's headers into a dead letter. */
  headerEntries(): Array<[string, string]>;
  /** Stream sequence of the message. */
  readonly seq: number;
  /** 1 on first delivery. */
  readonly deliveryCount: number;
  /** When the message was stored in the stream (epoch ms). */
  readonly storedAtMs: number;
  /** When the pipeline pulled it (epoch ms). */
  readonly pulledAtMs: number;
  /**
   * Messages left for the consumer after this one when it was delivered, when the queue says
   * (JetStream: `num_pending`); 0 means the consumer had drained.
   */
  readonly pending?: number;
  readonly settled: boolean;
  ack(): void;
  nak(delayMs?: number): void;
  term(reason?: string): void;
  /** Tell the queue the message is still being worked on (resets its redelivery timer). */
  working(): void;
  /**
   * The body as stored in the stream, when `data` was read from elsewhere (a claim check in the
   * object store): a dead letter copies this, not the large body.
   */
  readonly wireData?: Uint8Array;
  /** Why the body could not be read (a step before decoding sets it); the request is answered with it. */
  readonly bodyError?: ErrorInfo;
}

/** A decoded, valid request on its way through the pipeline. */
export interface InferJob {
  readonly id: string;
  readonly tenant: string;
  readonly model: string;
  readonly priority: Priority;
  readonly prompt?: string;
  readonly inputs?: unknown;
  readonly parameters?: Record<string, unknown>;
  /** `Infer-Version` header, when the client pinned a version. */
  readonly pinnedVersion?: string;
  /** `Infer-Deadline` header: absolute epoch ms. */
  readonly deadlineMs?: number;
  /** `Infer-Stream: 1`. */
  readonly stream: boolean;
  /** `Infer-Session` header: requests of one conversation, routed to the same worker when it can take them. */
  readonly session?: string;
  readonly traceparent?: string;
  readonly tracestate?: string;
  readonly delivery: Delivery;
  /**
   * When a redelivered request was looked up in the results store before being run, and nothing
   * was found (epoch ms). Settling checks again only when much later (another process may have
   * answered it meanwhile).
   */
  readonly storedCheckedAtMs?: number;
  /** The version chosen by routing; set by the route step. */
  readonly version?: string;
  /**
   * A shadow copy: sent to the model's shadow version for comparison. Its result never reaches
   * the client and its delivery is not the request's (settling it does nothing).
   */
  readonly shadow?: boolean;
  /**
   * The key its answer is cached under: set when the request was looked up in the result cache
   * and not found there, so its result is stored under this key once it is ok.
   */
  readonly cacheKey?: string;
}

/** A job whose model version has been chosen. */
export interface RoutedJob extends InferJob {
  readonly version: string;
}

export interface ErrorInfo {
  readonly code: ErrorCode;
  readonly message: string;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
}

export interface Timing {
  queue_ms: number;
  batch_size: number;
  worker_ms: number;
  total_ms: number;
  /**
   * For a model with a result cache: `hit` when the answer came from the cache (no worker ran
   * it; `batch_size` and `worker_ms` are 0), `miss` when it was looked up and run.
   */
  cache?: "hit" | "miss";
}

/** The result payload published on `infer.res.<tenant>.<id>` (PROTOCOL.md, "A result"). */
export interface InferResult {
  id: string;
  status: "ok" | "error";
  model?: string;
  version?: string;
  output?: { text?: string; data?: unknown };
  usage?: Usage;
  timing?: Timing;
  error?: ErrorInfo;
}

/** A batch of jobs for one model@version. */
export interface Batch {
  readonly model: string;
  readonly version: string;
  /** `<model>@<version>` */
  readonly key: string;
  readonly jobs: readonly RoutedJob[];
  /** When the batch closed (epoch ms). */
  readonly closedAtMs: number;
}

/**
 * What to do with one delivery. The settle step turns each into publishes and exactly one
 * settlement of the delivery.
 * - `result`: publish the result (ok or a terminal error), then ack; when `alreadyStored`, only ack.
 * - `retry`: nak with a delay so the queue delivers it again; when deliveries are exhausted the
 *   settle step publishes `lastResort` instead and terms.
 * - `dead`: the request has no usable id or tenant: write a dead letter with the reason, then term.
 */
export type Outcome =
  | {
      readonly kind: "result";
      readonly job: InferJob;
      readonly result: InferResult;
      /** Also keep the request in the dead-letter stream (retries exhausted). */
      readonly deadLetter?: boolean;
      /**
       * `result` is already stored (an earlier delivery was answered, and its acknowledgement
       * lost): settle without publishing again.
       */
      readonly alreadyStored?: boolean;
    }
  | {
      readonly kind: "retry";
      readonly job: InferJob;
      readonly delayMs: number;
      readonly lastResort: InferResult;
      /**
       * Keep retrying until this time (epoch ms) whatever the delivery count: the request waits
       * for a worker to appear rather than failing after a few deliveries.
       */
      readonly waitUntilMs?: number;
    }
  | {
      readonly kind: "dead";
      readonly delivery: Delivery;
      readonly tenant?: string;
      readonly model?: string;
      readonly id?: string;
      readonly error: ErrorInfo;
    };

/** An error result for a job. */
export function errorResult(job: Pick<InferJob, "id" | "model"> & { version?: string }, code: ErrorCode, message: string): InferResult {
  const r: InferResult = { id: job.id, status: "error", model: job.model, error: { code, message } };
  if (job.version !== undefined) r.version = job.version;
  return r;
}
