/**
 * Request parameters of an HTTP engine: each known one checked by a rule and written into the
 * call's body; an unknown one refused.
 */

/**
 * Checks one parameter and writes what it becomes into the request body; returns what is wrong
 * with it, or undefined.
 */
export type ParameterRule = (name: string, value: unknown, body: Record<string, unknown>) => string | undefined;

/** Checks request parameters against `rules` and maps them to body fields. */
export function mapParameters(
  parameters: Readonly<Record<string, unknown>> | undefined,
  rules: Readonly<Record<string, ParameterRule>>,
  server: string,
): { ok: true; body: Record<string, unknown> } | { ok: false; message: string } {
  const body: Record<string, unknown> = {};
  if (!parameters) return { ok: true, body };
  for (const [name, value] of Object.entries(parameters)) {
    const rule = Object.hasOwn(rules, name) ? rules[name] : undefined;
    if (!rule) {
      return { ok: false, message: `parameter '${name}' is not supported by ${server} (supported: ${Object.keys(rules).join(", ")})` };
    }
    // null reads as "the server's default", as leaving it out does.
    if (value === null || value === undefined) continue;
    const problem = rule(name, value, body);
    if (problem !== undefined) return { ok: false, message: `parameter '${name}' ${problem}` };
  }
  return { ok: true, body };
}

/** An integer, >= `min` when given, written as `to`. */
export function integerParameter(min?: number, to?: string): ParameterRule {
  const wanted = min === undefined ? "an integer" : `an integer >= ${min}`;
  return (name, value, body) => {
    if (typeof value !== "number" || !Number.isSafeInteger(value) || (min !== undefined && value < min)) {
      return `must be ${wanted}, got ${JSON.stringify(value)}`;
    }
    body[to ?? name] = value;
    return undefined;
  };
}

/** A finite number in a range, written as `to`. */
export function numberParameter(range: { min?: number; minExclusive?: boolean; max?: number }, to?: string): ParameterRule {
  const { min, max, minExclusive } = range;
  const bounds: string[] = [];
  if (min !== undefined) bounds.push(`${minExclusive ? ">" : ">="} ${min}`);
  if (max !== undefined) bounds.push(`<= ${max}`);
  const wanted = bounds.length === 0 ? "a number" : `a number ${bounds.join(" and ")}`;
  return (name, value, body) => {
    const ok =
      typeof value === "number" &&
      Number.isFinite(value) &&
      (min === undefined || (minExclusive ? value > min : value >= min)) &&
      (max === undefined || value <= max);
    if (!ok) return `must be ${wanted}, got ${JSON.stringify(value)}`;
    body[to ?? name] = value;
    return undefined;
  };
}

/** A boolean, written as `to`. */
export function booleanParameter(to?: string): ParameterRule {
  return (name, value, body) => {
    if (typeof value !== "boolean") return `must be true or false, got ${JSON.stringify(value)}`;
    body[to ?? name] = value;
    return undefined;
  };
}

/** A string or a list of strings (stop sequences), written as `to`. */
export function stringsParameter(to?: string): ParameterRule {
  return (name, value, body) => {
    const ok = typeof value === "string" || (Array.isArray(value) && value.every((s) => typeof s === "string"));
    if (!ok) return `must be a string or a list of strings, got ${JSON.stringify(value)}`;
    body[to ?? name] = value;
    return undefined;
  };
}

/** Accepted only as `only` (and then not sent: it is what the server does anyway). */
function onlyParameter(only: number | string | boolean, why: string): ParameterRule {
  return (_name, value) => (value === only ? undefined : `must be ${JSON.stringify(only)} (${why}), got ${JSON.stringify(value)}`);
}

/** `n`: each request gets one answer. */
export const ONE_ANSWER = onlyParameter(1, "one output per request");
/** JSON of a parameter body with its keys sorted: equal parameters, equal keys. */
export function parameterKey(body: Readonly<Record<string, unknown>>): string {
  return JSON.stringify(Object.keys(body).sort().map((k) => [k, body[k]]));
}
