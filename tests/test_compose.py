"""docker-compose.yml and the Dockerfiles checked as data (fast tier): services, health, volumes, exposure, secrets,
base images. tests/test_compose_up.py brings the file up in a real Docker engine."""
from __future__ import annotations

import pytest

import re
import subprocess
from pathlib import Path

import yaml

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.I)
APP_DOCKERFILES = ("torchserve.Dockerfile", "gate.Dockerfile", "site.Dockerfile")


def default(value: str) -> str:
    """'${VAR:-default}' -> 'default': what compose uses when the variable is not set."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_the_services_are_there():
    assert {"torchserve", "postgres", "logger", "gate", "site", "minio", "minio-init"} <= set(SERVICES)


def test_long_running_services_have_healthchecks_and_dependencies_wait_for_health():
    for name in ("torchserve", "postgres", "logger", "site", "minio"):
        assert SERVICES[name].get("healthcheck", {}).get("test"), name
    assert "HEALTHCHECK" in (REPO / "docker" / "gate.Dockerfile").read_text()
    assert SERVICES["logger"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["site"]["depends_on"]["gate"]["condition"] == "service_healthy"
    assert SERVICES["gate"]["depends_on"]["torchserve"]["condition"] == "service_healthy"
    assert SERVICES["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    # readiness, not /ping: the torchserve check asks for READY workers
    assert SERVICES["torchserve"]["healthcheck"]["test"][-1] == "ready"


def test_only_the_site_publishes_a_port():
    published = {name for name, svc in SERVICES.items() if svc.get("ports")}
    assert published == {"site"}
    assert all("expose" not in svc or name == "site" for name, svc in SERVICES.items())


def test_volumes_are_named_and_the_spool_is_shared():
    named = set(COMPOSE["volumes"])
    for name, svc in SERVICES.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            assert source in named, f"{name} bind-mounts {source}: no source mounts in deployment"
    assert "spool:/spool" in SERVICES["torchserve"]["volumes"] and "spool:/spool" in SERVICES["logger"]["volumes"]
    assert "pgdata:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]


def test_no_secret_value_is_committed():
    for name, svc in SERVICES.items():
        env = svc.get("environment", {})
        for key, value in env.items():
            if value in ("true", "false"):  # a switch such as SKIN_TOKEN_AUTH, not a secret
                continue
            if SECRET_KEY.search(key) or (isinstance(value, str) and "@" in value and "://" in value):
                assert "${" in str(value), f"{name}.{key} holds a literal secret"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert ".env" not in tracked
    example = (REPO / ".env.example").read_text()
    assert all(line.split("=", 1)[1] == "" for line in example.splitlines()
               if line and not line.startswith("#") and SECRET_KEY.search(line.split("=")[0]))


def test_pinned_images_and_no_debug():
    assert re.fullmatch(r"postgres:\d+(-[a-z]+)?", default(SERVICES["postgres"]["image"]))
    for svc in SERVICES.values():
        if "image" in svc and "build" not in svc:
            assert not default(svc["image"]).endswith(":latest") and ":" in default(svc["image"])
    assert "DEBUG" not in (REPO / "docker-compose.yml").read_text().upper().replace("NO DEBUG", "")
    assert COMPOSE["networks"]["backend"]["internal"] is True


def test_dockerfiles_exist_and_run_as_non_root():
    ts = (REPO / "docker" / "torchserve.Dockerfile").read_text()
    assert "USER skin" in ts and "-r /tmp/requirements-runtime.txt" in ts and "HEALTHCHECK" in ts
    assert (REPO / "docker" / "site.Dockerfile").exists() and (REPO / "docker" / "nginx.conf").exists()
    gate = (REPO / "docker" / "gate.Dockerfile").read_text()
    assert "USER skin" in gate and "stack.gate" in gate and "X-Real-IP" in gate
    assert "backend" in SERVICES["gate"]["networks"] and not SERVICES["gate"].get("ports")


def _image_files(dockerfile: str, into: Path) -> None:
    """The files a Dockerfile COPYs from the repository into its working folder (build stages aside)."""
    import shutil

    for line in (REPO / "docker" / dockerfile).read_text().splitlines():
        parts = line.split()
        if not parts or parts[0] != "COPY" or any(p.startswith("--from") for p in parts):
            continue
        *sources, dest = parts[1:]
        for src in sources:
            path = REPO / src
            if path.is_dir():
                shutil.copytree(path, into / dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target = into / dest / path.name if dest.endswith("/") or dest in (".", "./") else into / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)


def test_the_gate_and_page_images_carry_every_file_they_run(tmp_path):
    """Only what each image copies, and its command still runs (the Python packages come from this venv)."""
    import sys

    gate = tmp_path / "gate"
    _image_files("gate.Dockerfile", gate)
    r = subprocess.run([sys.executable, "-m", "stack.gate", "--help"], cwd=gate, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    site = tmp_path / "site"
    _image_files("site.Dockerfile", site)
    r = subprocess.run([sys.executable, "-m", "stack.page", "--meta", "release/meta.json", "--out", str(tmp_path / "dist")],
                       cwd=site, capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "dist" / "index.html").exists(), r.stderr[-1500:]
    served = tmp_path / "torchserve"
    _image_files("torchserve.Dockerfile", served)
    r = subprocess.run(["./archive.sh", "--out", str(tmp_path / "store")], cwd=served, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHON": sys.executable})
    assert r.returncode == 0 and (tmp_path / "store" / "skin-lesion.mar").exists(), r.stderr[-1500:]


def test_base_images_are_build_arguments_whose_defaults_are_the_public_images():
    public = {"SKIN_PYTHON_IMAGE": "python:3.11-slim-bookworm", "SKIN_PIP_IMAGE": "python:3.11-slim-bookworm",
              "SKIN_NGINX_IMAGE": "nginx:1.27-alpine"}
    for name in APP_DOCKERFILES:
        text = (REPO / "docker" / name).read_text()
        froms = re.findall(r"^FROM (\S+)", text, re.M)
        assert froms and all(re.fullmatch(r"\$\{SKIN_[A-Z]+_IMAGE\}", f) for f in froms), (name, froms)
        for arg, value in re.findall(r"^ARG (SKIN_[A-Z]+_IMAGE)=(\S+)", text, re.M):
            assert public[arg] == value, (name, arg, value)
    for service in ("torchserve", "logger", "gate", "site"):
        assert {k: default(v) for k, v in SERVICES[service]["build"]["args"].items()} == public, service
    assert default(SERVICES["minio"]["image"]).startswith("minio/minio:")
    assert default(SERVICES["minio-init"]["image"]).startswith("minio/mc:")


def test_the_app_images_end_as_a_non_root_user():
    for name in ("torchserve.Dockerfile", "gate.Dockerfile"):
        users = re.findall(r"^USER (\S+)", (REPO / "docker" / name).read_text(), re.M)
        assert users and users[-1] not in ("root", "0"), (name, users)


def test_ports_are_published_on_loopback_by_default_and_the_file_suits_compose_v1():
    for svc in SERVICES.values():
        for port in svc.get("ports", []):
            assert default(port).startswith("127.0.0.1:"), port
    assert "name" not in COMPOSE  # Compose v1.29 refuses a top-level name (v2 only); the project name is -p / .env


def test_the_runtime_requirements_are_release_pins_without_test_packages():
    def pins(path):
        return {line.split("==")[0].lower(): line for line in (REPO / path).read_text().splitlines()
                if line and not line.startswith("#")}

    runtime, release = pins("requirements-runtime.txt"), pins("requirements.txt")
    assert runtime and all(release.get(name) == line for name, line in runtime.items()), "pins disagree"
    for test_only in ("pytest", "selenium", "moto[server]", "grpcio", "kubernetes-validate", "scikit-learn"):
        assert test_only not in runtime


def _let_through() -> list[str]:
    """The paths .dockerignore lets into a build context: it must ignore everything ('*') and name the rest."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == "*", ".dockerignore must start by ignoring everything"
    return [line[1:].rstrip("/") for line in lines[1:] if line.startswith("!")]


def test_build_contexts_carry_every_copied_file_and_not_the_venv():
    """Every Dockerfile built from the repository's root (compose's services, and the local base images of
    docker/offline-images.sh that COPY from it) finds each COPY source in the context .dockerignore lets through,
    and the context leaves out the virtual environment, git's objects, runs and the stack's state (a build sent
    all of them to the daemon, several GB, once per image). The compose tier builds them for real."""
    rooted = {s["build"]["dockerfile"] for s in SERVICES.values() if s.get("build", {}).get("context") == "."}
    assert rooted == {f"docker/{name}" for name in APP_DOCKERFILES}
    offline = (REPO / "docker" / "offline-images.sh").read_text()
    assert '-f "docker/local/${image%%:*}.Dockerfile" .' in offline
    rooted |= {"docker/local/postgres.Dockerfile", "docker/local/nginx.Dockerfile", "docker/local/s3.Dockerfile"}
    allowed = _let_through()

    def sent(path: str) -> bool:
        return any(path.rstrip("/") == a or path.startswith(a + "/") for a in allowed)

    for dockerfile in sorted(rooted):
        for line in (REPO / dockerfile).read_text().splitlines():
            parts = line.split()
            if parts and parts[0] == "COPY" and not any(p.startswith("--from") for p in parts):
                for src in parts[1:-1]:
                    assert (REPO / src).exists() and sent(src), f"{dockerfile}: {src} is not in the build context"
    for heavy in (".venv", ".git", ".stack", "runs", "model_store", "tests", "training", "studies"):
        assert not sent(heavy), f"{heavy} would be sent to the Docker daemon"
