/**
 * An {@link Engine} over DeepSpeed-MII's RESTful gateway, the one
 * `mii.serve(model, deployment_name=..., enable_restful_api=True, restful_api_port=...)` starts.
 *
 * Wire format, as DeepSpeed-MII v0.3.x defines it (`mii/grpc_related/restful_gateway.py`,
 * `mii/batching/data_classes.py`, `mii/config.py`, and the README section "RESTful API"; the
 * gateway is unchanged from v0.3.0 through the v0.3.2 development line):
 * - `POST /mii/<deployment_name>` with `{"prompts": [...], <generate keywords>}`: the gateway
 *   calls `client.generate(**body)`, so every key other than `prompts` is a keyword of
 *   `GenerateParamsConfig` (`max_length`, `max_new_tokens`, `min_new_tokens`, `ignore_eos`,
 *   `top_p`, `top_k`, `temperature` (> 0), `do_sample`, `return_full_text`, `stop`), one set
 *   for all prompts of the call.
 * - The answer is a JSON list, one object per prompt in prompt order:
 *   `{"generated_text", "prompt_length", "generated_length", "finish_reason"}` with
 *   `finish_reason` one of `stop`, `length`.
 * - Errors: the gateway is Flask-RESTful; any failure behind it (a bad keyword, a prompt too
 *   long, the model server down) is 500 `{"message": "Internal Server Error"}`; a body that is
 *   not JSON is 400 `{"message": ...}`; an unknown deployment name is Flask's 404 HTML page.
 * - `GET /healthz` answers `ok` (since v0.3.0).
 * - It does not stream: the gateway answers once the whole text is generated. MII streams only
 *   through its Python client (`streaming_fn`, over gRPC) and through the separate FastAPI
 *   server `mii.entrypoints.api_server`, which is not this API. So {@link generate} yields the
 *   whole text as one chunk.
 * - Each gateway process serves one request at a time (Werkzeug, `threaded=False`,
 *   `restful_processes` processes, 32 by default): the default capacity here is 32.
 *
 * Decisions (the rest as in `vllm.ts`: grouping of items that share parameters into one
 * prompt list, asking again prompt by prompt after a 400 or 500, the status mapping, whole-batch
 * rejection when every call was UNAVAILABLE):
 * - Parameters: sluice's `max_tokens` becomes `max_new_tokens` and `min_tokens`
 *   `min_new_tokens`; `temperature: 0` becomes `do_sample: false` (greedy), as MII refuses a
 *   temperature of 0; `max_length`, `do_sample`, `ignore_eos`, `top_p`, `top_k`, `stop` pass as
 *   they are; anything else (`seed` among them: MII has none) fails its item with
 *   INVALID_ARGUMENT. MII would answer an unknown keyword with a 500 for the whole call.
 * - Aborting a call drops its HTTP connection at once; the gateway does not notice and
 *   finishes the generation, so cancelling frees this side only.
 */
import {
  EngineError,
  type Engine,
  type EngineItemResult,
  type EngineRequest,
  type EngineToken,
  type EngineUsage,
} from "../engine.js";
import { booleanParameter, integerParameter, mapParameters, numberParameter, ONE_ANSWER, parameterKey, stringsParameter, type ParameterRule } from "../http/parameters.js";
import { generationOnce, type HttpGeneration } from "../http/generation.js";
import { DEFAULT_REQUEST_TIMEOUT_MS, HttpEngineClient } from "../http/client.js";
import { isRecord, tokenCount, type BatchCalls, type Preparation, type PreparedItem } from "../http/batch.js";
import { HttpBatchEngine, type HttpEngineOptions } from "../http/engine-base.js";

/** Items in flight at once, by default: the gateway's default number of processes. */
export const DEFAULT_MII_CAPACITY = 32;
/** The path prefix of MII's RESTful gateway (`RESTFUL_API_PATH`). */
const MII_RESTFUL_API_PATH = "/mii";

/** `temperature`: 0 means greedy, which MII spells `do_sample: false`. */
const temperatureRule: ParameterRule = (_name, value, body) => {
  if (typeof value !== "number" || !Number.isFinite(value) || value < 0) return `must be a number >= 0, got ${JSON.stringify(value)}`;
  if (value === 0) {
    if (body["do_sample"] === true) return "0 (greedy) contradicts do_sample: true";
    body["do_sample"] = false;
  } else {
    body["temperature"] = value;
  }
  return undefined;
};

/** `do_sample`, checked against a greedy temperature given first. */
const doSampleRule: ParameterRule = (name, value, body) => {
  if (typeof value !== "boolean") return `must be true or false, got ${JSON.stringify(value)}`;
  if (value && body["do_sample"] === false && body["temperature"] === undefined) return "true contradicts temperature: 0 (greedy)";
  body[name] = value;
  return undefined;
};

/** sluice parameters this adapter takes, and the MII keywords they become. */
const MII_PARAMETERS: Readonly<Record<string, ParameterRule>> = {
  max_tokens: integerParameter(1, "max_new_tokens"),
  max_length: integerParameter(1),
  min_tokens: integerParameter(0, "min_new_tokens"),
  temperature: temperatureRule,
  top_p: numberParameter({ min: 0, minExclusive: true, max: 1 }),
  top_k: integerParameter(1),
  do_sample: doSampleRule,
  ignore_eos: booleanParameter(),
  stop: stringsParameter(),
  n: ONE_ANSWER,
};

/**
 * `baseUrl`: where the RESTful gateway listens, e.g. `http://10.0.0.7:28080`; `capacity`: default
 * {@link DEFAULT_MII_CAPACITY}.
 */
export interface DeepSpeedMiiEngineOptions extends HttpEngineOptions {
  /** The `deployment_name` given to `mii.serve` (the last part of the gateway's path). */
  readonly deployment: string;
}

/** A generation of {@link DeepSpeedMiiEngine}: also tells why it finished. */
/** A generation; `finishReason()` is MII's `finish_reason` (`stop` or `length`), once known. */
export type DeepSpeedMiiGeneration = HttpGeneration;

interface MiiPayload {
  readonly prompt: string;
  readonly params: Readonly<Record<string, unknown>>;
}

interface MiiAnswer {
  readonly text: string;
  readonly usage: EngineUsage;
  readonly finish: string | undefined;
}

export class DeepSpeedMiiEngine extends HttpBatchEngine<MiiPayload> implements Engine {
  readonly capacity: number;
  readonly deployment: string;
  protected readonly http: HttpEngineClient;
  private readonly path: string;
  private readonly defaults: Readonly<Record<string, unknown>>;
  protected readonly calls: BatchCalls<MiiPayload>;

  constructor(opts: DeepSpeedMiiEngineOptions) {
    super();
    if (typeof opts.deployment !== "string" || opts.deployment.trim() === "") {
      throw new TypeError("deployment (the deployment_name given to mii.serve) is required");
    }
    this.http = new HttpEngineClient({
      label: "DeepSpeed-MII",
      baseUrl: opts.baseUrl,
      capacity: opts.capacity ?? DEFAULT_MII_CAPACITY,
      requestTimeoutMs: opts.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
    });
    this.capacity = this.http.capacity;
    this.deployment = opts.deployment;
    // A default deployment name is "<model path>-mii-deployment", slashes included: keep them.
    this.path = `${MII_RESTFUL_API_PATH}/${opts.deployment.split("/").map(encodeURIComponent).join("/")}`;
    this.defaults = { ...opts.defaultParameters };
    const checked = mapParameters(this.defaults, MII_PARAMETERS, "DeepSpeed-MII");
    if (!checked.ok) throw new TypeError(`defaultParameters: ${checked.message}`);
    this.calls = {
      prepare: (request) => this.prepare(request),
      maxItemsPerCall: this.capacity,
      call: async (items, signal) => {
        const answers = await this.post(items, signal);
        return answers.map((a): EngineItemResult => ({
          ok: true,
          output: a.finish === undefined ? { text: a.text } : { text: a.text, data: { finish_reason: a.finish } },
          usage: a.usage,
        }));
      },
    };
  }

  /** One chunk, the whole text: the gateway does not stream (see the module comment). */
  generate(request: EngineRequest, signal: AbortSignal): DeepSpeedMiiGeneration {
    return generationOnce((usage, state) => this.whole(request, signal, usage, state));
  }

  /** Whether `GET /healthz` answers 200 (false too when the gateway cannot be reached). */
  health(signal?: AbortSignal): Promise<boolean> {
    return this.http.healthy("/healthz", signal);
  }

  private prepare(request: EngineRequest): Preparation<MiiPayload> {
    if (request.inputs !== undefined) {
      return {
        ok: false,
        error: { code: "INVALID_ARGUMENT", message: `request '${request.id}': this engine serves text; 'inputs' is not supported, send 'prompt'` },
      };
    }
    if (request.prompt === undefined || request.prompt === "") {
      return { ok: false, error: { code: "INVALID_ARGUMENT", message: `request '${request.id}' has no prompt` } };
    }
    const mapped = mapParameters({ ...this.defaults, ...request.parameters }, MII_PARAMETERS, "DeepSpeed-MII");
    if (!mapped.ok) return { ok: false, error: { code: "INVALID_ARGUMENT", message: `request '${request.id}': ${mapped.message}` } };
    return { ok: true, payload: { prompt: request.prompt, params: mapped.body }, key: parameterKey(mapped.body) };
  }

  /** One call: the prompts of `items`, their shared parameters; one answer per item, in order. */
  private async post(items: readonly PreparedItem<MiiPayload>[], signal: AbortSignal): Promise<MiiAnswer[]> {
    const first = items[0];
    if (!first) return [];
    const body = { prompts: items.map((i) => i.payload.prompt), ...first.payload.params };
    const answer = await this.http.postJson(this.path, body, { signal, weight: items.length });
    const what = `DeepSpeed-MII POST ${this.path}`;
    if (!Array.isArray(answer)) throw new EngineError("INTERNAL", `${what}: the answer is not a list`);
    if (answer.length !== items.length) {
      throw new EngineError("INTERNAL", `${what}: ${answer.length} answers for ${items.length} prompts`);
    }
    return answer.map((r: unknown, i): MiiAnswer => {
      const text = isRecord(r) ? r["generated_text"] : undefined;
      if (!isRecord(r) || typeof text !== "string") {
        throw new EngineError("INTERNAL", `${what}: answer ${i} has no generated_text`);
      }
      const finish = r["finish_reason"];
      return {
        text,
        usage: { prompt_tokens: tokenCount(r["prompt_length"]), completion_tokens: tokenCount(r["generated_length"]) },
        finish: typeof finish === "string" ? finish : undefined,
      };
    });
  }

  private async *whole(
    request: EngineRequest,
    signal: AbortSignal,
    usage: EngineUsage,
    state: { finish: string | undefined },
  ): AsyncGenerator<EngineToken, void, undefined> {
    const payload = this.generationPayload(request, signal);
    const [answer] = await this.post([{ index: 0, request, payload }], signal);
    if (!answer) throw new EngineError("INTERNAL", `DeepSpeed-MII gave no answer for request '${request.id}'`);
    usage.prompt_tokens = answer.usage.prompt_tokens;
    usage.completion_tokens = answer.usage.completion_tokens;
    state.finish = answer.finish;
    if (answer.text !== "") yield { text: answer.text };
  }
}
