/**
 * The tenants' object store buckets (`infer_payloads_<tenant>`), through nats.js's object store:
 * writes a body in chunks, reads it back with its digest checked, removes it without a trace.
 */
import { JetStreamApiError, type JetStreamClient, type JetStreamManager } from "@nats-io/jetstream";
import { Base64UrlPaddedCodec, Objm, StorageType, type ObjectInfo, type ObjectStore } from "@nats-io/obj";
import { nanos } from "@nats-io/transport-node";
import { PayloadError } from "./errors.js";
import { OBJECT_CHUNK_BYTES, payloadBucket } from "./names.js";

/** How long objects live when the bucket is created by a client (the request stream's default retention). */
export const DEFAULT_BUCKET_TTL_MS = 7 * 24 * 60 * 60 * 1000;

export interface PayloadStoreOptions {
  /** Max age of a bucket created here (the longest retention of a message referring to an object). */
  ttlMs?: number;
  replicas?: number;
}

/** What a written object is: enough for the reference headers. */
export interface WrittenObject {
  readonly bucket: string;
  readonly key: string;
  readonly size: number;
  readonly digest: string;
}

export interface ReadOptions {
  /** Refuse objects larger than this (INVALID_ARGUMENT). */
  maxBytes: number;
  /** The digest the reference names, when it names one; a different object is refused. */
  digest?: string | undefined;
}

export class PayloadStore {
  private readonly objm: Objm;
  private readonly buckets = new Map<string, Promise<ObjectStore>>();

  constructor(
    private readonly js: JetStreamClient,
    private readonly opts: PayloadStoreOptions = {},
  ) {
    this.objm = new Objm(js);
  }

  /** Writes `data` under `key` in the tenant's bucket (created when missing); replaces an object of that key. */
  async put(tenant: string, key: string, data: Uint8Array, metadata: Record<string, string> = {}): Promise<WrittenObject> {
    try {
      const os = await this.writable(tenant);
      const info = await os.putBlob({ name: key, metadata, options: { max_chunk_size: OBJECT_CHUNK_BYTES } }, data);
      return { bucket: payloadBucket(tenant), key, size: info.size, digest: info.digest };
    } catch (err) {
      this.buckets.delete(tenant);
      throw new PayloadError("UNAVAILABLE", `could not write ${key} to object store ${payloadBucket(tenant)}: ${describe(err)}`, { cause: err });
    }
  }

  /** The object's description, or undefined when there is none (or it was deleted). */
  async info(tenant: string, key: string): Promise<ObjectInfo | undefined> {
    try {
      const os = await this.readable(tenant);
      const info = await os.info(key);
      return info && !info.deleted ? info : undefined;
    } catch (err) {
      if (bucketMissing(err)) return undefined;
      throw new PayloadError("UNAVAILABLE", `object store ${payloadBucket(tenant)} did not answer: ${describe(err)}`, { cause: err });
    }
  }

  /**
   * Reads a whole object. Missing, deleted, over `maxBytes`, of another digest than the reference
   * names, or corrupt (chunks that do not hash to its digest): INVALID_ARGUMENT with the reason.
   * The store not answering: UNAVAILABLE.
   */
  async read(tenant: string, key: string, opts: ReadOptions): Promise<Uint8Array> {
    const bucket = payloadBucket(tenant);
    const info = await this.info(tenant, key);
    if (!info) throw new PayloadError("INVALID_ARGUMENT", `the body's object ${key} is not in object store ${bucket} (never written, expired or removed)`);
    if (info.size > opts.maxBytes) throw new PayloadError("INVALID_ARGUMENT", `the body's object ${key} of ${info.size} bytes is over the limit of ${opts.maxBytes} bytes`);
    if (opts.digest !== undefined && opts.digest !== info.digest) {
      throw new PayloadError("INVALID_ARGUMENT", `the body's object ${key} has digest ${info.digest}, not the ${opts.digest} its reference names (replaced or corrupt)`);
    }
    let result;
    try {
      result = await (await this.readable(tenant)).get(key);
    } catch (err) {
      if (/digest/i.test(describe(err))) throw new PayloadError("INVALID_ARGUMENT", `the body's object ${key} is corrupt: ${describe(err)}`, { cause: err });
      throw new PayloadError("UNAVAILABLE", `object store ${bucket} did not answer: ${describe(err)}`, { cause: err });
    }
    if (!result) throw new PayloadError("INVALID_ARGUMENT", `the body's object ${key} is not in object store ${bucket} (removed meanwhile)`);
    const out = new Uint8Array(info.size);
    let at = 0;
    try {
      for await (const chunk of result.data) {
        if (at + chunk.length > out.length) throw new PayloadError("INVALID_ARGUMENT", `the body's object ${key} is corrupt: more than its ${info.size} bytes`);
        out.set(chunk, at);
        at += chunk.length;
      }
      await result.error;
    } catch (err) {
      if (err instanceof PayloadError) throw err;
      if (/digest|corrupt/i.test(describe(err))) throw new PayloadError("INVALID_ARGUMENT", `the body's object ${key} is corrupt: ${describe(err)}`, { cause: err });
      throw new PayloadError("UNAVAILABLE", `reading ${key} from object store ${bucket} failed: ${describe(err)}`, { cause: err });
    }
    if (at !== out.length) throw new PayloadError("INVALID_ARGUMENT", `the body's object ${key} is corrupt: ${at} of its ${info.size} bytes`);
    return out;
  }

  /** Removes an object and its description (no tombstone left). Removing a missing object is no error. */
  async remove(jsm: JetStreamManager, tenant: string, key: string): Promise<void> {
    const bucket = payloadBucket(tenant);
    const os = await this.readable(tenant);
    let info;
    try {
      info = await os.info(key);
    } catch (err) {
      if (!bucketMissing(err)) throw err;
      return;
    }
    if (info && !info.deleted) await os.delete(key);
    await jsm.streams.purge(`OBJ_${bucket}`, { filter: `$O.${bucket}.M.${Base64UrlPaddedCodec.encode(key)}` }).catch((err: unknown) => {
      if (!bucketMissing(err)) throw err;
    });
  }

  /** Notes on a request's object which INFER_REQ message refers to it (for the sweeper). */
  async noteMessage(tenant: string, key: string, seq: number): Promise<void> {
    const os = await this.readable(tenant);
    const info = await os.info(key);
    if (!info || info.deleted || info.metadata?.["seq"] === String(seq)) return;
    await os.update(key, { metadata: { ...(info.metadata ?? {}), seq: String(seq) } });
  }

  /** Every live object of a tenant's bucket (none when it has no bucket). */
  async list(tenant: string): Promise<ObjectInfo[]> {
    try {
      const os = await this.readable(tenant);
      return (await os.list()).filter((i) => !i.deleted);
    } catch (err) {
      if (bucketMissing(err)) return [];
      throw err;
    }
  }

  private writable(tenant: string): Promise<ObjectStore> {
    let p = this.buckets.get(tenant);
    if (!p) {
      p = this.objm.create(payloadBucket(tenant), {
        ttl: nanos(this.opts.ttlMs ?? DEFAULT_BUCKET_TTL_MS),
        storage: StorageType.File,
        replicas: this.opts.replicas ?? 1,
      });
      p.catch(() => this.buckets.delete(tenant));
      this.buckets.set(tenant, p);
    }
    return p;
  }

  /** Opened without a look-up: a reader needs no permission beyond the object's own subjects. */
  private readable(tenant: string): Promise<ObjectStore> {
    return this.buckets.get(tenant) ?? this.objm.open(payloadBucket(tenant), false);
  }
}

function bucketMissing(err: unknown): boolean {
  return (err instanceof JetStreamApiError && /stream not found/i.test(err.message)) || /stream not found|object store not found/i.test(describe(err));
}

function describe(err: unknown): string {
  return (err as Error)?.message ?? String(err);
}

