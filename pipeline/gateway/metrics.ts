/**
 * The gateway's Prometheus metrics (`sluice_http_*`), served on its own port at `/metrics`.
 * Labels are the route pattern (never the raw path), the method and the status: a bounded set.
 */
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from "prom-client";

/** A request's time in the gateway, from the first byte to the last one sent. */
const HTTP_SECONDS_BUCKETS: readonly number[] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];

export class GatewayMetrics {
  readonly registry: Registry;
  private readonly requests: Counter<"route" | "method" | "status">;
  private readonly seconds: Histogram<"route" | "method">;
  private readonly open: Gauge;
  private readonly rejected: Counter<"reason">;
  private readonly callbacks: Counter<"outcome">;
  private readonly callbackAttempts: Counter;

  constructor(opts: { registry?: Registry; processMetrics?: boolean } = {}) {
    this.registry = opts.registry ?? new Registry();
    const registers = [this.registry];
    this.requests = new Counter({ name: "sluice_http_requests_total", help: "HTTP requests answered, by route pattern, method and status", labelNames: ["route", "method", "status"], registers });
    this.seconds = new Histogram({
      name: "sluice_http_request_duration_seconds",
      help: "Time from a request's arrival to its last byte sent",
      labelNames: ["route", "method"],
      buckets: [...HTTP_SECONDS_BUCKETS],
      registers,
    });
    this.open = new Gauge({ name: "sluice_http_open_requests", help: "Requests held open (counted against gateway.maxOpenRequests)", registers });
    this.rejected = new Counter({ name: "sluice_http_rejected_total", help: "Requests refused before they were read: over the open-request bound, or draining", labelNames: ["reason"], registers });
    this.callbacks = new Counter({ name: "sluice_http_callbacks_total", help: "Callbacks finished, delivered or given up", labelNames: ["outcome"], registers });
    this.callbackAttempts = new Counter({ name: "sluice_http_callback_attempts_total", help: "Callback deliveries tried (first tries and retries)", registers });
    if (opts.processMetrics !== false) collectDefaultMetrics({ register: this.registry });
  }

  answered(route: string, method: string, status: number, seconds: number): void {
    this.requests.inc({ route, method, status: String(status) });
    this.seconds.observe({ route, method }, seconds);
  }

  setOpen(n: number): void {
    this.open.set(n);
  }

  reject(reason: "over_bound" | "draining"): void {
    this.rejected.inc({ reason });
  }

  callback(delivered: boolean, attempts: number): void {
    this.callbacks.inc({ outcome: delivered ? "delivered" : "given_up" });
    this.callbackAttempts.inc(attempts);
  }

  async text(): Promise<string> {
    return this.registry.metrics();
  }
}
