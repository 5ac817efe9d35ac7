"""Start, wait for and stop one TorchServe process group, the same way for `./skin up`, the tests and the
benchmarks. Talking to it goes through its `api` (stack/torchserve_api.py)."""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from stack.settings import REPO, TORCHSERVE_CONFIG, Settings, torchserve_config, url
from stack.tokens import KEY_FILE, TokenFile
from stack.torchserve_api import ManagementError, TorchServeClient


class ServeError(RuntimeError):
    pass


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nothing listens on, drawn below the kernel's ephemeral range. A port from that range (what
    binding port 0 gives) may be taken by an outgoing connection, or linger in TIME_WAIT, before the server
    binds it: TorchServe's gRPC listener then fails with "Address already in use" (seen in a full test run)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randint(max(1024, low - 12000), low - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # that range is full: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_config(base: Path, out: Path, overrides: dict[str, str]) -> Path:
    """Copy config.properties, replacing (or adding) the keys in overrides."""
    lines, seen = [], set()
    for line in base.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and key in overrides:
            line, _ = f"{key}={overrides[key]}", seen.add(key)
        lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items() if k not in seen]
    out.write_text("\n".join(lines) + "\n")
    return out


class TorchServe:
    """One TorchServe process group in its own working folder (logs, pid) with its own ports."""

    def __init__(self, model_store: Path, models: dict[str, str], workdir: Path,
                 inference_port: int = Settings.inference_port, management_port: int = Settings.management_port,
                 metrics_port: int = Settings.metrics_port, inference_host: str = "127.0.0.1",
                 enable_model_api: bool = False, extra_config: dict[str, str] | None = None,
                 env: dict[str, str] | None = None, grpc_ports: tuple[int, int] | None = None,
                 token_auth: bool | None = None):
        self.model_store, self.models, self.workdir = Path(model_store), models, Path(workdir)
        self.inference_url, self.management_url = url(inference_port, inference_host), url(management_port)
        self.metrics_url = url(metrics_port)
        self.overrides = {"inference_address": f"http://{inference_host}:{inference_port}",
                          "management_address": self.management_url, "metrics_address": self.metrics_url,
                          "enable_model_api": str(enable_model_api).lower(),
                          # gRPC cannot be switched off in 0.12 (ModelServer.startAndWait starts both gRPC
                          # servers unconditionally): loopback, ports of their own so that two servers never
                          # collide on 7070/7071, and with token authorization on its interceptor refuses
                          # calls without a key like the REST APIs do.
                          "grpc_inference_address": "127.0.0.1", "grpc_management_address": "127.0.0.1",
                          "grpc_inference_port": str(grpc_ports[0] if grpc_ports else free_port()),
                          "grpc_management_port": str(grpc_ports[1] if grpc_ports else free_port()),
                          **(extra_config or {})}
        if token_auth is not None:
            self.overrides["disable_token_authorization"] = str(not token_auth).lower()
        disabled = self.overrides.get("disable_token_authorization", torchserve_config("disable_token_authorization"))
        # TorchServe writes the key file into the folder it is started in (its working directory).
        self.tokens = None if disabled == "true" else TokenFile(self.workdir / KEY_FILE)
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.api = TorchServeClient(self.management_url, self.inference_url, self.tokens)

    def start(self) -> "TorchServe":
        exe = Path(sys.executable).with_name("torchserve")
        if not exe.exists():
            raise ServeError(f"{exe} not found: install requirements.txt (./skin up does it)")
        if not shutil.which("java") and not os.environ.get("JAVA_HOME"):
            raise ServeError("TorchServe needs Java 11+ (java on PATH or JAVA_HOME)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        config = render_config(TORCHSERVE_CONFIG, self.workdir / "config.properties", self.overrides)
        if self.tokens:  # a key file left by an earlier run would hand out dead keys until TorchServe rewrites it
            self.tokens.path.unlink(missing_ok=True)
            self.tokens.reload()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LOG_LOCATION": str(logs),
               "METRICS_LOCATION": str(logs), "TEMP": str(self.workdir), "TMPDIR": str(self.workdir),
               "PYTHONUNBUFFERED": "1", **self.env}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        cmd = [str(exe), "--start", "--foreground", "--ncs", "--model-store", str(self.model_store),
               "--ts-config", str(config), "--log-config", str(REPO / "log4j2.xml")]
        if self.models:
            cmd += ["--models", *[f"{n}={f}" for n, f in self.models.items()]]
        # A session of its own: stop() signals the whole group, so no worker outlives the frontend.
        self.log = open(logs / "torchserve.out", "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def log_tail(self, n: int = 40) -> str:
        lines = []
        for name in ("torchserve.out", "ts_log.log", "model_log.log"):
            p = self.workdir / "logs" / name
            if p.exists():
                lines += [f"--- {name}"] + p.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)

    def exit_reason(self) -> str:
        """Why the JVM ended, in one line, when its output says (an OutOfMemoryError, an exception)."""
        out = self.workdir / "logs" / "torchserve.out"
        lines = out.read_text(errors="replace").splitlines()[-200:] if out.exists() else []
        hits = [line for line in lines if re.search(r"OutOfMemoryError|Terminating|Exception|Error:", line)]
        return f"exit code {self.proc.returncode if self.proc else '?'}" + (f"; {hits[-1].strip()[:200]}" if hits else "")

    def headers(self, kind: str = "inference") -> dict[str, str]:
        """The Authorization header for the inference or management API ({} with token authorization off)."""
        return self.api.headers(kind)

    def workers(self, model: str) -> list[dict]:
        return self.api.workers(model)

    def wait_ready(self, timeout: float = 180.0, min_workers: int = 1) -> float:
        """Seconds until every model has READY workers."""
        try:
            return self.api.wait_ready(list(self.models), workers=min_workers, timeout=timeout,
                                       alive=lambda: self.proc is not None and self.proc.poll() is None)
        except ManagementError as exc:
            code = self.proc.returncode if self.proc else None
            raise ServeError(f"{exc} (exit code {code})\n{self.log_tail()}") from None

    def worker_pids(self, model: str) -> set[int]:
        return {int(w["pid"]) for w in self.workers(model) if w.get("pid")}

    def group_processes(self) -> list:
        """Live (non-zombie) processes of this server's process group: frontend, JVM and workers."""
        import psutil

        if not self.proc:
            return []
        found = []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(p.pid) == self.proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        return found

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the whole group, wait for every member to exit, SIGKILL what is left after timeout."""
        if not self.proc:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.proc.poll() is None or self.group_processes()):
            time.sleep(0.2)
        for p in self.group_processes():
            p.kill()
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self.log.close()
        self.proc = None
