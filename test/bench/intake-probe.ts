/**
 * What the intake costs, read from outside the processes: CPU time of a process (from
 * /proc/<pid>/stat), and the consumers on INFER_REQ (one consumer listing).
 */
import { readFileSync } from "node:fs";
import { connect } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { STREAM_REQUESTS } from "../../proto/wire.js";

/** Clock ticks per second of /proc's CPU times (USER_HZ; 100 on Linux). */
const USER_HZ = 100;

/** User + system CPU time of a process so far, ms; undefined when it cannot be read. */
export function cpuMs(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return ((Number(rest[11]) + Number(rest[12])) * 1_000) / USER_HZ;
  } catch {
    return undefined;
  }
}

/** Consumers on INFER_REQ now. */
export async function requestConsumers(natsUrl: string): Promise<number> {
  const nc = await connect({ servers: natsUrl, name: "bench-probe" });
  try {
    const jsm = await jetstreamManager(nc);
    let n = 0;
    for await (const _ of jsm.consumers.list(STREAM_REQUESTS)) n++;
    return n;
  } finally {
    await nc.close();
  }
}

/** Share of one core the processes used over `ms` of wall time, %. */
export async function idleCpuPercent(pids: ReadonlyArray<number | undefined>, ms: number): Promise<number | undefined> {
  const before = pids.map(cpuMs);
  const t0 = Date.now();
  await new Promise((r) => setTimeout(r, ms));
  const after = pids.map(cpuMs);
  let used = 0;
  for (let i = 0; i < pids.length; i++) {
    const a = after[i];
    const b = before[i];
    if (a === undefined || b === undefined) return undefined;
    used += a - b;
  }
  return (100 * used) / (Date.now() - t0);
}
