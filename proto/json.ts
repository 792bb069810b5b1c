/**
 * Plain JSON <-> `google.protobuf.Value` / `Struct`, as the generated code of `proto/gen` shapes
 * them. The proto carries free-form model inputs, parameters and outputs as these well-known
 * types; everything else in sluice deals in plain JSON.
 *
 * JSON has no NaN or Infinity, and neither does the JSON mapping of `Value`, so a non-finite
 * number is refused with a {@link JsonValueError} instead of being sent and read back as
 * something else.
 */
import { google } from "./gen/inference.js";

/** A JSON value. */
export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

/** A JSON object. */
export type JsonObject = { [key: string]: JsonValue };

/** Deeper than this is refused: protobufjs refuses to decode much deeper messages anyway. */
export const MAX_JSON_DEPTH = 64;

export type JsonValueErrorCode = "NON_FINITE_NUMBER" | "UNSUPPORTED_TYPE" | "TOO_DEEP" | "NOT_AN_OBJECT";

/** A value that cannot be carried as a `google.protobuf.Value`. */
export class JsonValueError extends Error {
  override readonly name = "JsonValueError";
  constructor(
    readonly code: JsonValueErrorCode,
    /** Where in the value, e.g. `$.parameters.temperature`. */
    readonly path: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`${message} at ${path}`, options);
  }
}

/** Converts a JSON value (as `JSON.parse` returns it) to a `google.protobuf.Value`. */
export function toValue(value: unknown): google.protobuf.IValue {
  return valueOf(value, "$", 0);
}

/** Converts a JSON object to a `google.protobuf.Struct`. */
export function toStruct(object: Readonly<Record<string, unknown>>): google.protobuf.IStruct {
  if (!isPlainObject(object)) {
    throw new JsonValueError("NOT_AN_OBJECT", "$", `expected a JSON object, got ${describe(object)}`);
  }
  return structOf(object, "$", 0);
}

/**
 * Converts a `google.protobuf.Value` (decoded or a plain object of the same shape) to JSON.
 * A Value with no kind set reads as null.
 */
export function fromValue(value: google.protobuf.IValue | null | undefined): JsonValue {
  return jsonOf(value, "$", 0);
}

/** Converts a `google.protobuf.Struct` to a JSON object; a missing Struct reads as `{}`. */
export function fromStruct(struct: google.protobuf.IStruct | null | undefined): JsonObject {
  return objectOf(struct, "$", 0);
}

function valueOf(value: unknown, path: string, depth: number): google.protobuf.IValue {
  if (depth > MAX_JSON_DEPTH) throw new JsonValueError("TOO_DEEP", path, `nested deeper than ${MAX_JSON_DEPTH}`);
  if (value === null) return { nullValue: google.protobuf.NullValue.NULL_VALUE };
  switch (typeof value) {
    case "number":
      if (!Number.isFinite(value)) {
        throw new JsonValueError("NON_FINITE_NUMBER", path, `${value} is not a JSON number`);
      }
      return { numberValue: value };
    case "string":
      return { stringValue: value };
    case "boolean":
      return { boolValue: value };
    case "object":
      if (Array.isArray(value)) {
        return { listValue: { values: value.map((v: unknown, i) => valueOf(v, `${path}[${i}]`, depth + 1)) } };
      }
      if (isPlainObject(value)) return { structValue: structOf(value, path, depth + 1) };
      break;
    default:
      break;
  }
  throw new JsonValueError("UNSUPPORTED_TYPE", path, `${describe(value)} is not a JSON value`);
}

function structOf(object: Readonly<Record<string, unknown>>, path: string, depth: number): google.protobuf.IStruct {
  if (depth > MAX_JSON_DEPTH) throw new JsonValueError("TOO_DEEP", path, `nested deeper than ${MAX_JSON_DEPTH}`);
  const fields: Record<string, google.protobuf.IValue> = {};
  for (const [key, v] of Object.entries(object)) {
    // Like JSON.stringify, a field that is undefined is left out.
    if (v === undefined) continue;
    setOwn(fields, key, valueOf(v, `${path}.${key}`, depth + 1));
  }
  return { fields };
}

function jsonOf(value: google.protobuf.IValue | null | undefined, path: string, depth: number): JsonValue {
  if (depth > MAX_JSON_DEPTH) throw new JsonValueError("TOO_DEEP", path, `nested deeper than ${MAX_JSON_DEPTH}`);
  if (value === null || value === undefined) return null;
  // A decoded message has defaults of null on its prototype and sets only the kind it carries.
  if (value.nullValue !== null && value.nullValue !== undefined) return null;
  if (value.numberValue !== null && value.numberValue !== undefined) return value.numberValue;
  if (value.stringValue !== null && value.stringValue !== undefined) return value.stringValue;
  if (value.boolValue !== null && value.boolValue !== undefined) return value.boolValue;
  if (value.structValue !== null && value.structValue !== undefined) {
    return objectOf(value.structValue, path, depth + 1);
  }
  if (value.listValue !== null && value.listValue !== undefined) {
    return (value.listValue.values ?? []).map((v, i) => jsonOf(v, `${path}[${i}]`, depth + 1));
  }
  return null;
}

function objectOf(struct: google.protobuf.IStruct | null | undefined, path: string, depth: number): JsonObject {
  if (depth > MAX_JSON_DEPTH) throw new JsonValueError("TOO_DEEP", path, `nested deeper than ${MAX_JSON_DEPTH}`);
  const out: JsonObject = {};
  const fields = struct?.fields;
  if (!fields) return out;
  for (const key of Object.keys(fields)) {
    setOwn(out, key, jsonOf(fields[key], `${path}.${key}`, depth + 1));
  }
  return out;
}

/** Sets an own property even for a key such as `__proto__`, which plain assignment would not. */
function setOwn<T>(target: Record<string, T>, key: string, value: T): void {
  if (key === "__proto__") {
    Object.defineProperty(target, key, { value, enumerable: true, writable: true, configurable: true });
  } else {
    target[key] = value;
  }
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return false;
  const proto = Object.getPrototypeOf(value) as unknown;
  return proto === Object.prototype || proto === null;
}

function describe(value: unknown): string {
  if (value === null) return "null";
  if (typeof value === "object") return value.constructor?.name ?? "object";
  return typeof value;
}
