/**
 * Request bodies: read with a size bound (413 beyond it), parsed as JSON (400 when malformed),
 * and read field by field with checks that name the field at fault.
 */
import type { IncomingMessage } from "node:http";
import { badField, HttpError } from "./errors.js";

/** Reads the whole body, refusing one larger than `maxBytes` (without buffering the rest). */
export function readBody(req: IncomingMessage, maxBytes: number): Promise<Buffer> {
  const declared = Number(req.headers["content-length"]);
  if (Number.isFinite(declared) && declared > maxBytes) {
    return Promise.reject(new HttpError("PAYLOAD_TOO_LARGE", `request body of ${declared} bytes is over the limit of ${maxBytes}`));
  }
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let done = false;
    const finish = (err?: Error): void => {
      if (done) return;
      done = true;
      req.off("data", onData);
      if (err) {
        // Stop reading what is left; the connection closes after the answer.
        req.resume();
        reject(err);
      } else resolve(Buffer.concat(chunks, size));
    };
    const onData = (c: Buffer): void => {
      size += c.length;
      if (size > maxBytes) finish(new HttpError("PAYLOAD_TOO_LARGE", `request body is over the limit of ${maxBytes} bytes`));
      else chunks.push(c);
    };
    req.on("data", onData);
    req.once("end", () => finish());
    req.once("error", (e) => finish(new HttpError("INVALID_ARGUMENT", `request body could not be read: ${e.message}`)));
  });
}

/** Reads and parses a JSON object body. */
export async function readJsonObject(req: IncomingMessage, maxBytes: number): Promise<Record<string, unknown>> {
  const raw = await readBody(req, maxBytes);
  if (raw.length === 0) throw new HttpError("INVALID_ARGUMENT", "request body is empty; expected a JSON object");
  let v: unknown;
  try {
    v = JSON.parse(raw.toString("utf8"));
  } catch (err) {
    throw new HttpError("INVALID_ARGUMENT", `request body is not valid JSON: ${(err as Error).message}`);
  }
  if (typeof v !== "object" || v === null || Array.isArray(v)) throw new HttpError("INVALID_ARGUMENT", "request body must be a JSON object");
  return v as Record<string, unknown>;
}

/** Typed reads of body fields; each failure is a 400 naming the field. */
export const field = {
  string(o: Record<string, unknown>, name: string, required = false): string | undefined {
    const v = o[name];
    if (v === undefined || v === null) {
      if (required) throw badField(name, `'${name}' is required`);
      return undefined;
    }
    if (typeof v !== "string") throw badField(name, `'${name}' must be a string`);
    return v;
  },
  number(o: Record<string, unknown>, name: string, min = -Infinity, max = Infinity): number | undefined {
    const v = o[name];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== "number" || !Number.isFinite(v)) throw badField(name, `'${name}' must be a number`);
    if (v < min || v > max) throw badField(name, `'${name}' must be between ${min} and ${max}`);
    return v;
  },
  integer(o: Record<string, unknown>, name: string, min = -Infinity, max = Infinity): number | undefined {
    const v = field.number(o, name, min, max);
    if (v !== undefined && !Number.isInteger(v)) throw badField(name, `'${name}' must be an integer`);
    return v;
  },
  boolean(o: Record<string, unknown>, name: string): boolean | undefined {
    const v = o[name];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== "boolean") throw badField(name, `'${name}' must be true or false`);
    return v;
  },
  object(o: Record<string, unknown>, name: string): Record<string, unknown> | undefined {
    const v = o[name];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== "object" || Array.isArray(v)) throw badField(name, `'${name}' must be an object`);
    return v as Record<string, unknown>;
  },
  /** A string or an array of strings (OpenAI's `stop`). */
  strings(o: Record<string, unknown>, name: string): string | string[] | undefined {
    const v = o[name];
    if (v === undefined || v === null) return undefined;
    if (typeof v === "string") return v;
    if (Array.isArray(v) && v.every((x) => typeof x === "string")) return v;
    throw badField(name, `'${name}' must be a string or an array of strings`);
  },
};
