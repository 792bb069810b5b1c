#!/usr/bin/env bash
# Starts vLLM's OpenAI-compatible server on loopback, waits until it answers GET /health, then
# starts a sluice worker in front of it that registers <model>@<version> in the NATS registry.
# If either process exits, the other is stopped and the container exits with that status, so the
# container restarts as one unit. SIGTERM stops the sluice worker first (it deregisters and
# finishes the calls it holds), then vLLM.
#
# Environment:
#   VLLM_MODEL              required  what vLLM loads: a Hugging Face id or a local path
#   SLUICE_MODEL            required  the sluice model slug this worker serves (a-z 0-9 _ -)
#   NATS_URL                required  NATS servers, comma-separated
#   SLUICE_VERSION          v1        the model version it registers
#   VLLM_SERVED_MODEL_NAME  $SLUICE_MODEL  the name vLLM serves the model under
#   VLLM_PORT               8000      vLLM's port on 127.0.0.1
#   VLLM_ARGS                         more `vllm serve` flags, split on spaces
#                                     (e.g. "--max-model-len 4096 --gpu-memory-utilization 0.9")
#   VLLM_STARTUP_TIMEOUT_S  1800      longest wait for /health (weights may be downloading)
#   WORKER_PORT             50051     the sluice worker's gRPC port (all interfaces)
#   WORKER_ID               hostname  worker id in the registry (A-Z a-z 0-9 _ -)
#   SLUICE_ADVERTISE        <container address>:$WORKER_PORT  where the pipeline reaches this worker
#   SLUICE_CAPACITY                   items in flight the worker advertises (default: the engine's)
#   SLUICE_WORKER_ARGS                more `sluice worker` flags, split on spaces (e.g. --engine-chat)
#   OTEL_EXPORTER_OTLP_ENDPOINT etc.  tracing of the sluice worker (service sluice-worker)
set -euo pipefail

: "${VLLM_MODEL:?set VLLM_MODEL to the model vLLM loads (a Hugging Face id or a local path)}"
: "${SLUICE_MODEL:?set SLUICE_MODEL to the sluice model slug this worker serves}"
: "${NATS_URL:?set NATS_URL to the NATS servers (comma-separated)}"
SLUICE_VERSION="${SLUICE_VERSION:-v1}"
VLLM_SERVED_MODEL_NAME="${VLLM_SERVED_MODEL_NAME:-$SLUICE_MODEL}"
VLLM_PORT="${VLLM_PORT:-8000}"
VLLM_STARTUP_TIMEOUT_S="${VLLM_STARTUP_TIMEOUT_S:-1800}"
WORKER_PORT="${WORKER_PORT:-50051}"
WORKER_ID="${WORKER_ID:-$(hostname)}"
WORKER_ID="${WORKER_ID//[^A-Za-z0-9_-]/-}"
if [[ -z "${SLUICE_ADVERTISE:-}" ]]; then
  # The container's own address: other containers reach it there, loopback they would not.
  SLUICE_ADVERTISE="$(hostname -i | awk '{print $1}'):${WORKER_PORT}"
fi

log() { echo "sluice-vllm-entrypoint: $*" >&2; }

# 0 when GET <url> answers 2xx within 2 s.
http_ok() {
  node -e 'fetch(process.argv[1], { signal: AbortSignal.timeout(2000) }).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))' "$1"
}

vllm_pid=""
worker_pid=""
stop() {
  trap - TERM INT
  if [[ -n "$worker_pid" ]] && kill -0 "$worker_pid" 2>/dev/null; then
    kill -TERM "$worker_pid" 2>/dev/null || true
    wait "$worker_pid" 2>/dev/null || true
  fi
  if [[ -n "$vllm_pid" ]] && kill -0 "$vllm_pid" 2>/dev/null; then
    kill -TERM "$vllm_pid" 2>/dev/null || true
    wait "$vllm_pid" 2>/dev/null || true
  fi
}
trap 'log "stopping"; stop; exit 143' TERM INT

read -r -a vllm_extra <<<"${VLLM_ARGS:-}"
log "starting vLLM: ${VLLM_MODEL} as '${VLLM_SERVED_MODEL_NAME}' on 127.0.0.1:${VLLM_PORT}"
vllm serve "$VLLM_MODEL" \
  --host 127.0.0.1 --port "$VLLM_PORT" \
  --served-model-name "$VLLM_SERVED_MODEL_NAME" \
  "${vllm_extra[@]}" &
vllm_pid=$!

deadline=$((SECONDS + VLLM_STARTUP_TIMEOUT_S))
until http_ok "http://127.0.0.1:${VLLM_PORT}/health"; do
  if ! kill -0 "$vllm_pid" 2>/dev/null; then
    set +e
    wait "$vllm_pid"
    status=$?
    log "vLLM exited with status ${status} before it was ready"
    exit "$status"
  fi
  if ((SECONDS >= deadline)); then
    log "vLLM not ready after ${VLLM_STARTUP_TIMEOUT_S}s; giving up"
    stop
    exit 1
  fi
  sleep 2
done
log "vLLM is ready"

read -r -a worker_extra <<<"${SLUICE_WORKER_ARGS:-}"
capacity=()
if [[ -n "${SLUICE_CAPACITY:-}" ]]; then capacity=(--capacity "$SLUICE_CAPACITY"); fi
log "starting the sluice worker ${WORKER_ID}: ${SLUICE_MODEL}@${SLUICE_VERSION}, advertised at ${SLUICE_ADVERTISE}"
sluice worker \
  --engine vllm \
  --engine-url "http://127.0.0.1:${VLLM_PORT}" \
  --engine-model "$VLLM_SERVED_MODEL_NAME" \
  --host 0.0.0.0 --port "$WORKER_PORT" \
  --id "$WORKER_ID" \
  --register "${SLUICE_MODEL}@${SLUICE_VERSION}" \
  --advertise "$SLUICE_ADVERTISE" \
  "${capacity[@]}" \
  "${worker_extra[@]}" &
worker_pid=$!

# Whichever exits first takes the other with it.
set +e
wait -n "$vllm_pid" "$worker_pid"
status=$?
set -e
log "a process exited with status ${status}; stopping the other"
stop
exit "$status"
