"""Keep the local stack's processes alive: a child that dies is restarted with back-off, never the reason
to tear everything down.

Three children in `./skin up`: TorchServe (its JVM can still die, e.g. of an OutOfMemoryError it was told to
exit on), the logger sidecar and the page's gate. While TorchServe restarts the gate answers 503 with
Retry-After, and the handler's audit spool waits on disk for the logger, so nothing is lost.
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

BACKOFF_S = (1, 2, 4, 8, 16, 30, 60)
STABLE_S = 120  # up this long: the next failure starts the back-off from the beginning again


@dataclass
class Child:
    """One supervised process. start() launches it, alive() says whether it still runs, stop() ends it."""

    name: str
    start: Callable[[], None]
    alive: Callable[[], bool]
    stop: Callable[[], None]
    describe_exit: Callable[[], str] = lambda: ""
    restarts: int = 0
    started_at: float = 0.0
    next_start: float | None = None
    failures_in_a_row: int = field(default=0)

    def launch(self) -> None:
        self.start()
        self.started_at, self.next_start = time.monotonic(), None


class Supervisor:
    def __init__(self, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)):
        self.children: list[Child] = []
        self.log = log

    def add(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def tick(self) -> None:
        """Look at every child once: schedule a restart for the dead ones, restart those whose time has come."""
        now = time.monotonic()
        for c in self.children:
            if c.next_start is None and not c.alive():
                if now - c.started_at > STABLE_S:
                    c.failures_in_a_row = 0
                wait = BACKOFF_S[min(c.failures_in_a_row, len(BACKOFF_S) - 1)]
                c.failures_in_a_row += 1
                c.next_start = now + wait
                detail = c.describe_exit()
                self.log(f"{c.name} exited{': ' + detail if detail else ''}; restarting in {wait} s")
                try:
                    c.stop()  # reap what is left of it (TorchServe: the whole process group)
                except Exception as exc:  # noqa: BLE001 - cleanup of a dead child must not stop the others
                    self.log(f"cleaning up {c.name}: {exc}")
            elif c.next_start is not None and now >= c.next_start:
                try:
                    c.launch()
                    c.restarts += 1
                    self.log(f"{c.name} restarted (restart {c.restarts})")
                except Exception as exc:  # noqa: BLE001 - try again after the next back-off step
                    c.started_at, c.next_start = now, None
                    self.log(f"{c.name} failed to start: {exc}")

    def stop_all(self) -> None:
        for c in reversed(self.children):
            try:
                c.stop()
            except Exception as exc:  # noqa: BLE001 - stop the rest anyway
                self.log(f"stopping {c.name}: {exc}")


def process_child(name: str, argv: list[str], stop_timeout: float = 15.0, **popen) -> Child:
    """A plain subprocess as a child: SIGTERM on stop, SIGKILL after stop_timeout."""
    holder: dict[str, subprocess.Popen] = {}

    def start():
        holder["p"] = subprocess.Popen(argv, start_new_session=True, **popen)

    def alive():
        return "p" in holder and holder["p"].poll() is None

    def stop():
        p = holder.get("p")
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)

    def describe():
        p = holder.get("p")
        return f"exit code {p.returncode}" if p is not None and p.returncode is not None else ""

    return Child(name, start, alive, stop, describe)
