/**
 * Makes the engine a worker serves with from a plain description (command-line flags, an
 * environment, a JSON file):
 *
 * ```ts
 * createEngine({ engine: "vllm", url: "http://10.0.0.7:8000", model: "llama3-8b" });
 * createEngine({ engine: "deepspeed-mii", url: "http://10.0.0.7:28080", model: "mistral-deployment" });
 * createEngine({ engine: "simulated", base_ms: 8, per_item_ms: 0.5 });
 * createEngine({ engine: "llm-sim", kv_tokens: 32768, max_running: 32 });
 * ```
 *
 * A description that does not fit its engine (a missing `url`, an option of another engine, a
 * misspelt one) fails with an {@link EngineSpecError} saying what to fix, rather than being
 * half-used.
 */
import type { Engine } from "./engine.js";
import { DeepSpeedMiiEngine } from "./engines/deepspeed-mii.js";
import { LlmSimEngine, type LlmSimOptions } from "./engines/llm-sim.js";
import { SimulatedEngine, type SimulatedEngineOptions } from "./engines/simulated.js";
import { VllmEngine } from "./engines/vllm.js";
import { CodedError } from "../proto/coded-error.js";

/** The engines {@link createEngine} makes. */
export const ENGINE_NAMES = ["simulated", "llm-sim", "vllm", "deepspeed-mii"] as const;
export type EngineName = (typeof ENGINE_NAMES)[number];

export interface EngineSpec extends SimulatedEngineOptions, Omit<LlmSimOptions, "capacity"> {
  readonly engine: EngineName;
  /** The inference server's address (`vllm`, `deepspeed-mii`), e.g. `http://10.0.0.7:8000`. */
  readonly url?: string;
  /**
   * `vllm`: the model name the server serves (default: each request's model);
   * `deepspeed-mii`: the deployment name (required).
   */
  readonly model?: string;
  /** `vllm`: the server's API key. */
  readonly apiKey?: string;
  /** `vllm`: use chat completions, the prompt being one user message. */
  readonly chat?: boolean;
  /** `vllm`, `deepspeed-mii`: longest wait for an answer, ms. */
  readonly requestTimeoutMs?: number;
  /** `vllm`, `deepspeed-mii`: parameters for requests that do not set them. */
  readonly defaultParameters?: Readonly<Record<string, unknown>>;
}

export type EngineSpecErrorCode = "UNKNOWN_ENGINE" | "MISSING_OPTION" | "INVALID_OPTION";

/** A description {@link createEngine} cannot make an engine of. */
export class EngineSpecError extends CodedError<EngineSpecErrorCode> {
  override readonly name = "EngineSpecError";
}

const SIMULATED_OPTIONS = ["base_ms", "per_item_ms", "ttft_ms", "token_interval_ms", "capacity", "call_log_limit"] as const;
const LLM_SIM_OPTIONS = ["kv_tokens", "max_running", "step_ms", "step_per_seq_ms", "prefill_ms_per_token", "capacity", "log_limit"] as const;
const VLLM_OPTIONS = ["url", "model", "apiKey", "chat", "capacity", "requestTimeoutMs", "defaultParameters"] as const;
const MII_OPTIONS = ["url", "model", "capacity", "requestTimeoutMs", "defaultParameters"] as const;

/** The options each engine takes (besides `engine`). */
const ENGINE_OPTIONS: Readonly<Record<EngineName, readonly string[]>> = {
  simulated: SIMULATED_OPTIONS,
  "llm-sim": LLM_SIM_OPTIONS,
  vllm: VLLM_OPTIONS,
  "deepspeed-mii": MII_OPTIONS,
};

/** Makes the engine `spec` describes; throws an {@link EngineSpecError} when it cannot. */
export function createEngine(spec: EngineSpec): Engine {
  const name: unknown = (spec as { engine?: unknown } | undefined)?.engine;
  if (!isEngineName(name)) {
    throw new EngineSpecError("UNKNOWN_ENGINE", `unknown engine ${JSON.stringify(name)}: use one of ${ENGINE_NAMES.join(", ")}`);
  }
  const allowed = ENGINE_OPTIONS[name];
  for (const key of Object.keys(spec)) {
    if (key === "engine" || (spec as unknown as Record<string, unknown>)[key] === undefined) continue;
    if (!allowed.includes(key)) {
      throw new EngineSpecError("INVALID_OPTION", `option '${key}' does not apply to engine '${name}' (it takes: ${allowed.join(", ")})`);
    }
  }
  try {
    switch (name) {
      case "simulated": {
        const { engine: _engine, ...options } = spec;
        return new SimulatedEngine(options);
      }
      case "llm-sim": {
        const options: LlmSimOptions = {};
        for (const key of LLM_SIM_OPTIONS) {
          const value = (spec as unknown as Record<string, unknown>)[key];
          if (value === undefined) continue;
          if (typeof value !== "number") throw new EngineSpecError("INVALID_OPTION", `engine 'llm-sim': '${key}' must be a number, got ${JSON.stringify(value)}`);
          options[key] = value;
        }
        return new LlmSimEngine(options);
      }
      case "vllm":
        return new VllmEngine({
          baseUrl: requireUrl(spec, name),
          ...(spec.model !== undefined ? { servedModel: stringOption(spec.model, "model", name) } : {}),
          ...(spec.apiKey !== undefined ? { apiKey: stringOption(spec.apiKey, "apiKey", name) } : {}),
          ...(spec.chat !== undefined ? { chat: booleanOption(spec.chat, "chat", name) } : {}),
          ...(spec.capacity !== undefined ? { capacity: spec.capacity } : {}),
          ...(spec.requestTimeoutMs !== undefined ? { requestTimeoutMs: spec.requestTimeoutMs } : {}),
          ...(spec.defaultParameters !== undefined ? { defaultParameters: spec.defaultParameters } : {}),
        });
      case "deepspeed-mii":
        if (spec.model === undefined || spec.model === "") {
          throw new EngineSpecError("MISSING_OPTION", "engine 'deepspeed-mii' needs 'model': the deployment_name given to mii.serve");
        }
        return new DeepSpeedMiiEngine({
          baseUrl: requireUrl(spec, name),
          deployment: stringOption(spec.model, "model", name),
          ...(spec.capacity !== undefined ? { capacity: spec.capacity } : {}),
          ...(spec.requestTimeoutMs !== undefined ? { requestTimeoutMs: spec.requestTimeoutMs } : {}),
          ...(spec.defaultParameters !== undefined ? { defaultParameters: spec.defaultParameters } : {}),
        });
    }
  } catch (err) {
    if (err instanceof EngineSpecError) throw err;
    // The engines' own checks (a capacity of 0, a bad URL, a bad default parameter).
    throw new EngineSpecError("INVALID_OPTION", `engine '${name}': ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
}

function isEngineName(value: unknown): value is EngineName {
  return typeof value === "string" && (ENGINE_NAMES as readonly string[]).includes(value);
}

function requireUrl(spec: EngineSpec, name: EngineName): string {
  if (spec.url === undefined || spec.url === "") {
    throw new EngineSpecError("MISSING_OPTION", `engine '${name}' needs 'url': where the inference server listens, e.g. http://127.0.0.1:8000`);
  }
  return stringOption(spec.url, "url", name);
}

function stringOption(value: unknown, key: string, name: EngineName): string {
  if (typeof value !== "string") throw new EngineSpecError("INVALID_OPTION", `engine '${name}': '${key}' must be a string, got ${JSON.stringify(value)}`);
  return value;
}

function booleanOption(value: unknown, key: string, name: EngineName): boolean {
  if (typeof value !== "boolean") throw new EngineSpecError("INVALID_OPTION", `engine '${name}': '${key}' must be true or false, got ${JSON.stringify(value)}`);
  return value;
}
