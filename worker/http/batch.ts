/** Running a batch as HTTP calls: items that share parameters share a call, within the server's capacity. */
import { EngineClosedError, EngineError, type EngineBatch, type EngineItemError, type EngineItemResult, type EngineRequest } from "../engine.js";
import { HttpEngineClient } from "./client.js";
import { abortReason, HttpStatusError } from "./errors.js";

/** An item of a batch ready to go: its place in the batch and what its call needs of it. */
export interface PreparedItem<P> {
  readonly index: number;
  readonly request: EngineRequest;
  readonly payload: P;
}

export type Preparation<P> = { readonly ok: true; readonly payload: P; readonly key: string } | { readonly ok: false; readonly error: EngineItemError };

/** How an adapter turns a batch into calls. */
export interface BatchCalls<P> {
  /** Checks a request; items with equal keys may share one call. */
  prepare(request: EngineRequest): Preparation<P>;
  /** Most items one call carries; 1: every item alone. */
  readonly maxItemsPerCall: number;
  /** Runs one call; resolves with one result per item, in order; rejects when the call failed as a whole. */
  call(items: readonly PreparedItem<P>[], signal: AbortSignal): Promise<EngineItemResult[]>;
}

/**
 * Runs a batch as calls (see the module comment for the rules): one result per request, in
 * order; rejects with the signal's reason after an abort, {@link EngineClosedError} after
 * close, or the common error when every call failed UNAVAILABLE (or every one timed out).
 */
export async function runBatch<P>(batch: EngineBatch, signal: AbortSignal, calls: BatchCalls<P>, client: HttpEngineClient): Promise<EngineItemResult[]> {
  if (client.closed) throw new EngineClosedError();
  if (signal.aborted) throw abortReason(signal);
  const results: Array<EngineItemResult | undefined> = new Array<EngineItemResult | undefined>(batch.requests.length);
  const groups = new Map<string, PreparedItem<P>[]>();
  const startedAtMs = Date.now();
  batch.requests.forEach((request, index) => {
    if (request.deadlineMs !== undefined && request.deadlineMs > 0 && request.deadlineMs <= startedAtMs) {
      results[index] = {
        ok: false,
        notStarted: true,
        error: { code: "DEADLINE_EXCEEDED", message: `deadline passed before request '${request.id}' started` },
      };
      return;
    }
    const prepared = calls.prepare(request);
    if (!prepared.ok) {
      results[index] = { ok: false, notStarted: true, error: prepared.error };
      return;
    }
    const group = groups.get(prepared.key);
    const item = { index, request, payload: prepared.payload };
    if (group) group.push(item);
    else groups.set(prepared.key, [item]);
  });

  let answered = 0;
  const failures: EngineError[] = [];
  const run = async (items: readonly PreparedItem<P>[]): Promise<void> => {
    try {
      const out = await calls.call(items, signal);
      answered++;
      items.forEach((item, i) => {
        results[item.index] = out[i] ?? { ok: false, error: { code: "INTERNAL", message: `no result for request '${item.request.id}'` } };
      });
    } catch (err) {
      // The whole batch rejects below.
      if (signal.aborted || client.closed) return;
      const e = err instanceof EngineError ? err : new EngineError("INTERNAL", err instanceof Error ? err.message : String(err), { cause: err });
      if (items.length > 1 && e instanceof HttpStatusError && (e.code === "INVALID_ARGUMENT" || e.code === "INTERNAL")) {
        // One bad prompt fails a whole prompt list: ask again one by one, so only it fails.
        await Promise.all(items.map((item) => run([item])));
        return;
      }
      failures.push(e);
      for (const item of items) results[item.index] = { ok: false, error: { code: e.code, message: e.message } };
    }
  };
  const pending: Promise<void>[] = [];
  for (const group of groups.values()) {
    for (let at = 0; at < group.length; at += calls.maxItemsPerCall) pending.push(run(group.slice(at, at + calls.maxItemsPerCall)));
  }
  await Promise.all(pending);

  if (signal.aborted) throw abortReason(signal);
  if (client.closed) throw new EngineClosedError();
  const first = failures[0];
  if (
    first &&
    answered === 0 &&
    (first.code === "UNAVAILABLE" || first.code === "DEADLINE_EXCEEDED") &&
    failures.every((f) => f.code === first.code)
  ) {
    throw first;
  }
  return results.map(
    (r, i) => r ?? { ok: false, error: { code: "INTERNAL", message: `no result for request '${batch.requests[i]?.id ?? ""}'` } },
  );
}

/**
 * Splits `total` over `weights` in proportion, in whole numbers that add up to `total`
 * (largest remainder); equal shares when every weight is 0.
 */
export function apportion(total: number, weights: readonly number[]): number[] {
  if (weights.length === 0) return [];
  const sum = weights.reduce((a, w) => a + Math.max(0, w), 0);
  const w = sum > 0 ? weights.map((x) => Math.max(0, x)) : weights.map(() => 1);
  const wsum = sum > 0 ? sum : weights.length;
  const exact = w.map((x) => (total * x) / wsum);
  const shares = exact.map(Math.floor);
  let left = total - shares.reduce((a, s) => a + s, 0);
  const order = exact.map((x, i) => [x - Math.floor(x), i] as const).sort((a, b) => b[0] - a[0] || a[1] - b[1]);
  for (const [, i] of order) {
    if (left <= 0) break;
    shares[i] = (shares[i] ?? 0) + 1;
    left--;
  }
  return shares;
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** A token count from a usage field (absent or null: 0). */
export function tokenCount(value: unknown): number {
  return typeof value === "number" && Number.isFinite(value) && value >= 0 ? Math.floor(value) : 0;
}

export function positiveInteger(name: string, value: number): number {
  if (!Number.isInteger(value) || value < 1) throw new RangeError(`${name} must be an integer >= 1, got ${value}`);
  return value;
}

export function positiveNumber(name: string, value: number): number {
  if (!Number.isFinite(value) || value <= 0) throw new RangeError(`${name} must be a number > 0, got ${value}`);
  return value;
}
