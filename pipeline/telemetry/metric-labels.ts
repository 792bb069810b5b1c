/** Label values of the pipeline's metrics: outside-supplied values capped per label, the priority of a subject. */

/** Distinct values kept per outside-supplied label before new ones read `_other`. */
export const DEFAULT_MAX_LABEL_VALUES = 500;
/** The label value of an outside-supplied value beyond the cap. */
export const OTHER_LABEL_VALUE = "_other";
/** The `version` label of a request that was never routed to a version. */
export const NO_VERSION = "none";

/** Caps the distinct values of each label. */
export class LabelCap {
  private readonly seen = new Map<string, Set<string>>();
  constructor(private readonly max: number) {}
  value(label: string, v: string): string {
    let values = this.seen.get(label);
    if (!values) this.seen.set(label, (values = new Set()));
    if (values.has(v)) return v;
    if (values.size >= this.max) return OTHER_LABEL_VALUE;
    values.add(v);
    return v;
  }
}

/** `infer.req.<priority>.<tenant>.<model>` → priority, or `_other` for any other subject. */
export function priorityOf(subject: string): string {
  const parts = subject.split(".");
  const p = parts[0] === "infer" && parts[1] === "req" ? parts[2] : undefined;
  return p === "high" || p === "normal" || p === "low" ? p : OTHER_LABEL_VALUE;
}
