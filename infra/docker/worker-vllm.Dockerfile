# syntax=docker/dockerfile:1
#
# A GPU worker: vLLM's OpenAI-compatible server and a sluice worker in one container.
# vLLM listens on loopback only (127.0.0.1:8000); the sluice worker answers gRPC on 50051, talks
# to vLLM over loopback and registers itself in the NATS registry (bucket infer_workers).
#
#   docker build -f infra/docker/worker-vllm.Dockerfile -t sluice-worker-vllm:local .
#   docker run --gpus all --shm-size 8g \
#       -e VLLM_MODEL=Qwen/Qwen2.5-0.5B-Instruct -e SLUICE_MODEL=qwen2-5-0-5b \
#       -e NATS_URL=nats://nats-1:4222 -e SLUICE_ADVERTISE=worker-vllm:50051 \
#       -v hf-cache:/root/.cache/huggingface sluice-worker-vllm:local
#
# The entrypoint (worker-vllm-entrypoint.sh) documents every variable. In Kubernetes, prefer two
# containers in one pod (the stock vLLM image and the sluice image; see
# infra/k8s/gpu/worker-vllm.yaml) so that each is probed, limited and restarted on its own.
#
# The vLLM adapter (worker/engines/vllm.ts) is written against vLLM 0.10.1 and later; a newer image is
# fine as long as its OpenAI server keeps /v1/completions and /health.

ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0
ARG NODE_IMAGE=node:20-bookworm-slim

# ---- compile: TypeScript to JavaScript (dist/), with the dev dependencies of the lock file --
FROM ${NODE_IMAGE} AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY scripts/build.mjs ./scripts/build.mjs
COPY operators ./operators
COPY pipeline ./pipeline
COPY proto ./proto
COPY worker ./worker
RUN node scripts/build.mjs

# ---- the sluice application: compiled JavaScript, production dependencies only --------------
FROM ${NODE_IMAGE} AS app
WORKDIR /opt/sluice
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund \
 && npm cache clean --force
COPY bin ./bin
COPY --from=build /src/dist ./dist

# ---- vLLM with Node 20 added ----------------------------------------------------------------
FROM ${VLLM_IMAGE}
# Node's official Linux build needs only glibc >= 2.28 and libstdc++, both in vLLM's Ubuntu
# base; npm is not needed at run time, so the one binary is enough.
COPY --from=app /usr/local/bin/node /usr/local/bin/node
COPY --from=app /opt/sluice /opt/sluice
COPY infra/docker/worker-vllm-entrypoint.sh /usr/local/bin/sluice-vllm-entrypoint
RUN chmod 0755 /opt/sluice/bin/sluice.js /usr/local/bin/sluice-vllm-entrypoint \
 && ln -s /opt/sluice/bin/sluice.js /usr/local/bin/sluice \
 && sluice help >/dev/null

ENV NODE_ENV=production
# 50051: the sluice worker (gRPC). vLLM's 8000 stays on loopback and is not exposed.
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/sluice-vllm-entrypoint"]
