"""The model layout of KServe's TorchServe runtime (InferenceService predictor `modelFormat: pytorch`, protocol
v1), published next to the local layout:

    s3://BUCKET/PREFIX/<name>/<version>/kserve/config/config.properties
    s3://BUCKET/PREFIX/<name>/<version>/kserve/model-store/<name>.mar

The runtime mounts that prefix (storageUri) at /mnt/models and starts
`torchserve --model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties`; its KServe
wrapper listens on 8080 (/v1/models/<name>:predict) and forwards to TorchServe's inference address. The runtime
turns requests into instances through TorchServe's kserve envelope, which reads only the first request of a
batch: the archive published here is built with batchSize 1 (handler/model-config.kserve.yaml).

The config keeps this project's limits (queue, body size, timeouts, JVM) from config.properties and changes what
the cluster needs: TorchServe's own ports on loopback (only the wrapper in the same container talks to them),
metrics on the pod address for Prometheus (NetworkPolicy keeps it in the namespace), model loading from the
snapshot, no model API, no token keys (the pod's network namespace and the wrapper are the boundary), and
enable_envvars_config so that KServe's TS_SERVICE_ENVELOPE applies.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from stack.gate import GateLimits
from stack.settings import REPO, TORCHSERVE_CONFIG, torchserve_config

MODEL_CONFIG = REPO / "handler" / "model-config.kserve.yaml"
MOUNT = "/mnt/models"  # where the runtime's storage initializer puts the storageUri's files
INFERENCE_PORT = 8085  # TorchServe behind the wrapper (the wrapper itself is on 8080 and, for gRPC, 8081)
METRICS_PORT = 8082  # Prometheus metrics, the only TorchServe port on the pod address
GRPC_PORTS = (7075, 7076)  # TorchServe's gRPC cannot be switched off in 0.12: loopback, off the wrapper's ports
KEPT = ("job_queue_size", "default_response_timeout", "max_response_size",
        "number_of_netty_threads", "netty_client_threads", "metrics_mode", "vmargs", "install_py_dep_per_model")


def kserve_config(name: str, version: str, mar_name: str, base: Path = TORCHSERVE_CONFIG,
                  model_config: Path = MODEL_CONFIG) -> str:
    """config/config.properties of the layout: ours, adapted to the runtime (see the module's docstring)."""
    ours = {k: torchserve_config(k, base) for k in KEPT}
    batching = yaml.safe_load(model_config.read_text())
    snapshot = {"name": "startup.cfg", "modelCount": 1, "models": {name: {version: {
        "defaultVersion": True, "marName": mar_name, "minWorkers": batching["minWorkers"],
        "maxWorkers": batching["maxWorkers"], "batchSize": batching["batchSize"],
        "maxBatchDelay": batching["maxBatchDelay"], "responseTimeout": batching["responseTimeout"]}}}}
    settings = {
        **{k: v for k, v in ours.items() if v is not None},
        # v1 carries the image as base64 in JSON: the same largest image needs 4/3 of the bytes, plus the envelope.
        "max_request_size": str(GateLimits().max_body * 4 // 3 + 4096),
        "inference_address": f"http://127.0.0.1:{INFERENCE_PORT}",
        # The wrapper itself takes 8080 (REST) and 8081 (gRPC): TorchServe's management shares the loopback
        # inference port, as in KServe's own samples, and its gRPC ports move off their 7070/7071 defaults.
        "management_address": f"http://127.0.0.1:{INFERENCE_PORT}",
        "metrics_address": f"http://0.0.0.0:{METRICS_PORT}",
        "grpc_inference_address": "127.0.0.1", "grpc_management_address": "127.0.0.1",
        "grpc_inference_port": str(GRPC_PORTS[0]), "grpc_management_port": str(GRPC_PORTS[1]),
        "enable_model_api": "false",
        "disable_token_authorization": "true",
        "enable_envvars_config": "true",
        "model_store": f"{MOUNT}/model-store",
        "model_snapshot": json.dumps(snapshot, separators=(",", ":")),
    }
    lines = ["# Written by python -m ops publish --kserve (ops/kserve.py) for KServe's TorchServe runtime."]
    return "\n".join(lines + [f"{k}={v}" for k, v in settings.items()]) + "\n"
