# syntax=docker/dockerfile:1
#
# A GPU worker: a DeepSpeed-MII deployment with its RESTful gateway on loopback
# (127.0.0.1:28080) and a sluice worker in front of it, in one container.
#
#   docker build -f infra/docker/worker-deepspeed-mii.Dockerfile -t sluice-worker-mii:local .
#   docker run --gpus all --shm-size 8g \
#       -e MII_MODEL=mistralai/Mistral-7B-Instruct-v0.2 -e SLUICE_MODEL=mistral-7b \
#       -e NATS_URL=nats://nats-1:4222 -e SLUICE_ADVERTISE=worker-mii:50051 \
#       -v hf-cache:/root/.cache/huggingface sluice-worker-mii:local
#
# deepspeed-mii-launcher.py documents every variable. The MII adapter (worker/engines/deepspeed-mii.ts)
# is written against DeepSpeed-MII 0.3.x (the RESTful gateway's POST /mii/<deployment> and GET
# /healthz); its FastGen kernels need an NVIDIA GPU of compute capability 8.0 or newer.

ARG PYTORCH_IMAGE=pytorch/pytorch:2.4.1-cuda12.1-cudnn9-devel
ARG NODE_IMAGE=node:20-bookworm-slim
ARG DEEPSPEED_MII_VERSION=0.3.3

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

# ---- PyTorch + DeepSpeed-MII, with Node 20 added ---------------------------------------------
FROM ${PYTORCH_IMAGE}
ARG DEEPSPEED_MII_VERSION
# The devel image carries nvcc: DeepSpeed compiles some of its ops on first use.
RUN pip install --no-cache-dir "deepspeed-mii==${DEEPSPEED_MII_VERSION}"

COPY --from=app /usr/local/bin/node /usr/local/bin/node
COPY --from=app /opt/sluice /opt/sluice
COPY infra/docker/deepspeed-mii-launcher.py /usr/local/bin/sluice-mii-launcher
RUN chmod 0755 /opt/sluice/bin/sluice.js /usr/local/bin/sluice-mii-launcher \
 && ln -s /opt/sluice/bin/sluice.js /usr/local/bin/sluice \
 && sluice help >/dev/null

ENV NODE_ENV=production PYTHONUNBUFFERED=1
# 50051: the sluice worker (gRPC). MII's gateway (28080) and its gRPC ports stay on loopback.
EXPOSE 50051
ENTRYPOINT ["python", "/usr/local/bin/sluice-mii-launcher"]
