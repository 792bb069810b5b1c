/**
 * The model registry (docs/protocol.md, "Registry"): which versions serve a model, with what
 * weights, batch settings and timeout. Kept in the NATS KV bucket `infer_models` and watched, so
 * a KV write changes routing on every running pipeline without a restart.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import type { KV } from "@nats-io/kv";
import type { ErrorInfo } from "../../operators/types.js";
import { BucketRegistry, openRegistryBucket, seedBucket } from "./kv-watch.js";
import { TOKEN_RE, MODELS_BUCKET, VERSION_RE } from "../../proto/wire.js";
import { ROUTING_POLICIES, type RoutingPolicyName } from "../workers/routing-policy.js";

const DEFAULT_MAX_BATCH = 32;
const DEFAULT_MAX_DELAY_MS = 5;

export interface ModelSpec {
  versions: Record<string, { weight: number }>;
  shadow?: string;
  /**
   * A generative model (an LLM): every request goes through the worker's `Generate`, one per
   * worker slot, instead of being batched (the engine batches continuously on the GPU).
   */
  generate?: boolean;
  batch?: { max_size?: number; max_delay_ms?: number };
  timeout_ms?: number;
  /**
   * How a worker is chosen for each request: `prefix` (by the prompt tokens a worker would have
   * to prefill and its load; the default for generative models), `least-loaded` (the default
   * otherwise) or `round-robin`.
   */
  routing?: RoutingPolicyName;
  /** How the HTTP gateway turns chat `messages` into a prompt; `plain` (a join) by default. */
  chat_template?: ChatTemplateName;
  /** Answers of deterministic requests are kept in the result cache (bucket `infer_cache`). */
  cache?: CacheSpec;
}

/** A model's result cache (registry field `cache`). */
export interface CacheSpec {
  /** How long an answer is served from the cache, ms (at most the bucket's max age). */
  ttl_ms: number;
  /** One cache for all tenants; by default each tenant has its own. */
  shared?: boolean;
}

/** Chat templates the HTTP gateway knows (registry field `chat_template`). */
const CHAT_TEMPLATES = ["plain", "chatml"] as const;
export type ChatTemplateName = (typeof CHAT_TEMPLATES)[number];

export interface BatchSettings {
  maxSize: number;
  maxDelayMs: number;
}

export class ModelSpecError extends Error {
  override readonly name = "ModelSpecError";
  readonly code = "INVALID_ARGUMENT" as const;
}

/** Checks a registry value; returns it typed or throws a ModelSpecError saying what is wrong. */
export function parseModelSpec(model: string, value: unknown): ModelSpec {
  const fail = (msg: string): never => {
    throw new ModelSpecError(`model '${model}': ${msg}`);
  };
  if (!TOKEN_RE.test(model)) fail("name must be 1-64 of a-z 0-9 _ -");
  if (typeof value !== "object" || value === null || Array.isArray(value)) return fail("value must be a JSON object");
  const v = value as Record<string, unknown>;
  for (const k of Object.keys(v))
    if (!["versions", "shadow", "batch", "timeout_ms", "generate", "chat_template", "cache", "routing"].includes(k)) fail(`unknown field '${k}'`);
  const template = v["chat_template"];
  if (template !== undefined && !(CHAT_TEMPLATES as readonly unknown[]).includes(template))
    fail(`'chat_template' must be one of ${CHAT_TEMPLATES.join(", ")}`);
  const versions = v["versions"];
  if (typeof versions !== "object" || versions === null || Array.isArray(versions)) return fail("'versions' must be an object");
  const out: ModelSpec = { versions: {} };
  for (const [ver, spec] of Object.entries(versions as Record<string, unknown>)) {
    if (!VERSION_RE.test(ver)) fail(`version '${ver}' must be 1-64 of A-Z a-z 0-9 . _ -`);
    const w = (spec as { weight?: unknown } | null)?.weight ?? 0;
    if (typeof w !== "number" || !Number.isFinite(w) || w < 0) fail(`version '${ver}': weight must be a number >= 0`);
    out.versions[ver] = { weight: w as number };
  }
  if (Object.keys(out.versions).length === 0) fail("'versions' must name at least one version");
  if (v["shadow"] !== undefined) {
    if (typeof v["shadow"] !== "string" || !VERSION_RE.test(v["shadow"])) fail("'shadow' must be a version name");
    out.shadow = v["shadow"] as string;
  }
  if (v["batch"] !== undefined) {
    const b = v["batch"] as Record<string, unknown>;
    if (typeof b !== "object" || b === null) fail("'batch' must be an object");
    out.batch = {};
    if (b["max_size"] !== undefined) {
      if (!Number.isInteger(b["max_size"]) || (b["max_size"] as number) < 1) fail("batch.max_size must be an integer >= 1");
      out.batch.max_size = b["max_size"] as number;
    }
    if (b["max_delay_ms"] !== undefined) {
      if (typeof b["max_delay_ms"] !== "number" || b["max_delay_ms"] < 0) fail("batch.max_delay_ms must be a number >= 0");
      out.batch.max_delay_ms = b["max_delay_ms"] as number;
    }
  }
  if (v["generate"] !== undefined) {
    if (typeof v["generate"] !== "boolean") fail("'generate' must be true or false");
    out.generate = v["generate"] as boolean;
  }
  if (v["routing"] !== undefined) {
    if (!(ROUTING_POLICIES as readonly unknown[]).includes(v["routing"])) fail(`'routing' must be one of ${ROUTING_POLICIES.join(", ")}`);
    out.routing = v["routing"] as RoutingPolicyName;
  }
  if (v["timeout_ms"] !== undefined) {
    if (typeof v["timeout_ms"] !== "number" || v["timeout_ms"] <= 0) fail("timeout_ms must be a number > 0");
    out.timeout_ms = v["timeout_ms"] as number;
  }
  if (template !== undefined) out.chat_template = template as ChatTemplateName;
  if (v["cache"] !== undefined) out.cache = parseCacheSpec(v["cache"], fail);
  return out;
}

function parseCacheSpec(value: unknown, fail: (msg: string) => never): CacheSpec {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return fail(`'cache' must be an object such as {"ttl_ms": 60000}`);
  const c = value as Record<string, unknown>;
  for (const k of Object.keys(c)) if (!["ttl_ms", "shared"].includes(k)) fail(`cache: unknown field '${k}' (known: ttl_ms, shared)`);
  const ttl = c["ttl_ms"];
  if (ttl === undefined) fail("cache.ttl_ms is required (how long an answer is served from the cache, ms)");
  if (typeof ttl !== "number" || !Number.isInteger(ttl) || ttl < 1) fail(`cache.ttl_ms must be an integer number of milliseconds >= 1, got ${JSON.stringify(ttl)}`);
  const out: CacheSpec = { ttl_ms: ttl };
  if (c["shared"] !== undefined) {
    if (typeof c["shared"] !== "boolean") fail("cache.shared must be true or false");
    out.shared = c["shared"];
  }
  return out;
}

/** FNV-1a, 32 bit: a stable hash so a request id always lands on the same version. */
export function stableHash(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

export type Resolution = { ok: true; version: string } | { ok: false; error: ErrorInfo };

/** Routing decisions over a set of model specs; the KV watcher keeps the set current. */
export class ModelTable {
  private readonly models = new Map<string, ModelSpec>();
  private readonly listeners = new Set<(model: string, spec: ModelSpec | undefined) => void>();
  /** Counts each applied change (tests and metrics wait on it). */
  revision = 0;

  constructor(private readonly defaults: { timeoutMs: number } = { timeoutMs: 30_000 }) {}

  set(model: string, spec: ModelSpec): void {
    this.models.set(model, spec);
    this.revision++;
    this.emit(model, spec);
  }

  delete(model: string): void {
    this.models.delete(model);
    this.revision++;
    this.emit(model, undefined);
  }

  get(model: string): ModelSpec | undefined {
    return this.models.get(model);
  }

  list(): Array<[string, ModelSpec]> {
    return [...this.models.entries()];
  }

  onChange(f: (model: string, spec: ModelSpec | undefined) => void): () => void {
    this.listeners.add(f);
    return () => this.listeners.delete(f);
  }

  private emit(model: string, spec: ModelSpec | undefined): void {
    for (const f of this.listeners) {
      try {
        f(model, spec);
      } catch {
        // a listener's failure is its own
      }
    }
  }

  /** Chooses the version for a request: pinned, else by weight on a stable hash of the id. */
  resolve(model: string, pinned: string | undefined, id: string): Resolution {
    const spec = this.models.get(model);
    if (!spec) return { ok: false, error: { code: "NOT_FOUND", message: `unknown model '${model}'` } };
    if (pinned !== undefined) {
      if (spec.versions[pinned] || spec.shadow === pinned) return { ok: true, version: pinned };
      return { ok: false, error: { code: "NOT_FOUND", message: `unknown version '${pinned}' of model '${model}'` } };
    }
    const entries = Object.entries(spec.versions).filter(([, v]) => v.weight > 0);
    const total = entries.reduce((a, [, v]) => a + v.weight, 0);
    if (total <= 0) return { ok: false, error: { code: "NOT_FOUND", message: `model '${model}' has no version with a weight above 0` } };
    // Scale the hash to [0, total) so fractional weights work too.
    let point = (stableHash(id) / 0x1_0000_0000) * total;
    for (const [ver, v] of entries) {
      if (point < v.weight) return { ok: true, version: ver };
      point -= v.weight;
    }
    return { ok: true, version: entries[entries.length - 1]![0] };
  }

  batchSettings(model: string): BatchSettings {
    const b = this.models.get(model)?.batch;
    return { maxSize: b?.max_size ?? DEFAULT_MAX_BATCH, maxDelayMs: b?.max_delay_ms ?? DEFAULT_MAX_DELAY_MS };
  }

  /** The model's routing policy: its own, else `prefix` for generative models, `least-loaded` for others. */
  routing(model: string): RoutingPolicyName {
    const spec = this.models.get(model);
    return spec?.routing ?? (spec?.generate ? "prefix" : "least-loaded");
  }

  timeoutMs(model: string): number {
    return this.models.get(model)?.timeout_ms ?? this.defaults.timeoutMs;
  }
}

export interface ModelRegistryOptions {
  replicas?: number;
  /** Models written when the bucket does not have them yet (configuration seed). */
  seed?: Record<string, ModelSpec>;
  /** Hears of invalid registry values (they are ignored, the previous value stays). */
  onInvalid?: (key: string, err: Error) => void;
  timeoutMs?: number;
}

/** The KV-backed registry: a {@link ModelTable} kept in step with bucket `infer_models`. */
export class ModelRegistry extends BucketRegistry {
  private constructor(
    kv: KV,
    readonly table: ModelTable,
  ) {
    super(kv, MODELS_BUCKET);
  }

  static async openBucket(nc: NatsConnection, replicas = 1): Promise<KV> {
    return openRegistryBucket(nc, MODELS_BUCKET, replicas);
  }

  /** Opens (creating if needed) the bucket, seeds it, loads it and starts watching. */
  static async open(nc: NatsConnection, opts: ModelRegistryOptions = {}): Promise<ModelRegistry> {
    const kv = await ModelRegistry.openBucket(nc, opts.replicas ?? 1);
    await seedBucket(kv, opts.seed ?? {}, (model, spec) => {
      parseModelSpec(model, spec);
      return [model, spec];
    });
    const reg = new ModelRegistry(kv, new ModelTable({ timeoutMs: opts.timeoutMs ?? 30_000 }));
    await reg.watch(
      {
        put: (key, value) => reg.table.set(key, parseModelSpec(key, value)),
        remove: (key) => reg.table.delete(key),
      },
      opts.onInvalid,
    );
    return reg;
  }

  async put(model: string, spec: ModelSpec): Promise<void> {
    await this.kv.put(model, JSON.stringify(parseModelSpec(model, spec)));
  }

  async remove(model: string): Promise<void> {
    await this.kv.delete(model);
  }
}
