"""Hostile traffic against a real `./skin up`: every finding of the hostile-traffic review replayed from one
address while a normal user sends real lesion photos from another; prints one table.

    .venv/bin/python -m stress.attacks                    # every attack, 30 s each (about 8 minutes)
    .venv/bin/python -m stress.attacks --quick            # the CI-sized run (tests/test_attacks.py)
    .venv/bin/python -m stress.attacks --only form-bomb scan-bomb --seconds 10

For each attack: what the attacker got (statuses, median time to answer), what the normal user got
(answered / sent, median latency next to the median at rest), whether the stack stayed up without a
TorchServe restart, and peak memory of the gate and TorchServe.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import requests

from stack.settings import MODEL_NAME, current, sample_images
from stress.local_stack import LocalStack
from stress.request_attacks import API, ATTACKS, QUICK, USER, Outcome, session_from


# ---- the run ------------------------------------------------------------------------------------------------

PARTS = (("gate", "stack.gate"), ("torchserve", "org.pytorch.serve.ModelServer"), ("workers", "model_service_worker"))


def _cpu_seconds(stack: LocalStack) -> dict:
    """CPU seconds (user + system) each part of the stack has used so far, by process id."""
    seen = {}
    for p in stack.processes():
        try:
            line, t = " ".join(p.cmdline()), p.cpu_times()
        except psutil.Error:
            continue
        for label, marker in PARTS:
            if marker in line:
                seen[p.pid] = (label, t.user + t.system)
    return seen


def _cpu_used(before: dict, after: dict) -> dict:
    used = {}
    for pid, (label, seconds) in after.items():
        used[label] = used.get(label, 0.0) + seconds - (before[pid][1] if pid in before else 0.0)
    return used


def _sample_memory(stack: LocalStack, peak: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        for label, marker in PARTS:
            total = 0
            for p in stack.processes():
                try:
                    if marker in " ".join(p.cmdline()):
                        total += p.memory_info().rss
                except psutil.Error:
                    continue
            peak[label] = max(peak.get(label, 0), total >> 20)
        time.sleep(0.2)


def _normal_user(stack: LocalStack, images: list[bytes], out: Outcome, stop: threading.Event, period: float) -> None:
    """One person using the page from another address: an image, then a pause, with the clients' retry policy."""
    s, i = session_from(USER, retry=True), 0
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            status = s.post(stack.page_url + API, data=images[i % len(images)], timeout=60).status_code
        except requests.RequestException as exc:
            status = type(exc).__name__
        out.user[status] += 1
        if status == 200:
            out.user_ms.append((time.perf_counter() - t0) * 1000)
        i += 1
        stop.wait(period)


CHILDREN = {"TorchServe": "org.pytorch.serve.ModelServer", "gate": "stack.gate", "logger": "-m logger"}


def _pids(stack: LocalStack) -> dict:
    return {name: getattr(stack.find(marker), "pid", None) for name, marker in CHILDREN.items()}


def _attacker_process(name: str, stack: LocalStack, stop_all, results) -> None:
    """The attack in a process of its own: its threads never share an interpreter lock with the normal user's
    client (they did, and the user's measured latency then included the attacker's own Python work)."""
    out, stop = Outcome(name), threading.Event()
    threading.Thread(target=lambda: (stop_all.wait(), stop.set()), daemon=True).start()
    cpu = time.process_time()
    try:
        ATTACKS[name](stack, out, stop)
    finally:
        results.send((dict(out.attacker), out.attacker_ms, out.note, time.process_time() - cpu))
        results.close()


def run_attack(stack: LocalStack, name: str, images: list[bytes], seconds: float, period: float = 0.5) -> Outcome:
    out, stop, peak = Outcome(name), threading.Event(), {}
    before, cpu_before = _pids(stack), _cpu_seconds(stack)
    ctx = multiprocessing.get_context("fork")
    stop_attack, (results, sender) = ctx.Event(), ctx.Pipe(duplex=False)
    attacker = ctx.Process(target=_attacker_process, args=(name, stack, stop_attack, sender), daemon=True)
    attacker.start()  # forked before this run's own threads start
    sender.close()  # the child's end: a child that dies unheard shows as EOF here, not a silent wait
    helpers = [threading.Thread(target=_sample_memory, args=(stack, peak, stop), daemon=True),
               threading.Thread(target=_normal_user, args=(stack, images, out, stop, period), daemon=True)]
    try:
        for t in helpers:
            t.start()
        time.sleep(seconds)
    finally:
        stop_attack.set()
        stop.set()
        try:
            if results.poll(150):
                statuses, ms, out.note, attacker_cpu = results.recv()
                out.cpu_s = {"attacker": attacker_cpu, **_cpu_used(cpu_before, _cpu_seconds(stack))}
                out.attacker.update(statuses)
                out.attacker_ms.extend(ms)
            else:
                out.note = "the attacker's process sent no results within 150 s"
        except EOFError:
            out.note = "the attacker's process ended without its results"
        attacker.join(timeout=10)
        if attacker.is_alive():
            attacker.kill()
        if out.note.startswith("the attacker's process"):
            out.note += f" (exit code {attacker.exitcode})"
    for t in helpers:
        t.join(timeout=70)
    out.peak_mb = peak
    out.stack_up = stack.running()
    after = _pids(stack)
    out.restarts = {child: 1 for child in CHILDREN if before[child] is None or after[child] != before[child]}
    if name == "kill-jvm":
        _wait_ready(stack)
    return out


def _wait_ready(stack: LocalStack, timeout: float = 120) -> None:
    s, deadline = session_from(USER), time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if s.get(stack.page_url + "/ping", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)


def owner_only(stack: LocalStack) -> dict:
    """What another local user (nobody) can do to TorchServe: nothing without the keys."""
    import grpc

    url = f"{stack.management_url}/models/{MODEL_NAME}?min_worker=0&max_worker=0&synchronous=true"
    as_nobody = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    rest = subprocess.run([*as_nobody, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", url],
                          capture_output=True, text=True, timeout=60).stdout
    key = subprocess.run([*as_nobody, "cat", str(stack.tokens.path)], capture_output=True).returncode
    config = (stack.state / "torchserve" / "config.properties").read_text()
    port = next(line.split("=")[1] for line in config.splitlines() if line.startswith("grpc_management_port="))
    name = MODEL_NAME.encode()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary("/org.pytorch.serve.grpc.management.ManagementAPIsService/ScaleWorker")(
                b"\x0a" + bytes([len(name)]) + name + b"\x18\x01\x20\x01", timeout=30)
            grpc_answer = "OK"
        except grpc.RpcError as err:
            grpc_answer = err.code().name
    names = {**{v: k for k, v in stack.ports.items()}, int(port): "grpc-management"}
    names[int(next(line.split("=")[1] for line in config.splitlines()
                   if line.startswith("grpc_inference_port=")))] = "grpc-inference"
    listeners = sorted({f"{names.get(c.laddr.port, '?')} {c.laddr.ip.removeprefix('::ffff:')}:{c.laddr.port}"
                        for p in stack.processes() for c in p.net_connections(kind="tcp")
                        if c.status == psutil.CONN_LISTEN})
    return {"as": "nobody" if as_nobody else os.environ.get("USER", "this user"), "rest_scale_http": rest,
            "key_file_readable": key == 0, "grpc_scale": grpc_answer, "listeners": listeners}


def rest_latency(stack: LocalStack, images: list[bytes], seconds: float) -> list[float]:
    out, stop = Outcome("rest"), threading.Event()
    t = threading.Thread(target=_normal_user, args=(stack, images, out, stop, 0.5), daemon=True)
    t.start()
    time.sleep(seconds)
    stop.set()
    t.join(timeout=70)
    return out.user_ms


def run_all(release: Path, names: list[str], seconds: float, log=print) -> dict:
    images = sample_images(20)
    with tempfile.TemporaryDirectory() as tmp:
        stack = LocalStack(release, Path(tmp)).start()
        try:
            log("normal user at rest ...")
            rest = rest_latency(stack, images, max(5.0, seconds / 2))
            results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "machine": f"{os.uname().machine}, {os.cpu_count()} cores", "rest_p50_ms": statistics.median(rest),
                       "rest_requests": len(rest), "attacks": [], "owner_only": owner_only(stack)}
            for name in names:
                log(f"attack: {name} for {seconds:.0f} s ...")
                results["attacks"].append(run_attack(stack, name, images, seconds).summary())
                if not stack.running():
                    break
        finally:
            results_exit = stack.stop()
        results["exit_code"] = results_exit
        results["supervisor_log"] = [line.strip() for line in stack.lines if "restart" in line or "exited" in line]
    return results


def table(r: dict) -> str:
    rows = [f"Measured {r['date']} on {r['machine']}. Normal user at rest: p50 {r['rest_p50_ms']:.0f} ms "
            f"({r['rest_requests']} requests, one image every 0.5 s from another address).\n",
            "| attack | attacker got | attacker p50 ms | normal user answered | user p50 ms (at rest) | user p50 "
            "ratio | stack | peak MiB gate / JVM / workers | CPU s attacker / gate / JVM / workers |",
            "|---|---|---|---|---|---|---|---|---|"]
    for a in r["attacks"]:
        got = ", ".join(f"{k}: {v}" for k, v in sorted(a["attacker"].items(), key=lambda kv: -kv[1]))
        mem = a["peak_mb"]
        stack = "up" if a["stack_up"] else "DOWN"
        stack += f", restarted: {', '.join(a['restarts'])}" if a["restarts"] else ", no restart"
        rows.append(f"| {a['attack']} | {got} | {a['attacker_p50_ms']:.0f} | {a['user_ok']}/{a['user_sent']} | "
                    f"{a['user_p50_ms']:.0f} ({r['rest_p50_ms']:.0f}) | {a['user_p50_ms'] / r['rest_p50_ms']:.2f}x | "
                    f"{stack} | {mem.get('gate', 0)} / "
                    f"{mem.get('torchserve', 0)} / {mem.get('workers', 0)} | "
                    + " / ".join(f"{a['cpu_s'].get(k, 0):.1f}" for k in ("attacker", "gate", "torchserve", "workers"))
                    + " |")
    o = r["owner_only"]
    rows.append(f"\nAs {o['as']}: REST scale-to-0 HTTP {o['rest_scale_http']}, gRPC ScaleWorker {o['grpc_scale']}, "
                f"key file readable: {o['key_file_readable']}. Listeners: {', '.join(o['listeners'])}. "
                f"Stack exit code {r['exit_code']}.")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stress.attacks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", default=str(current().release_dir), help="the release to serve (SKIN_RELEASE_DIR)")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--only", nargs="+", choices=sorted(ATTACKS), help="run these attacks only")
    p.add_argument("--quick", action="store_true", help=f"CI size: {', '.join(QUICK)}; 8 s each")
    p.add_argument("--json", help="also write the raw figures here")
    args = p.parse_args(argv)
    names = args.only or (QUICK if args.quick else list(ATTACKS))
    seconds = 8 if args.quick and args.seconds == 30 else args.seconds
    r = run_all(Path(args.release), names, seconds)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2, default=str))
    print(table(r))
    return 0 if all(a["stack_up"] for a in r["attacks"]) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
