"""deploy/: every Kubernetes manifest validated against Kubernetes' own schemas (kubernetes-validate, strict: an
unknown or misspelt field fails), the InferenceService's pod parts validated as a Pod, and the rules the
scale-out promises: the model served is the committed release at the storageUri ops publishes, management and
metrics never leave the namespace, the audit sidecar shares the handler's spool, no secret is committed.
No cluster runs here: what a cluster would add (admission, KServe's own webhook) is not checked."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from ops.store import ArchiveStore

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.30"  # the oldest Kubernetes still supported upstream when this was written


def documents() -> list[tuple[Path, dict]]:
    out = []
    for f in sorted(DEPLOY.rglob("*.yaml")):
        if f.name != "kustomization.yaml":
            out += [(f, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def inference_service() -> dict:
    (doc,) = [d for _, d in documents() if d["kind"] == "InferenceService"]
    return doc


@pytest.mark.parametrize("path,doc", [(f, d) for f, d in documents() if d["kind"] != "InferenceService"],
                         ids=lambda v: v.name if isinstance(v, Path) else v.get("metadata", {}).get("name"))
def test_manifest_is_valid_kubernetes(path, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validation_catches_a_misspelt_field():
    (doc,) = [d for _, d in documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "gate"]
    doc = json.loads(json.dumps(doc))
    doc["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_inference_service_pod_parts_are_a_valid_pod():
    """KServe inlines a PodSpec into the predictor and a Container into the model: built into a Pod, they must
    pass Kubernetes' schema like any other pod."""
    predictor = dict(inference_service()["spec"]["predictor"])
    model = predictor.pop("model")
    extension = ("minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "canaryTrafficPercent", "timeout",
                 "containerConcurrency", "logger", "batcher", "labels", "annotations", "deploymentStrategy")
    # Whatever is not one of KServe's own fields must be a PodSpec field: the strict Pod validation below says so.
    assert set(model) >= {"modelFormat", "protocolVersion", "storageUri"}
    container = {k: v for k, v in model.items() if k not in ("modelFormat", "protocolVersion", "storageUri", "runtime")}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
           "spec": {**{k: v for k, v in predictor.items() if k not in extension},
                    "containers": [{"name": "kserve-container", "image": "kserve-torchserve", **container},
                                   *predictor["containers"]]}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert model["modelFormat"] == {"name": "pytorch"} and model["protocolVersion"] == "v1"
    assert all(c["name"] != "kserve-container" for c in predictor["containers"]), "that name marks a custom predictor"


def test_the_model_served_is_the_committed_release_at_the_published_layout():
    meta = json.loads((REPO / "release" / "meta.json").read_text())
    isvc = inference_service()
    assert isvc["metadata"]["name"] == meta["name"]
    uri = ArchiveStore("models", "models").storage_uri(meta["name"], meta["version"])
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == uri, "deploy/kserve serves another version"


def test_the_audit_sidecar_shares_the_handlers_spool_per_pod():
    predictor = inference_service()["spec"]["predictor"]
    model, (logger,) = predictor["model"], predictor["containers"]
    spool = {e["name"]: e["value"] for e in model["env"]}["SKIN_SPOOL_DIR"]
    assert {e["name"]: e.get("value") for e in logger["env"]}["SKIN_SPOOL_DIR"] == spool
    mounts = lambda c: {m["mountPath"]: m["name"] for m in c["volumeMounts"]}  # noqa: E731
    assert mounts(model)[spool] == mounts(logger)[spool]
    volume = {v["name"]: v for v in predictor["volumes"]}[mounts(model)[spool]]
    assert "emptyDir" in volume, "one spool per pod: a shared volume would mix two replicas' files"
    assert logger["args"][-2:] == ["logger", "run"]


def test_management_and_metrics_stay_in_the_namespace():
    from ops.kserve import GRPC_PORTS, INFERENCE_PORT, METRICS_PORT

    private = {INFERENCE_PORT, METRICS_PORT, *GRPC_PORTS, 8081, 7070, 7071}  # TorchServe's own and the defaults
    docs = [d for _, d in documents()]
    for d in docs:
        if d["kind"] == "Service":
            ports = {p.get("targetPort") for p in d["spec"]["ports"]} | {p["port"] for p in d["spec"]["ports"]}
            assert not ports & private, d["metadata"]["name"]
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", "only the Ingress is public"
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"], "no default deny"
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            ports = {x["port"] for x in rule.get("ports", [])}
            if ports & private:
                assert ports <= {METRICS_PORT} and all(set(peer) == {"podSelector"} for peer in rule["from"]), p["metadata"]
    model = next((p for p in policies if p["spec"]["podSelector"].get("matchLabels", {}).get(
        "serving.kserve.io/inferenceservice") == inference_service()["metadata"]["name"]), None)
    assert model is not None, "no policy protects the model's pods"
    assert inference_service()["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"
    from ops.kserve import kserve_config

    config = dict(line.split("=", 1) for line in kserve_config("m", "1", "m.mar").splitlines() if "=" in line)
    assert "127.0.0.1" in config["management_address"] and "127.0.0.1" in config["inference_address"]
    wrapper = {8080, 8081}  # KServe's wrapper in the same container: REST and gRPC
    used = [int(config[k].rsplit(":", 1)[1]) for k in ("inference_address", "management_address", "metrics_address")]
    assert not wrapper & {*used, int(config["grpc_inference_port"]), int(config["grpc_management_port"])}


def test_kustomizations_name_existing_files_and_no_secret_is_committed():
    tracked = set(subprocess.run(["git", "ls-files", "deploy"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split())
    for k in DEPLOY.rglob("kustomization.yaml"):
        doc = yaml.safe_load(k.read_text())
        for resource in doc.get("resources", []):
            assert (k.parent / resource).is_file(), (k, resource)
        for gen in doc.get("secretGenerator", []):
            for env in gen.get("envs", []):
                rel = (k.parent / env).relative_to(REPO).as_posix()
                assert rel not in tracked, f"{rel} holds secrets: it must never be committed"
                ignored = subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO).returncode == 0
                assert ignored and (k.parent / f"{env}.example").is_file(), rel
    for f in DEPLOY.rglob("*"):
        if f.is_file():
            text = f.read_text()
            assert "BEGIN PRIVATE KEY" not in text and "password:" not in text.lower(), f
    for f in DEPLOY.rglob("*.example"):
        for line in f.read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                assert "change-me" in line, (f, line)
