/**
 * The backlog per model, for autoscaling workers model by model.
 *
 * JetStream says how many messages a consumer has not yet delivered (`num_pending`), but not
 * per subject: the consumer of a priority covers every model. So the per-model backlog is an
 * estimate, and an honest one: each priority's exact `num_pending` is split by the model mix of
 * the last {@link DEFAULT_MIX_WINDOW} requests this process pulled from that priority. The
 * shares are whole numbers that add up to the exact pending, so a sum over the models of a
 * priority is that priority's pending. Pending this process cannot attribute (it has pulled
 * nothing from the priority yet, or a subject names no model) goes to the model
 * {@link UNATTRIBUTED_MODEL} (`""`).
 *
 * Exact counts per model would need a consumer per model: the stream's per-subject counts
 * include consumed requests (limits retention keeps them for replay), and a consumer's
 * `num_pending` covers its one filter (several filters per consumer came with nats-server 2.10).
 *
 * What the process does know exactly, it counts: the requests it pulled and has not settled,
 * per model (those hold a credit, see the credit gate's `onHeldChange`).
 *
 * ```ts
 * const backlog = new ModelBacklog();
 * gate({ ..., onHeldChange: (p, subject, delta) => backlog.held(p, subject, delta) });
 * backlog.pendingByModel("normal", consumerInfo.num_pending);   // Map model -> share
 * backlog.inflightByModel();                                   // Map model -> unsettled
 * ```
 */

/** Deliveries per priority whose model mix splits the priority's pending. */
export const DEFAULT_MIX_WINDOW = 1_000;
/** The model of pending that cannot be attributed to one. */
export const UNATTRIBUTED_MODEL = "";
/** Models kept at zero in the in-flight counts before idle ones are forgotten. */
export const MAX_IDLE_MODELS = 500;

const REQUEST_PREFIX = "infer.req.";

/** `infer.req.<priority>.<tenant>.<model>` → model; {@link UNATTRIBUTED_MODEL} for any other subject. */
export function modelOfSubject(subject: string): string {
  if (!subject.startsWith(REQUEST_PREFIX)) return UNATTRIBUTED_MODEL;
  const priorityEnd = subject.indexOf(".", REQUEST_PREFIX.length);
  const tenantEnd = priorityEnd < 0 ? -1 : subject.indexOf(".", priorityEnd + 1);
  if (tenantEnd < 0) return UNATTRIBUTED_MODEL;
  const model = subject.slice(tenantEnd + 1);
  return model.length > 0 && !model.includes(".") ? model : UNATTRIBUTED_MODEL;
}

/**
 * Splits `total` by the counts of `mix`: whole shares in proportion to the counts (largest
 * remainder, ties to the model that sorts first) that add up to `total` exactly. With no counts
 * to go by, all of it goes to {@link UNATTRIBUTED_MODEL}; that key is always in the result
 * (0 when everything was attributed), and so is every model of `mix`.
 */
export function attributePending(total: number, mix: ReadonlyMap<string, number>): Map<string, number> {
  const whole = Number.isFinite(total) ? Math.max(0, Math.round(total)) : 0;
  const models = [...mix.entries()].filter(([, n]) => Number.isFinite(n) && n > 0).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  const out = new Map<string, number>();
  for (const m of mix.keys()) out.set(m, 0);
  out.set(UNATTRIBUTED_MODEL, 0);
  const weight = models.reduce((s, [, n]) => s + n, 0);
  if (weight <= 0 || whole === 0) {
    out.set(UNATTRIBUTED_MODEL, (out.get(UNATTRIBUTED_MODEL) ?? 0) + whole);
    return out;
  }
  let given = 0;
  const rest: Array<[string, number]> = [];
  for (const [m, n] of models) {
    const exact = (whole * n) / weight;
    const share = Math.floor(exact);
    out.set(m, (out.get(m) ?? 0) + share);
    given += share;
    rest.push([m, exact - share]);
  }
  // Stable sort: equal remainders keep the models' order.
  rest.sort((a, b) => b[1] - a[1]);
  for (let i = 0; given < whole; i++, given++) {
    const m = rest[i % rest.length]![0];
    out.set(m, (out.get(m) ?? 0) + 1);
  }
  return out;
}

/** The models of the last `size` deliveries, counted. */
export class DeliveryMix {
  private readonly ring: string[] = [];
  private next = 0;
  private readonly byModel = new Map<string, number>();

  constructor(readonly size: number = DEFAULT_MIX_WINDOW) {
    if (!(size >= 1)) throw new RangeError(`a delivery mix holds at least one delivery (got ${size})`);
  }

  add(model: string): void {
    if (this.ring.length < this.size) this.ring.push(model);
    else {
      const old = this.ring[this.next]!;
      const n = (this.byModel.get(old) ?? 0) - 1;
      if (n > 0) this.byModel.set(old, n);
      else this.byModel.delete(old);
      this.ring[this.next] = model;
      this.next = (this.next + 1) % this.size;
    }
    this.byModel.set(model, (this.byModel.get(model) ?? 0) + 1);
  }

  /** Deliveries per model in the window (they add up to at most `size`). */
  counts(): ReadonlyMap<string, number> {
    return this.byModel;
  }
}

/** The per-model backlog of one pipeline process. */
export class ModelBacklog {
  private readonly mixes = new Map<string, DeliveryMix>();
  private readonly inflight = new Map<string, number>();

  constructor(private readonly window: number = DEFAULT_MIX_WINDOW) {}

  /** A delivery of `priority` began (+1) or ended (-1) holding a credit. */
  held(priority: string, subject: string, delta: 1 | -1): void {
    const model = modelOfSubject(subject);
    if (delta > 0) {
      let mix = this.mixes.get(priority);
      if (!mix) this.mixes.set(priority, (mix = new DeliveryMix(this.window)));
      // A subject without a model says nothing about the mix.
      if (model !== UNATTRIBUTED_MODEL) mix.add(model);
    }
    const n = Math.max(0, (this.inflight.get(model) ?? 0) + delta);
    if (n === 0 && this.inflight.size > MAX_IDLE_MODELS) this.inflight.delete(model);
    else this.inflight.set(model, n);
  }

  /** The priority's exact pending, split by its recent mix (see {@link attributePending}). */
  pendingByModel(priority: string, total: number): Map<string, number> {
    return attributePending(total, this.mixes.get(priority)?.counts() ?? new Map<string, number>());
  }

  /** Requests pulled by this process and not yet settled, per model (exact). */
  inflightByModel(): ReadonlyMap<string, number> {
    return this.inflight;
  }
}
