/**
 * The worker's own times, measured in the same run: the benchmark calls the worker it started
 * for a system directly over gRPC (no queue, no pipeline), one call at a time, before the system
 * starts. The low-load overhead of each system is its p50 minus the worker's own time for one
 * request, and the device maximum is a full batch divided by the worker's own time for it:
 * both against what this machine's worker really takes (timers overshoot a simulated device's
 * nominal cost by about a millisecond), not against the nominal figures alone.
 */
import { setTimeout as delay } from "node:timers/promises";
import { WorkerClient } from "../../pipeline/workers/mod.js";
import { percentile } from "./load.js";
import { requestBody } from "./scenarios.js";

export interface WorkerTimes {
  /** p50 of a call with one request, ms. */
  readonly singleMs: number;
  /** p50 of a call with a full batch, ms. */
  readonly maxBatchMs: number;
}

const WARMUP_CALLS = 10;
const SINGLE_CALLS = 40;
const BATCH_CALLS = 20;
/** Pause between calls, as at low load (the device is idle when each call arrives). */
const GAP_MS = 20;

const decoder = new TextDecoder();

export async function probeWorker(endpoint: string, model: string, version: string, maxBatch: number): Promise<WorkerTimes> {
  const client = new WorkerClient(endpoint);
  const prompt = (JSON.parse(decoder.decode(requestBody(0))) as { prompt: string }).prompt;
  const call = async (n: number, tag: string): Promise<number> => {
    const requests = Array.from({ length: n }, (_, i) => ({ id: `probe-${tag}-${i}`, tenant: "bench", prompt }));
    const t0 = performance.now();
    await client.infer({ model, version, requests }, { deadlineMs: Date.now() + 10_000 });
    return performance.now() - t0;
  };
  try {
    for (let i = 0; i < WARMUP_CALLS; i++) await call(i % 2 === 0 ? 1 : maxBatch, `w${i}`);
    const single: number[] = [];
    for (let i = 0; i < SINGLE_CALLS; i++) {
      await delay(GAP_MS);
      single.push(await call(1, `s${i}`));
    }
    const full: number[] = [];
    for (let i = 0; i < BATCH_CALLS; i++) {
      await delay(GAP_MS);
      full.push(await call(maxBatch, `b${i}`));
    }
    const p50 = (xs: number[]): number => percentile(Float64Array.from(xs).sort(), 50);
    return { singleMs: p50(single), maxBatchMs: p50(full) };
  } finally {
    client.close();
  }
}
