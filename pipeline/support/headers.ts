/** Header helpers shared by everything that reads or writes NATS message headers. */

/**
 * The first value of header `name`, matched case-insensitively, from NATS headers (values are
 * lists) or from recorded `[name, value]` pairs; undefined when absent.
 */
export function headerValue(headers: Iterable<readonly [string, string | readonly string[]]> | undefined, name: string): string | undefined {
  if (!headers) return undefined;
  const want = name.toLowerCase();
  for (const [k, v] of headers) {
    if (k.toLowerCase() !== want) continue;
    return typeof v === "string" ? v : v[0];
  }
  return undefined;
}

/** Longest header value written (a reason or a copied id is cut there). */
export const MAX_HEADER_VALUE = 1024;

/** A header value is one line of printable text: control characters become a space. */
export function sanitizeHeader(s: string): string {
  // eslint-disable-next-line no-control-regex
  return s.replace(/[\u0000-\u001f\u007f]+/g, " ").slice(0, MAX_HEADER_VALUE);
}
