/**
 * Test harness: an OTLP/HTTP trace receiver on 127.0.0.1 and a free port, standing in for
 * Jaeger's collector. Accepts `POST /v1/traces` as `application/x-protobuf` (decoded with the
 * schema in `otlp/trace.proto`) or `application/json`, optionally gzip-compressed, and keeps
 * every span it receives in one plain shape whatever the encoding.
 *
 * ```ts
 * const receiver = await OtlpReceiver.start();
 * const tracing = startTracing({ serviceName: "x", env: { OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url } });
 * ...
 * const spans = await receiver.waitForSpans((all) => all.length >= 3);
 * await receiver.stop();
 * ```
 */
import { EventEmitter } from "node:events";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { fileURLToPath } from "node:url";
import { gunzipSync } from "node:zlib";
import protobuf from "protobufjs";

const PROTO_PATH = fileURLToPath(new URL("./otlp/trace.proto", import.meta.url));
const root = protobuf.loadSync(PROTO_PATH);
const ExportRequest = root.lookupType("sluice.test.otlp.ExportTraceServiceRequest");
const ExportResponse = root.lookupType("sluice.test.otlp.ExportTraceServiceResponse");

export type SpanKindName = "UNSPECIFIED" | "INTERNAL" | "SERVER" | "CLIENT" | "PRODUCER" | "CONSUMER";
const KINDS: readonly SpanKindName[] = ["UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"];
const STATUS_CODES = ["UNSET", "OK", "ERROR"] as const;

export type AttributeValue = string | number | boolean | null | AttributeValue[] | { [key: string]: AttributeValue };

export interface ReceivedLink {
  traceId: string;
  spanId: string;
  attributes: Record<string, AttributeValue>;
}

export interface ReceivedEvent {
  name: string;
  timeUnixNano: bigint;
  attributes: Record<string, AttributeValue>;
}

export interface ReceivedSpan {
  /** 32 hex digits. */
  traceId: string;
  /** 16 hex digits. */
  spanId: string;
  /** Undefined for a root span. */
  parentSpanId: string | undefined;
  traceState: string | undefined;
  name: string;
  kind: SpanKindName;
  attributes: Record<string, AttributeValue>;
  links: ReceivedLink[];
  events: ReceivedEvent[];
  status: { code: (typeof STATUS_CODES)[number]; message: string };
  startTimeUnixNano: bigint;
  endTimeUnixNano: bigint;
  /** Start and end as epoch milliseconds (with fractions). */
  startMs: number;
  endMs: number;
  /** The resource's `service.name`. */
  serviceName: string | undefined;
  resource: Record<string, AttributeValue>;
  scope: string | undefined;
  /** The request's content type: how the span arrived. */
  contentType: string;
}

export interface ReceivedRequest {
  contentType: string;
  contentEncoding: string | undefined;
  spans: number;
}

// The decoded request, as protobufjs's toObject and OTLP/JSON both shape it (lowerCamelCase
// names; ids as bytes or hex; 64-bit numbers as strings or numbers).
interface RawAnyValue {
  stringValue?: string;
  boolValue?: boolean;
  intValue?: string | number;
  doubleValue?: number;
  arrayValue?: { values?: RawAnyValue[] };
  kvlistValue?: { values?: RawKeyValue[] };
  bytesValue?: Uint8Array | string;
}
interface RawKeyValue {
  key?: string;
  value?: RawAnyValue;
}
type RawId = Uint8Array | string | undefined;
type RawNumber = string | number | undefined;
interface RawSpan {
  traceId?: RawId;
  spanId?: RawId;
  parentSpanId?: RawId;
  traceState?: string;
  name?: string;
  kind?: number | string;
  startTimeUnixNano?: RawNumber;
  endTimeUnixNano?: RawNumber;
  attributes?: RawKeyValue[];
  events?: Array<{ name?: string; timeUnixNano?: RawNumber; attributes?: RawKeyValue[] }>;
  links?: Array<{ traceId?: RawId; spanId?: RawId; attributes?: RawKeyValue[] }>;
  status?: { code?: number | string; message?: string };
}
interface RawExportRequest {
  resourceSpans?: Array<{
    resource?: { attributes?: RawKeyValue[] };
    scopeSpans?: Array<{ scope?: { name?: string }; spans?: RawSpan[] }>;
  }>;
}

export class OtlpReceiver {
  private readonly received: ReceivedSpan[] = [];
  private readonly log: ReceivedRequest[] = [];
  private readonly arrivals = new EventEmitter();
  private stopping: Promise<void> | undefined;

  private readonly server: Server;
  private boundPort = 0;

  private constructor() {
    this.server = createServer((req, res) => {
      this.handle(req, res).catch(() => {
        if (!res.headersSent) res.writeHead(500);
        res.end();
      });
    });
  }

  static async start(): Promise<OtlpReceiver> {
    const receiver = new OtlpReceiver();
    const server = receiver.server;
    receiver.boundPort = await new Promise<number>((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => resolve((server.address() as AddressInfo).port));
    });
    return receiver;
  }

  get port(): number {
    return this.boundPort;
  }

  /** Base URL, for `OTEL_EXPORTER_OTLP_ENDPOINT`. */
  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Full traces URL, for `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`. */
  get tracesUrl(): string {
    return `${this.url}/v1/traces`;
  }

  /** Every span received so far, in arrival order. */
  spans(): ReceivedSpan[] {
    return [...this.received];
  }

  /** Every export request received so far. */
  requests(): ReceivedRequest[] {
    return [...this.log];
  }

  clear(): void {
    this.received.length = 0;
    this.log.length = 0;
  }

  /**
   * Resolves with all spans once `predicate` holds for them; rejects after `timeoutMs` with
   * the names of what did arrive.
   */
  waitForSpans(predicate: (spans: ReceivedSpan[]) => boolean, timeoutMs = 5_000): Promise<ReceivedSpan[]> {
    return new Promise<ReceivedSpan[]>((resolve, reject) => {
      const check = (): boolean => {
        const all = this.spans();
        if (!predicate(all)) return false;
        clearTimeout(timer);
        this.arrivals.removeListener("spans", onSpans);
        resolve(all);
        return true;
      };
      const onSpans = (): void => void check();
      const timer = setTimeout(() => {
        this.arrivals.removeListener("spans", onSpans);
        const names = this.received.map((s) => `${s.serviceName ?? "?"}:${s.name}`).join(", ");
        reject(new Error(`spans not received within ${timeoutMs} ms; received ${this.received.length}: [${names}]`));
      }, timeoutMs);
      this.arrivals.on("spans", onSpans);
      check();
    });
  }

  /** Stops the receiver and closes its connections. Safe to call twice. */
  stop(): Promise<void> {
    this.stopping ??= new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
    return this.stopping;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = (req.url ?? "/").split("?")[0];
    if (req.method !== "POST" || path !== "/v1/traces") {
      res.writeHead(404).end();
      return;
    }
    let body = await readBody(req);
    const encoding = req.headers["content-encoding"];
    if (encoding === "gzip") body = gunzipSync(body);
    const contentType = (req.headers["content-type"] ?? "").split(";")[0]?.trim() ?? "";
    let raw: RawExportRequest;
    try {
      if (contentType === "application/x-protobuf") {
        raw = ExportRequest.toObject(ExportRequest.decode(body), { longs: String, enums: Number, arrays: true });
      } else if (contentType === "application/json") {
        raw = JSON.parse(body.toString("utf8")) as RawExportRequest;
      } else {
        res.writeHead(415).end();
        return;
      }
    } catch (err) {
      res.writeHead(400, { "Content-Type": "text/plain" }).end(`cannot decode: ${(err as Error).message}`);
      return;
    }
    const spans = normalize(raw, contentType);
    this.received.push(...spans);
    this.log.push({ contentType, contentEncoding: encoding, spans: spans.length });
    if (contentType === "application/x-protobuf") {
      const answer = ExportResponse.encode(ExportResponse.create({})).finish();
      res.writeHead(200, { "Content-Type": "application/x-protobuf" }).end(Buffer.from(answer));
    } else {
      res.writeHead(200, { "Content-Type": "application/json" }).end("{}");
    }
    this.arrivals.emit("spans");
  }
}

function readBody(req: IncomingMessage): Promise<Buffer> {
  return new Promise<Buffer>((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => resolve(Buffer.concat(chunks)));
    req.on("error", reject);
  });
}

function normalize(raw: RawExportRequest, contentType: string): ReceivedSpan[] {
  const out: ReceivedSpan[] = [];
  for (const rs of raw.resourceSpans ?? []) {
    const resource = attributesOf(rs.resource?.attributes);
    const serviceName = typeof resource["service.name"] === "string" ? resource["service.name"] : undefined;
    for (const ss of rs.scopeSpans ?? []) {
      for (const s of ss.spans ?? []) {
        const start = toBigInt(s.startTimeUnixNano);
        const end = toBigInt(s.endTimeUnixNano);
        const parent = hexId(s.parentSpanId);
        out.push({
          traceId: hexId(s.traceId),
          spanId: hexId(s.spanId),
          parentSpanId: parent === "" ? undefined : parent,
          traceState: s.traceState ? s.traceState : undefined,
          name: s.name ?? "",
          kind: kindOf(s.kind),
          attributes: attributesOf(s.attributes),
          links: (s.links ?? []).map((l) => ({ traceId: hexId(l.traceId), spanId: hexId(l.spanId), attributes: attributesOf(l.attributes) })),
          events: (s.events ?? []).map((e) => ({ name: e.name ?? "", timeUnixNano: toBigInt(e.timeUnixNano), attributes: attributesOf(e.attributes) })),
          status: { code: statusOf(s.status?.code), message: s.status?.message ?? "" },
          startTimeUnixNano: start,
          endTimeUnixNano: end,
          startMs: nanosToMs(start),
          endMs: nanosToMs(end),
          serviceName,
          resource,
          scope: ss.scope?.name,
          contentType,
        });
      }
    }
  }
  return out;
}

/** Protobuf ids are bytes; OTLP/JSON ids are hex strings already. */
function hexId(id: RawId): string {
  if (id === undefined) return "";
  if (typeof id === "string") return id.toLowerCase();
  return Buffer.from(id).toString("hex");
}

function toBigInt(n: RawNumber): bigint {
  if (n === undefined || n === "") return 0n;
  return typeof n === "number" ? BigInt(Math.round(n)) : BigInt(n);
}

function nanosToMs(n: bigint): number {
  return Number(n / 1000n) / 1000;
}

function kindOf(k: number | string | undefined): SpanKindName {
  if (typeof k === "string") {
    const name = k.replace(/^SPAN_KIND_/, "");
    return (KINDS as readonly string[]).includes(name) ? (name as SpanKindName) : "UNSPECIFIED";
  }
  return KINDS[k ?? 0] ?? "UNSPECIFIED";
}

function statusOf(c: number | string | undefined): (typeof STATUS_CODES)[number] {
  if (typeof c === "string") {
    const name = c.replace(/^STATUS_CODE_/, "");
    return name === "OK" || name === "ERROR" ? name : "UNSET";
  }
  return STATUS_CODES[c ?? 0] ?? "UNSET";
}

function attributesOf(list: RawKeyValue[] | undefined): Record<string, AttributeValue> {
  const out: Record<string, AttributeValue> = {};
  for (const kv of list ?? []) if (kv.key !== undefined) out[kv.key] = valueOf(kv.value);
  return out;
}

function valueOf(v: RawAnyValue | undefined): AttributeValue {
  if (!v) return null;
  if (v.stringValue !== undefined) return v.stringValue;
  if (v.boolValue !== undefined) return v.boolValue;
  if (v.intValue !== undefined) return Number(v.intValue);
  if (v.doubleValue !== undefined) return Number(v.doubleValue);
  if (v.arrayValue !== undefined) return (v.arrayValue.values ?? []).map(valueOf);
  if (v.kvlistValue !== undefined) return attributesOf(v.kvlistValue.values);
  if (v.bytesValue !== undefined) return typeof v.bytesValue === "string" ? v.bytesValue : Buffer.from(v.bytesValue).toString("base64");
  return null;
}
