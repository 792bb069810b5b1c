/**
 * Removes objects whose referring message is gone, so nothing outlives what refers to it:
 * `res/<id>` once request `<id>` has no stored result (infer.res or infer.kept), `req/<id>` once
 * the request message it was written for is no longer in INFER_REQ (aged out, pushed out by the
 * stream's limits, or never published because its writer died in between). Only objects older
 * than a grace period are judged, so a body whose message is still on its way is left alone.
 *
 * Which message a request object belongs to is noted on the object (`metadata.seq`, the
 * INFER_REQ sequence) by the pipeline when it reads the body, or by the sweeper when it finds
 * the message (headers only, in the tenant's request subjects from shortly before the object was
 * written); a noted message that is gone is a removed object.
 */
import { DeliverPolicy, type JetStreamClient, type JetStreamManager } from "@nats-io/jetstream";
import type { ObjectInfo } from "@nats-io/obj";
import { PRIORITIES, STREAM_REQUESTS } from "../../proto/wire.js";
import { getStoredResult } from "../settle/stored-result.js";
import { parsePayloadKey, tenantOfBucket } from "./names.js";
import type { PayloadStore } from "./store.js";

export interface SweeperOptions {
  js: JetStreamClient;
  jsm: JetStreamManager;
  store: PayloadStore;
  /** Objects younger than this are not judged. */
  graceMs: number;
  /** Reports a failed sweep; must not throw. */
  onError?: (err: unknown) => void;
}

export interface SweepReport {
  checked: number;
  removed: string[];
}

/** How far before an object's write its request message may be stamped (clock skew between servers). */
const SKEW_MS = 60_000;

export class PayloadSweeper {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<unknown> | undefined;

  constructor(private readonly opts: SweeperOptions) {}

  /** Sweeps every `intervalMs` until {@link stop}. */
  start(intervalMs: number): void {
    if (this.timer || intervalMs <= 0) return;
    this.timer = setInterval(() => {
      if (this.running) return;
      this.running = this.sweep()
        .catch((err: unknown) => this.opts.onError?.(err))
        .finally(() => (this.running = undefined));
    }, intervalMs);
    this.timer.unref();
  }

  /** Stops sweeping and waits for a sweep under way. Safe to call twice. */
  async stop(): Promise<void> {
    clearInterval(this.timer);
    this.timer = undefined;
    await this.running;
  }

  /** One pass over every tenant's bucket. */
  async sweep(now = Date.now()): Promise<SweepReport> {
    const report: SweepReport = { checked: 0, removed: [] };
    for await (const stream of this.opts.jsm.streams.names()) {
      const tenant = stream.startsWith("OBJ_") ? tenantOfBucket(stream.slice(4)) : undefined;
      if (tenant === undefined) continue;
      const objects = await this.opts.store.list(tenant);
      report.removed.push(...(await this.sweepChunks(tenant, stream, new Set(objects.map((o) => o.nuid)), now)));
      for (const obj of objects) {
        if (now - Date.parse(obj.mtime) < this.opts.graceMs) continue;
        const key = parsePayloadKey(obj.name);
        report.checked++;
        const keep = key === undefined ? false : key.kind === "res" ? await this.resultExists(tenant, key.id) : await this.requestExists(tenant, key.id, obj);
        if (keep) continue;
        await this.opts.store.remove(this.opts.jsm, tenant, obj.name);
        report.removed.push(`${tenant}/${obj.name}`);
      }
    }
    return report;
  }

  /**
   * Chunks no description refers to: an object whose writer died before it wrote the
   * description (chunks first, description last). Purged once the last of them is past the grace.
   */
  private async sweepChunks(tenant: string, stream: string, live: Set<string>, now: number): Promise<string[]> {
    const bucket = stream.slice(4);
    const prefix = `$O.${bucket}.C.`;
    const si = await this.opts.jsm.streams.info(stream, { subjects_filter: `${prefix}>` });
    const removed: string[] = [];
    for (const subject of Object.keys(si.state.subjects ?? {})) {
      const nuid = subject.slice(prefix.length);
      if (live.has(nuid)) continue;
      const last = await this.opts.jsm.streams.getMessage(stream, { last_by_subj: subject }).catch(() => null);
      if (last && now - last.time.getTime() < this.opts.graceMs) continue;
      await this.opts.jsm.streams.purge(stream, { filter: subject });
      removed.push(`${tenant}/chunks/${nuid}`);
    }
    return removed;
  }

  private async resultExists(tenant: string, id: string): Promise<boolean> {
    return (await getStoredResult(this.opts.jsm, tenant, id)) !== null;
  }

  private async requestExists(tenant: string, id: string, obj: ObjectInfo): Promise<boolean> {
    const noted = Number(obj.metadata?.["seq"]);
    if (Number.isSafeInteger(noted) && noted > 0) {
      const m = await this.opts.jsm.streams.getMessage(STREAM_REQUESTS, { seq: noted }).catch(() => null);
      if (m && m.header.get("Nats-Msg-Id") === id) return true;
    }
    const seq = await this.findRequest(tenant, id, Date.parse(obj.mtime));
    if (seq === undefined) return false;
    await this.opts.store.noteMessage(tenant, obj.name, seq);
    return true;
  }

  /** The INFER_REQ sequence of request `id` of `tenant` stored from shortly before `writtenMs` on. */
  private async findRequest(tenant: string, id: string, writtenMs: number): Promise<number | undefined> {
    // One priority at a time: nats-server 2.9 takes a filter only within one of the stream's subjects.
    for (const p of PRIORITIES) {
      const consumer = await this.opts.js.consumers.get(STREAM_REQUESTS, {
        filter_subjects: `infer.req.${p}.${tenant}.*`,
        deliver_policy: DeliverPolicy.StartTime,
        opt_start_time: new Date(writtenMs - SKEW_MS).toISOString(),
        headers_only: true,
      });
      // Not deleted after use (the pipeline may not delete consumers on INFER_REQ): an ordered
      // consumer goes away by itself once idle.
      for (;;) {
        const m = await consumer.next({ expires: 1_000 });
        if (!m) break;
        if (m.headers?.get("Nats-Msg-Id") === id) return m.seq;
        if (m.info.pending === 0) break;
      }
    }
    return undefined;
  }
}
