/**
 * The KV-backed tenant limits: a {@link TenantLimiter} kept in step with bucket `infer_tenants`
 * (key: the tenant, `_default` for `"*"`; value: its limits as JSON), so a KV write changes the
 * limits of every running pipeline without a restart.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import type { KV } from "@nats-io/kv";
import { TENANTS_BUCKET } from "../../proto/wire.js";
import { BucketRegistry, openRegistryBucket, seedBucket } from "./kv-watch.js";
import { ANY_TENANT, DEFAULT_TENANT_KEY, parseTenantLimits, TenantLimiter, type TenantLimiterOptions, type TenantLimits } from "./tenant-limits.js";

export interface TenantRegistryOptions {
  replicas?: number;
  /** Limits written when the bucket does not have them yet (configuration seed); `"*"` is the default. */
  seed?: Record<string, TenantLimits>;
  /** Options of the limiter the registry keeps in step (its `tenants` are ignored: the bucket rules). */
  limiter?: Omit<TenantLimiterOptions, "tenants">;
  /** Hears of invalid bucket values (they are ignored, the previous value stays). */
  onInvalid?: (key: string, err: Error) => void;
}

/** The KV-backed tenant limits: a {@link TenantLimiter} kept in step with bucket `infer_tenants`. */
export class TenantRegistry extends BucketRegistry {
  private constructor(
    kv: KV,
    readonly limiter: TenantLimiter,
  ) {
    super(kv, TENANTS_BUCKET);
  }

  static async openBucket(nc: NatsConnection, replicas = 1): Promise<KV> {
    return openRegistryBucket(nc, TENANTS_BUCKET, replicas);
  }

  /** The bucket key of a tenant name (`"*"` → `_default`). */
  static keyOf(tenant: string): string {
    return tenant === ANY_TENANT ? DEFAULT_TENANT_KEY : tenant;
  }

  /** Opens (creating if needed) the bucket, seeds it, loads it and starts watching. */
  static async open(nc: NatsConnection, opts: TenantRegistryOptions = {}): Promise<TenantRegistry> {
    const kv = await TenantRegistry.openBucket(nc, opts.replicas ?? 1);
    await seedBucket(kv, opts.seed ?? {}, (tenant, limits) => [TenantRegistry.keyOf(tenant), parseTenantLimits(tenant, limits)]);
    const reg = new TenantRegistry(kv, new TenantLimiter(opts.limiter ?? {}));
    await reg.watch(
      {
        put: (key, value) => reg.limiter.set(key, parseTenantLimits(key, value)),
        remove: (key) => reg.limiter.set(key, undefined),
      },
      opts.onInvalid,
    );
    return reg;
  }

  /** Writes a tenant's limits (`"*"` for the default); every watching pipeline applies them. */
  async put(tenant: string, limits: TenantLimits): Promise<void> {
    await this.kv.put(TenantRegistry.keyOf(tenant), JSON.stringify(parseTenantLimits(tenant, limits)));
  }

  /** Removes a tenant's own limits: the default applies to it again. */
  async remove(tenant: string): Promise<void> {
    await this.kv.delete(TenantRegistry.keyOf(tenant));
  }
}
