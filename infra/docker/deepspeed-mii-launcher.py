#!/usr/bin/env python3
"""Starts a DeepSpeed-MII deployment and a sluice worker in front of it.

1. ``mii.serve(MII_MODEL, deployment_name=..., enable_restful_api=True,
   restful_api_port=28080)`` starts MII's model server and its RESTful gateway on loopback.
2. Once the gateway answers ``GET /healthz``, ``sluice worker --engine deepspeed-mii
   --engine-url http://127.0.0.1:28080 --engine-model <deployment>`` starts and registers
   ``<SLUICE_MODEL>@<SLUICE_VERSION>`` in the NATS registry.
3. SIGTERM (or the worker exiting) stops the worker first, so it deregisters and finishes the
   calls it holds, then terminates the MII deployment; the process exits with the worker's
   status.

Environment:
  MII_MODEL               required  what MII loads: a Hugging Face id or a local path
  SLUICE_MODEL            required  the sluice model slug this worker serves (a-z 0-9 _ -)
  NATS_URL                required  NATS servers, comma-separated
  SLUICE_VERSION          v1        the model version it registers
  MII_DEPLOYMENT          $SLUICE_MODEL  MII's deployment_name (the gateway's /mii/<name>)
  MII_RESTFUL_PORT        28080     the gateway's port on loopback
  MII_TENSOR_PARALLEL     1         GPUs one model replica spans
  MII_STARTUP_TIMEOUT_S   1800      longest wait for the gateway's /healthz
  WORKER_PORT             50051     the sluice worker's gRPC port (all interfaces)
  WORKER_ID               hostname  worker id in the registry (A-Z a-z 0-9 _ -)
  SLUICE_ADVERTISE        <container address>:$WORKER_PORT  where the pipeline reaches this worker
  SLUICE_CAPACITY                   items in flight the worker advertises (default: the engine's, 32)
  OTEL_EXPORTER_OTLP_ENDPOINT etc.  tracing of the sluice worker (service sluice-worker)
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def log(msg: str) -> None:
    print(f"sluice-mii-launcher: {msg}", file=sys.stderr, flush=True)


def required(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        log(f"set {name}")
        sys.exit(2)
    return value


def own_address() -> str:
    """The container's address: other containers reach it there, loopback they would not."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    model_path = required("MII_MODEL")
    model = required("SLUICE_MODEL")
    required("NATS_URL")  # read by the sluice worker itself
    version = os.environ.get("SLUICE_VERSION", "v1")
    deployment = os.environ.get("MII_DEPLOYMENT", model)
    port = int(os.environ.get("MII_RESTFUL_PORT", "28080"))
    tensor_parallel = int(os.environ.get("MII_TENSOR_PARALLEL", "1"))
    timeout_s = float(os.environ.get("MII_STARTUP_TIMEOUT_S", "1800"))
    worker_port = os.environ.get("WORKER_PORT", "50051")
    worker_id = re.sub(r"[^A-Za-z0-9_-]", "-", os.environ.get("WORKER_ID") or socket.gethostname())
    advertise = os.environ.get("SLUICE_ADVERTISE") or f"{own_address()}:{worker_port}"

    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    import mii  # imported late: it is slow, and a missing variable should fail fast

    client = None
    worker = None
    status = 1
    try:
        log(f"starting MII deployment '{deployment}' of {model_path} (tensor_parallel={tensor_parallel})")
        client = mii.serve(
            model_path,
            deployment_name=deployment,
            tensor_parallel=tensor_parallel,
            enable_restful_api=True,
            restful_api_port=port,
        )
        health = f"http://127.0.0.1:{port}/healthz"
        deadline = time.monotonic() + timeout_s
        while not http_ok(health):
            if time.monotonic() >= deadline:
                log(f"the RESTful gateway is not ready after {timeout_s:.0f}s; giving up")
                return 1
            time.sleep(2)
        log("MII is ready")

        cmd = [
            "sluice", "worker",
            "--engine", "deepspeed-mii",
            "--engine-url", f"http://127.0.0.1:{port}",
            "--engine-model", deployment,
            "--host", "0.0.0.0", "--port", worker_port,
            "--id", worker_id,
            "--register", f"{model}@{version}",
            "--advertise", advertise,
        ]
        if os.environ.get("SLUICE_CAPACITY"):
            cmd += ["--capacity", os.environ["SLUICE_CAPACITY"]]
        log(f"starting the sluice worker {worker_id}: {model}@{version}, advertised at {advertise}")
        worker = subprocess.Popen(cmd)
        status = worker.wait()
        log(f"the sluice worker exited with status {status}")
        return status
    except KeyboardInterrupt:
        log("stopping")
        return 143 if stopping else 130
    finally:
        # A second signal must not cut the clean-up short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # The worker first: it deregisters and finishes what it holds while MII still answers.
        if worker is not None and worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        if client is not None:
            try:
                client.terminate_server()
            except Exception as err:  # the deployment may already be gone
                log(f"terminating the MII deployment: {err}")


if __name__ == "__main__":
    sys.exit(main())
