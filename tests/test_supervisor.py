"""The supervisor on plain processes: a dead child comes back after its back-off, a stable one is left alone,
stop_all ends them all. Fast tier."""
from __future__ import annotations

import sys
import time

import pytest

from stack import supervisor as S

pytestmark = pytest.mark.fast


def test_a_dying_child_is_restarted_with_back_off(monkeypatch):
    monkeypatch.setattr(S, "BACKOFF_S", (0.2, 0.4))
    lines = []
    sup = S.Supervisor(log=lines.append)
    dying = sup.add(S.process_child("dies", [sys.executable, "-c", "raise SystemExit(3)"]))
    steady = sup.add(S.process_child("steady", [sys.executable, "-c", "import time; time.sleep(60)"]))
    for child in sup.children:
        child.launch()
    deadline = time.monotonic() + 10
    while dying.restarts < 2 and time.monotonic() < deadline:
        sup.tick()
        time.sleep(0.05)
    try:
        assert dying.restarts >= 2 and steady.restarts == 0, lines
        assert any("dies exited: exit code 3; restarting in 0.2 s" in line for line in lines), lines
        assert any("restarting in 0.4 s" in line for line in lines), "the back-off did not grow"
        assert steady.alive()
    finally:
        sup.stop_all()
    assert not steady.alive() and not dying.alive()
