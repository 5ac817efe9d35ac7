"""`./skin up` as a user runs it, on free ports with a state folder of its own: for tests, stress runs and
benchmarks that need the whole stack (gate, TorchServe, logger, supervisor) rather than one piece of it."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil

from stack.settings import REPO, Settings
from stack.tokens import TokenFile
from stack.torchserve import free_port


class LocalStack:
    def __init__(self, release: Path, work: Path, env: dict | None = None):
        self.ports = {k: free_port() for k in ("site", "inference", "management", "metrics")}
        self.state = Path(work) / "state"
        self.env = {**os.environ, "SKIN_RELEASE_DIR": str(release), "SKIN_MODEL_STORE": str(Path(work) / "store"),
                    "SKIN_STATE_DIR": str(self.state), **{f"SKIN_{k.upper()}_PORT": str(v) for k, v in self.ports.items()},
                    **(env or {})}
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None

    @property
    def settings(self) -> Settings:
        """What the stack reads from its environment: the same rules, applied to this stack's variables."""
        return Settings.from_env(self.env)

    @property
    def page_url(self) -> str:
        return self.settings.page_url

    @property
    def inference_url(self) -> str:
        return self.settings.inference_url

    @property
    def management_url(self) -> str:
        return self.settings.management_url

    @property
    def tokens(self) -> TokenFile:
        return TokenFile(self.settings.key_file)

    def output(self) -> str:
        return "".join(self.lines)

    def start(self, timeout: float = 240) -> "LocalStack":
        self.proc = subprocess.Popen([str(REPO / "skin"), "up"], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        ready, ended = threading.Event(), threading.Event()

        def read():  # always drained, so a chatty stack never blocks on a full pipe
            for line in self.proc.stdout:
                self.lines.append(line)
                if "Ctrl-C" in line:
                    ready.set()
            ended.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.is_set() and not ended.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not ready.is_set():
            self.proc.kill()
            raise AssertionError("the stack did not become ready:\n" + self.output())
        return self

    def processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def find(self, marker: str) -> psutil.Process | None:
        """The first live descendant whose command line contains marker (e.g. 'ModelServer', 'stack.gate')."""
        for p in self.processes():
            try:
                if marker in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                    return p
            except psutil.Error:
                continue
        return None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGINT, timeout: float = 90) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        time.sleep(0.2)
        return self.proc.returncode
