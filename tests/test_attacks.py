"""The CI-sized hostile-traffic run (python -m stress.attacks --quick) against a real `./skin up`: each attack
gets its refusal, a normal user on another address keeps being answered, nothing restarts, nobody else
can touch TorchServe."""
from __future__ import annotations

import os

import pytest

from stress.attacks import QUICK, run_all, table

EXPECTED = {  # what the attacker may get back, attack by attack
    "form-bomb": {415},
    "multipart-bomb": {400},
    "scan-bomb": {422},
    "decoder-bombs": {413, 415, 200},  # the float TIFF is within the decoded-bytes budget: decoded, in bounds
    "framing": {400, 413},
    "slow-bodies": {408, 429, "closed by the gate", "still open"},
    "flood-page": {200, 429, 503},
}


@pytest.fixture(scope="module")
def figures(tiny_release):
    r = run_all(tiny_release, QUICK, seconds=6, log=lambda *_: None)
    print(table(r))
    return r


@pytest.mark.parametrize("name", QUICK)
def test_each_attack_is_refused_while_a_normal_user_is_served(figures, name):
    a = next(a for a in figures["attacks"] if a["attack"] == name)
    assert a["stack_up"] and a["torchserve_restarts"] == 0, a
    assert set(a["attacker"]) <= EXPECTED[name], a["attacker"]
    assert sum(a["attacker"].values()) > 0, "the attack never ran"
    assert a["user_sent"] >= 3 and a["user_ok"] == a["user_sent"], a["user_statuses"]
    if name == "slow-bodies":  # 300 unfinished headers closed, all uploads but the per-client 4 refused
        assert a["attacker"].get("closed by the gate", 0) >= 300 and a["attacker"].get("still open", 0) <= 4, a


def test_other_local_users_cannot_touch_torchserve(figures):
    o = figures["owner_only"]
    assert o["rest_scale_http"] == "400" and o["grpc_scale"] == "PERMISSION_DENIED", o
    if os.geteuid() == 0:
        assert o["as"] == "nobody" and not o["key_file_readable"]
    assert all(" 127.0.0.1:" in listener for listener in o["listeners"]), o["listeners"]
    assert figures["exit_code"] == 0
