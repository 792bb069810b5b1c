/**
 * The KEDA manifests of infra/k8s/autoscaling refer to things that exist: the Deployments they
 * scale, the Services and ports they read from, the metrics the pipeline exports (with the
 * labels the queries use), the stream and the consumers the pipeline creates, the models the
 * workers register.
 */
import { expect } from "chai";
import { mkdtemp, readFile, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseAllDocuments } from "yaml";
import { loadConfig, type SluiceConfig } from "../../pipeline/config.js";
import { durableName } from "../../pipeline/intake/jetstream.js";
import { PipelineMetrics } from "../../pipeline/telemetry/metrics.js";
import { STREAM_REQUESTS } from "../../proto/wire.js";

const K8S = join(dirname(fileURLToPath(import.meta.url)), "../../infra/k8s");

type Doc = Record<string, unknown> & { kind?: string; metadata?: { name?: string }; spec?: Record<string, unknown> };

async function docs(file: string): Promise<Doc[]> {
  const text = await readFile(file, "utf8");
  return parseAllDocuments(text).map((d) => {
    expect(d.errors, `${file}: ${d.errors.map((e) => e.message).join("; ")}`).to.deep.equal([]);
    return d.toJS() as Doc;
  });
}

/** The documents of a kustomization's resource files (not its sub-kustomizations). */
async function kustomization(dir: string): Promise<{ k: Doc; resources: Doc[] }> {
  const [k] = await docs(join(dir, "kustomization.yaml"));
  const resources: Doc[] = [];
  for (const r of (k!["resources"] as string[] | undefined) ?? []) {
    if (r.endsWith(".yaml")) resources.push(...(await docs(join(dir, r))));
  }
  return { k: k!, resources };
}

const named = (all: Doc[], kind: string, name: string): Doc | undefined => all.find((d) => d.kind === kind && d.metadata?.name === name);

interface Trigger {
  type: string;
  metadata: Record<string, string>;
}

describe("infra: KEDA autoscaling manifests", function () {
  let base: Doc[];
  let gpu: Doc[];
  let scaling: { k: Doc; resources: Doc[] };
  let scalingGpu: { k: Doc; resources: Doc[] };
  let config: SluiceConfig;
  let exported: Map<string, readonly string[]>;

  before(async () => {
    base = (await kustomization(K8S)).resources;
    gpu = (await kustomization(join(K8S, "gpu"))).resources;
    scaling = await kustomization(join(K8S, "autoscaling"));
    scalingGpu = await kustomization(join(K8S, "autoscaling/gpu"));
    // The pipeline's configuration as the pod loads it (ConfigMap sluice-config).
    const cm = named(base, "ConfigMap", "sluice-config")!;
    const dir = await mkdtemp(join(tmpdir(), "sluice-k8s-"));
    try {
      const file = join(dir, "sluice.json");
      await writeFile(file, (cm["data"] as Record<string, string>)["sluice.json"]!);
      config = loadConfig({ file, env: {} });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
    // prom-client's metric objects carry their label names.
    const metrics = new PipelineMetrics({ processMetrics: false });
    exported = new Map(metrics.registry.getMetricsAsArray().map((m) => [m.name, (m as unknown as { labelNames: readonly string[] }).labelNames]));
  });

  const scaledObjects = (): Doc[] => [...scaling.resources, ...scalingGpu.resources].filter((d) => d.kind === "ScaledObject");
  const triggersOf = (so: Doc): Trigger[] => (so.spec!["triggers"] as Trigger[] | undefined) ?? [];

  it("lists only files that exist, in the namespace of the stack", async () => {
    const files = (await readdir(join(K8S, "autoscaling"))).filter((f) => f.endsWith(".yaml") && f !== "kustomization.yaml");
    expect([...(scaling.k["resources"] as string[])].sort()).to.deep.equal(files.sort());
    const [stack] = await docs(join(K8S, "kustomization.yaml"));
    expect(scaling.k["namespace"]).to.equal(stack!["namespace"]);
    expect(scalingGpu.k["namespace"]).to.equal(stack!["namespace"]);
    expect(scaledObjects().map((d) => d.metadata?.name).sort()).to.deep.equal(["sluice-pipeline", "sluice-worker-sim", "sluice-worker-vllm"]);
  });

  it("scales Deployments of the stack, and the replicas component leaves each one's count to KEDA", async () => {
    const [component] = await docs(join(K8S, "autoscaling/replicas/kustomization.yaml"));
    expect(component!.kind).to.equal("Component");
    const patched = (component!["patches"] as Array<{ target: { kind: string; name: string }; patch: string }>).map((p) => {
      expect(p.patch).to.match(/op: remove\s+path: \/spec\/replicas/);
      return `${p.target.kind}/${p.target.name}`;
    });
    for (const so of scaledObjects()) {
      expect(so.apiVersion).to.equal("keda.sh/v1alpha1");
      const target = so.spec!["scaleTargetRef"] as { name: string; kind?: string };
      expect(target.kind ?? "Deployment").to.equal("Deployment");
      const deployment = named([...base, ...gpu], "Deployment", target.name);
      expect(deployment, `Deployment ${target.name}`).to.not.equal(undefined);
      expect(patched, `replicas of ${target.name}`).to.include(`Deployment/${target.name}`);
      const min = so.spec!["minReplicaCount"] as number;
      const max = so.spec!["maxReplicaCount"] as number;
      expect(min).to.be.at.least(1);
      expect(max).to.be.greaterThan(min);
    }
    // The stack and the GPU layer offer the component (commented out until KEDA is there).
    expect(await readFile(join(K8S, "kustomization.yaml"), "utf8")).to.match(/^#\s+- autoscaling\/replicas$/m);
    expect(await readFile(join(K8S, "gpu/kustomization.yaml"), "utf8")).to.match(/^#\s+- \.\.\/autoscaling\/replicas$/m);
  });

  it("queries Prometheus's Service for metrics the pipeline exports, with their labels, for the models the workers serve", () => {
    const prometheus = named(base, "Service", "prometheus")!;
    const promPorts = (prometheus.spec!["ports"] as Array<{ port: number }>).map((p) => p.port);
    const promConfig = (named(base, "ConfigMap", "prometheus-config")!["data"] as Record<string, string>)["prometheus.yml"]!;
    const workerArgs = (name: string): string => JSON.stringify(named([...base, ...gpu], "Deployment", name)!.spec);
    let checked = 0;
    for (const so of scaledObjects()) {
      for (const t of triggersOf(so).filter((x) => x.type === "prometheus")) {
        checked++;
        const url = new URL(t.metadata["serverAddress"]!);
        expect(url.hostname).to.equal(`prometheus.${scaling.k["namespace"] as string}.svc.cluster.local`);
        expect(promPorts).to.include(Number(url.port));
        expect(Number(t.metadata["threshold"])).to.be.greaterThan(0);
        const q = t.metadata["query"]!;
        const names = [...new Set(q.match(/\bsluice_[a-z_]+/g) ?? [])];
        expect(names.sort()).to.deep.equal(["sluice_consumer_pending", "sluice_model_inflight"]);
        for (const n of names) {
          expect(exported.get(n), n).to.include("model");
          for (const [, label] of q.matchAll(new RegExp(`${n}\\{([^}]*)\\}`, "g"))) {
            for (const [, key] of label!.matchAll(/(\w+)\s*=~?/g)) if (key !== "job") expect(exported.get(n), `${n} label ${key}`).to.include(key);
          }
        }
        expect(q).to.match(/sum without \(priority, model\)/, "the pending of a process is summed over priorities and models");
        for (const [, job] of q.matchAll(/job="([^"]+)"/g)) expect(promConfig).to.contain(`job_name: ${job}`);
        // Every model named is one the scaled worker registers.
        const models = new Set([...q.matchAll(/model=~?"([^"]+)"/g)].flatMap(([, m]) => m!.split("|")));
        const target = (so.spec!["scaleTargetRef"] as { name: string }).name;
        for (const m of models) expect(workerArgs(target), `${target} serves ${m}`).to.match(new RegExp(`${m}@`));
      }
    }
    expect(checked).to.equal(2);
  });

  it("reads the lag of each priority's consumer, as the pipeline names it, from the NATS monitoring port", () => {
    const so = scaledObjects().find((d) => d.metadata?.name === "sluice-pipeline")!;
    const triggers = triggersOf(so);
    expect(triggers.map((t) => t.type)).to.deep.equal(config.pipeline.priorities.map(() => "nats-jetstream"));
    expect(triggers.map((t) => t.metadata["consumer"])).to.deep.equal(config.pipeline.priorities.map((p) => durableName(config.consumer, p)));
    const natsConf = (named(base, "ConfigMap", "nats-config")!["data"] as Record<string, string>)["nats.conf"]!;
    const monitorPort = Number(/^\s*http:\s*[\d.]+:(\d+)\s*$/m.exec(natsConf)?.[1]);
    expect(monitorPort, "monitoring enabled in nats.conf").to.equal(8222);
    for (const t of triggers) {
      const m = t.metadata;
      expect(m["stream"]).to.equal(STREAM_REQUESTS);
      expect(Number(m["lagThreshold"])).to.be.greaterThan(config.pipeline.maxInFlight);
      // No accounts in nats.conf: the global account.
      expect(natsConf).to.not.match(/^\s*accounts\s*[:{]/m);
      expect(m["account"]).to.equal("$G");
      // The headless Service: the scaler reaches the consumer's leader at <server>.<host>.
      const [host, port] = m["natsServerMonitoringEndpoint"]!.split(":");
      expect(host).to.equal(`nats-headless.${scaling.k["namespace"] as string}.svc.cluster.local`);
      const svc = named(base, "Service", "nats-headless")!;
      expect(svc.spec!["clusterIP"]).to.equal("None");
      expect((svc.spec!["ports"] as Array<{ port: number }>).map((p) => p.port)).to.include(Number(port));
      expect(Number(port)).to.equal(monitorPort);
    }
  });
});
