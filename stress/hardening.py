"""Fuzz, load, faults and security checks against a real stack; prints one table of figures.

    .venv/bin/python -m stress.hardening                 # full: 1000 fuzz cases, 8 clients x 60 s, all faults
    .venv/bin/python -m stress.hardening --quick         # the CI-sized run (also what tests/test_hardening.py uses)

Needs the machine's PostgreSQL (DATABASE admin URL via SKIN_TEST_PG_ADMIN) for the restart fault.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil
import requests

from skinmodel.release import ReleaseMeta
from stack.archive import build_mar
from stack.page import render_page
from stack.gate import GateLimits, GateThread
from stack.settings import MODEL_NAME, REPO, current, sample_images
from stack.torchserve import TorchServe, free_port
from stress.fuzz import fuzz_cases, judge
from stress.local_stack import LocalStack

NAME = MODEL_NAME


@dataclass
class Load:
    statuses: Counter = field(default_factory=Counter)
    latencies: list = field(default_factory=list)
    bodies: list = field(default_factory=list)
    wall: float = 0.0

    @property
    def n(self):
        return sum(self.statuses.values())

    def pct(self, q):
        v = sorted(self.latencies)
        return v[min(len(v) - 1, int(q / 100 * len(v)))] if v else float("nan")


def one_address_load(per_client: int) -> GateLimits:
    """The gate's limits for a load run whose many users all come from one address (this machine): the
    per-client shares (requests in flight, rate, body bytes) lifted to the whole service's."""
    whole = GateLimits()
    return GateLimits(per_client=per_client, rate=1e6, burst=10**6, client_bytes=whole.inflight_bytes,
                      network_bytes=whole.inflight_bytes, per_address_connections=whole.max_connections,
                      per_network_connections=whole.max_connections)


def run_load(url: str, images: list[bytes], clients: int, seconds: float, during=None, headers=None) -> Load:
    """Closed-loop clients for `seconds`; `during(load)` runs in the foreground meanwhile (fault injection)."""
    out, stop, lock = Load(), threading.Event(), threading.Lock()

    def client(i):
        s = requests.Session()
        k = i
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = s.post(url, data=images[k % len(images)], timeout=60, headers=headers)
                status, body = r.status_code, (r.text[:200] if r.status_code != 200 else "")
            except requests.RequestException as exc:
                status, body = "connection error", str(exc)[:200]
            with lock:
                out.statuses[status] += 1
                out.latencies.append((time.perf_counter() - t0) * 1000)
                if body:
                    out.bodies.append((status, body))
            k += clients

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    if during:
        during(out)
    while time.monotonic() - started < seconds:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    out.wall = time.monotonic() - started
    return out


def memory_mb(ts: TorchServe) -> dict:
    procs = ts.group_processes()
    java = [p for p in procs if "java" in p.name()]
    workers = [p for p in procs if "model_service_worker" in " ".join(p.cmdline())]
    return {"frontend_mb": sum(p.memory_info().rss for p in java) / 2**20,
            "workers_mb": sum(p.memory_info().rss for p in workers) / 2**20}


def fuzz(site_url: str, ts: TorchServe, jpegs: list[bytes], n: int, seed: int = 0) -> dict:
    pids = ts.worker_pids(NAME)
    s = requests.Session()
    problems, codes = [], Counter()
    for case in fuzz_cases(seed, n, jpegs):
        r = case.send(s, f"{site_url}/predictions/{NAME}")
        codes[r.status_code] += 1
        why = judge(r)
        if why:
            problems.append((case.kind, why))
    after = requests.post(f"{site_url}/predictions/{NAME}", data=jpegs[0], timeout=30)
    return {"cases": sum(codes.values()), "codes": dict(codes), "problems": problems,
            "workers_restarted": pids != ts.worker_pids(NAME), "next_valid_ok": judge(after) is None
            and after.status_code == 200}


def kill_worker_under_load(ts: TorchServe, url: str, images: list[bytes], clients: int, seconds: float) -> dict:
    info = {}

    def fault(_load):
        time.sleep(seconds / 3)
        victim = sorted(ts.worker_pids(NAME))[0]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            pids = ts.worker_pids(NAME)
            ready = [w for w in ts.workers(NAME) if w.get("status") == "READY"]
            if victim not in pids and len(ready) >= 2:
                break
            time.sleep(0.2)
        info["recovery_s"] = time.monotonic() - t0

    load = run_load(url, images, clients, seconds, fault)
    failed = {k: v for k, v in load.statuses.items() if k != 200}
    return {"requests": load.n, "failed": failed, "failed_bodies": load.bodies[:3], **info}


def full_queue(mar: Path, work: Path, jpeg: bytes, clients: int = 32) -> dict:
    """A server with a 2-slot job queue, flooded through the page proxy with large photos (slow to decode, so
    the queue really fills): refusals must be clear and retryable."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("RGB").resize((3000, 2250)).save(buf, "JPEG", quality=92)
    jpeg = buf.getvalue()
    ts = TorchServe(mar.parent, {NAME: mar.name}, work / "ts-queue", free_port(), free_port(), free_port(),
                    extra_config={"job_queue_size": "2"}).start()
    site = None
    try:
        ts.wait_ready()
        # One client address floods here: lift the gate's per-client cap so that TorchServe's queue fills.
        site = GateThread(work / "dist", ts.inference_url, ts.tokens, limits=one_address_load(10 * clients)).start()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda _: requests.post(f"{site.url}/predictions/{NAME}", data=jpeg, timeout=60),
                                    range(clients * 3)))
        busy = [r for r in answers if r.status_code == 503]
        return {"requests": len(answers), "ok": sum(r.status_code == 200 for r in answers), "busy_503": len(busy),
                "busy_clear": all(r.headers.get("Retry-After") and r.json().get("error") == "busy" for r in busy),
                "other": sorted({r.status_code for r in answers} - {200, 503})}
    finally:
        if site:
            site.stop()
        ts.stop()


def pg_cluster(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action], check=True,
                   capture_output=True, timeout=120)


def count_rows(url: str, want: int, timeout: float = 90) -> int:
    import psycopg2

    deadline, count = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        try:
            with psycopg2.connect(url, connect_timeout=2) as conn, conn.cursor() as cur:
                cur.execute("SELECT COUNT(*) FROM predictions")
                count = cur.fetchone()[0]
            if count >= want:
                break
        except psycopg2.Error:
            pass
        time.sleep(0.5)
    return count


def db_restart_under_load(admin_url: str, mar: Path, work: Path, images: list[bytes], clients: int,
                          seconds: float) -> dict:
    """PostgreSQL and the logger sidecar both restarted mid-load: rows must equal answered requests."""
    import psycopg2

    db = f"skin_stress_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {db}")
    admin.close()
    url = admin_url.rsplit("/", 1)[0] + f"/{db}"
    spool = work / "spool-db"
    ts = TorchServe(mar.parent, {NAME: mar.name}, work / "ts-db", free_port(), free_port(), free_port(),
                    env={"SKIN_SPOOL_DIR": str(spool)}).start()
    env = {**os.environ, "SKIN_SPOOL_DIR": str(spool), "DATABASE_URL": url}
    side = lambda: subprocess.Popen([sys.executable, "-m", "logger", "run", "--interval", "0.2"], cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: E731
    sidecar = side()
    try:
        ts.wait_ready(min_workers=2)

        def fault(_load):
            nonlocal sidecar
            time.sleep(seconds / 4)
            pg_cluster("stop")
            sidecar.send_signal(signal.SIGKILL)
            sidecar.wait()
            time.sleep(seconds / 4)
            pg_cluster("start")
            sidecar = side()

        load = run_load(f"{ts.inference_url}/predictions/{NAME}", images, clients, seconds, fault, ts.headers())
        rows = count_rows(url, load.n)
        return {"answered": load.n, "rows": rows, "lost": load.n - rows, "failed": {k: v for k, v in
                                                                                   load.statuses.items() if k != 200}}
    finally:
        try:
            pg_cluster("start")
        except subprocess.CalledProcessError:
            pass  # already running
        sidecar.terminate()
        sidecar.wait(timeout=20)
        ts.stop()
        admin = psycopg2.connect(admin_url)
        admin.autocommit = True
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.close()


def stop_stack_mid_load(release: Path, work: Path, images: list[bytes], clients: int) -> dict:
    """./skin up, load through the page, Ctrl-C: clean exit, no process left, no partial spool line."""
    stack = LocalStack(release, work).start()
    tree = stack.processes()

    def fault(_load):
        time.sleep(2)
        stack.proc.send_signal(signal.SIGINT)

    run_load(stack.page_url + f"/predictions/{NAME}", images, clients, 4, fault)
    stack.proc.wait(timeout=90)
    code = stack.stop()
    time.sleep(0.5)
    orphans = [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    partial = 0
    for f in (stack.state / "spool").glob("*.jsonl"):
        data = f.read_bytes()
        partial += 0 if not data or data.endswith(b"\n") else 1
        for line in data.splitlines():
            try:
                json.loads(line)
            except ValueError:
                partial += 1
    return {"exit_code": code, "orphans": orphans, "partial_spool_lines": partial}


def security(ts_api: TorchServe, site: GateThread, jpeg: bytes, work: Path) -> dict:
    out = {}
    listening = {(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port) for p in ts_api.group_processes()
                 for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    out["non_loopback_listeners"] = sorted(f"{ip}:{port}" for ip, port in listening if not ip.startswith("127."))
    # With the management key: what must refuse it is allowed_urls, not the missing key.
    r = requests.post(f"{ts_api.management_url}/models", params={"url": "https://example.invalid/evil.mar"}, timeout=30,
                      headers=ts_api.headers("management"))
    out["foreign_url_registration"] = r.status_code
    headers = requests.post(f"{site.url}/predictions/{NAME}", data=jpeg, timeout=30).headers
    direct = requests.post(f"{ts_api.inference_url}/predictions/{NAME}", data=jpeg, timeout=30,
                           headers=ts_api.headers()).headers
    out["version_headers"] = [f"{k}: {v}" for h in (headers, direct) for k, v in h.items()
                              if k.lower() in ("server", "x-powered-by") and re.search(r"\d", v)]
    needle = jpeg[200:264]
    out["image_bytes_on_disk"] = [str(p) for p in work.rglob("*") if p.is_file() and p.stat().st_size < 50 * 2**20
                                  and not p.suffix == ".mar" and needle in p.read_bytes()]
    return out


def secret_scan(repo: Path = REPO) -> list[str]:
    pattern = re.compile(r"(AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|(password|secret|token)\s*[:=]\s*"
                         r"['\"]?[A-Za-z0-9/+_-]{8,})", re.I)
    files = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True).stdout.split()
    hits = []
    for name in files:
        p = repo / name
        if p.suffix in (".pt", ".png", ".mar") or not p.is_file():
            continue
        for i, line in enumerate(p.read_text(errors="ignore").splitlines(), 1):
            if pattern.search(line) and "${" not in line and "example" not in line.lower():
                hits.append(f"{name}:{i}")
    return hits


def run_all(release: Path, fuzz_n: int, clients: int, seconds: float, fault_seconds: float, admin_url: str,
            log=print) -> dict:
    jpegs = sample_images(40)
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"{psutil.virtual_memory().total / 2**30:.0f} GiB", "model": ReleaseMeta.load(release).version}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, mar = build_mar(release, work / "store")
        ts = TorchServe(mar.parent, {NAME: mar.name}, work / "ts", free_port(), free_port(), free_port(),
                        enable_model_api=True).start()
        site = None
        try:
            ts.wait_ready(min_workers=2)
            dist = render_page(release, work / "dist")
            # The load below is `clients` concurrent users from one address: let the gate's per-client cap admit them.
            site = GateThread(dist, ts.inference_url, ts.tokens, limits=one_address_load(max(clients, 4))).start()
            url = f"{site.url}/predictions/{NAME}"
            log(f"fuzzing with {fuzz_n} generated payloads ...")
            results["fuzz"] = fuzz(site.url, ts, jpegs, fuzz_n)
            log(f"load: {clients} clients for {seconds:.0f} s ...")
            before = memory_mb(ts)
            load = run_load(url, jpegs, clients, seconds)
            after = memory_mb(ts)
            results["load"] = {"requests": load.n, "errors": {str(k): v for k, v in load.statuses.items() if k != 200},
                               "throughput_rps": load.n / load.wall, "p50_ms": load.pct(50), "p95_ms": load.pct(95),
                               "p99_ms": load.pct(99), "memory_before": before, "memory_after": after}
            log("fault: killing a worker under load ...")
            results["worker_kill"] = kill_worker_under_load(ts, url, jpegs, clients, fault_seconds)
            results["security"] = security(ts, site, jpegs[0], work)
        finally:
            if site:
                site.stop()
            ts.stop()
        log("fault: full queue ...")
        results["full_queue"] = full_queue(mar, work, jpegs[0])
        log("fault: PostgreSQL and the logger restarted under load ...")
        results["db_restart"] = db_restart_under_load(admin_url, mar, work, jpegs, clients, fault_seconds)
        log("fault: stopping the whole stack under load ...")
        results["stack_stop"] = stop_stack_mid_load(release, work, jpegs, clients)
    results["secrets_in_repo"] = secret_scan()
    return results


def table(r: dict) -> str:
    f, ld, wk, db, st, sec = (r["fuzz"], r["load"], r["worker_kill"], r["db_restart"], r["stack_stop"], r["security"])
    mem = f"frontend {ld['memory_before']['frontend_mb']:.0f}->{ld['memory_after']['frontend_mb']:.0f} MiB, " \
          f"workers {ld['memory_before']['workers_mb']:.0f}->{ld['memory_after']['workers_mb']:.0f} MiB"
    rows = [
        ("fuzzed inputs", f"{f['cases']} payloads: {f['codes']}; unacceptable answers {len(f['problems'])}; "
                          f"worker restarts {'yes' if f['workers_restarted'] else 'none'}; next valid request "
                          f"{'correct' if f['next_valid_ok'] else 'WRONG'}"),
        ("sustained load", f"{ld['requests']} requests, errors {ld['errors'] or 0}, {ld['throughput_rps']:.1f} req/s, "
                           f"p50/p95/p99 {ld['p50_ms']:.0f}/{ld['p95_ms']:.0f}/{ld['p99_ms']:.0f} ms; {mem}"),
        ("worker killed", f"{wk['requests']} requests, failed {wk['failed'] or 0}, recovered in "
                          f"{wk.get('recovery_s', float('nan')):.1f} s"),
        ("full queue (2-slot job queue)", f"{r['full_queue']['requests']} requests: {r['full_queue']['ok']} answered, "
                                           f"{r['full_queue']['busy_503']} refused with 503 + Retry-After + JSON "
                                           f"reason ({'all' if r['full_queue']['busy_clear'] else 'NOT all'}); "
                                           f"other statuses {r['full_queue']['other'] or 'none'}"),
        ("PostgreSQL + logger restarted", f"{db['answered']} answered, {db['rows']} rows, data lost = {db['lost']}, "
                                          f"failed requests {db['failed'] or 0}"),
        ("stack stopped under load", f"exit code {st.get('exit_code')}, orphan processes {len(st.get('orphans', []))}, "
                                     f"partial spool lines {st.get('partial_spool_lines')}"),
        ("security", f"non-loopback listeners {sec['non_loopback_listeners'] or 'none'}; foreign-URL registration "
                     f"HTTP {sec['foreign_url_registration']}; version headers {sec['version_headers'] or 'none'}; "
                     f"image bytes on disk {len(sec['image_bytes_on_disk'])}; secrets in repo "
                     f"{len(r['secrets_in_repo'])}"),
    ]
    head = f"Measured {r['date']} on {r['machine']}, model {r['model']}.\n\n| check | result |\n|---|---|\n"
    return head + "\n".join(f"| {a} | {b} |" for a, b in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stress.hardening", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", default=str(current().release_dir), help="the release to serve (SKIN_RELEASE_DIR)")
    p.add_argument("--fuzz", type=int, default=1000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--fault-seconds", type=float, default=12)
    p.add_argument("--quick", action="store_true", help="CI size: 200 fuzz cases, 10 s load, 8 s faults")
    p.add_argument("--pg-admin-url", default=os.environ.get("SKIN_TEST_PG_ADMIN",
                                                           "postgresql://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--json", help="also write the raw figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.fuzz, args.seconds, args.fault_seconds = 200, 10, 8
    r = run_all(Path(args.release), args.fuzz, args.clients, args.seconds, args.fault_seconds, args.pg_admin_url)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2, default=str))
    print(table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
