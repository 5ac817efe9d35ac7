"""The CI-sized hardening run (python -m stress.hardening --quick): fuzz, load, faults, security."""
from __future__ import annotations

import os

import pytest

from stress.hardening import run_all, table


@pytest.fixture(scope="module")
def figures(tiny_release):
    admin = os.environ.get("SKIN_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
    r = run_all(tiny_release, fuzz_n=200, clients=4, seconds=10, fault_seconds=8, admin_url=admin, log=lambda *_: None)
    print(table(r))
    return r


def test_fuzzed_inputs_get_200_or_a_4xx_with_a_reason(figures):
    f = figures["fuzz"]
    assert f["cases"] >= 200
    assert not f["problems"], f["problems"][:5]
    assert not any(500 <= int(code) for code in f["codes"])
    assert not f["workers_restarted"] and f["next_valid_ok"]


def test_sustained_load_has_no_errors(figures):
    load = figures["load"]
    assert load["requests"] > 20 and not load["errors"]


def test_a_killed_worker_fails_only_in_flight_requests_and_recovers(figures):
    k = figures["worker_kill"]
    assert sum(k["failed"].values()) <= 4 + 4, k  # at most a batch per worker in flight
    assert set(k["failed"]) <= {507, 503}, k["failed_bodies"]
    assert k["recovery_s"] < 60


def test_a_full_queue_answers_a_clear_retryable_503(figures):
    q = figures["full_queue"]
    assert q["busy_503"] > 0, "the flood never filled the queue: the test did not test it"
    assert q["busy_clear"] and not q["other"] and q["ok"] > 0


def test_database_and_logger_restart_lose_nothing(figures):
    d = figures["db_restart"]
    assert d["lost"] == 0 and d["rows"] == d["answered"] and not d["failed"], d


def test_stopping_the_stack_under_load_is_clean(figures):
    s = figures["stack_stop"]
    assert s["exit_code"] == 0 and not s["orphans"] and s["partial_spool_lines"] == 0, s


def test_security_checks(figures):
    sec = figures["security"]
    assert not sec["non_loopback_listeners"]
    assert 400 <= sec["foreign_url_registration"] < 500
    assert not sec["version_headers"] and not sec["image_bytes_on_disk"]
    assert not figures["secrets_in_repo"], figures["secrets_in_repo"]
