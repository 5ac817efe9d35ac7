"""Inference latency with the audit trail on (spool + fsync + sidecar inserting into PostgreSQL) vs off.

    .venv/bin/python bench/logger_overhead.py [--requests 300] [--pg-admin-url postgresql://postgres@127.0.0.1/postgres]

Two TorchServes serve the same archive side by side; requests alternate between them one at a time, so both
see the same machine noise. With --pg-admin-url the sidecar writes to a temporary database created (and dropped) there; without it, to a
temporary SQLite file.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import requests  # noqa: E402

from bench.serving import pct  # noqa: E402
from stack.torchserve import TorchServe, free_port  # noqa: E402
from stack.archive import build_mar  # noqa: E402
from stack.settings import current, sample_images  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", default=str(current().release_dir), help="the release to serve (SKIN_RELEASE_DIR)")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--pg-admin-url", default=None, help="PostgreSQL server to create a scratch database on")
    args = p.parse_args()
    images = sample_images(50)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        meta, mar = build_mar(Path(args.release), tmp)
        name = meta.name
        spool = tmp / "spool"
        on = TorchServe(tmp, {name: mar.name}, tmp / "on", free_port(), free_port(), free_port(),
                        env={"SKIN_SPOOL_DIR": str(spool)})
        off = TorchServe(tmp, {name: mar.name}, tmp / "off", free_port(), free_port(), free_port(),
                         env={"SKIN_SPOOL_DIR": ""})
        side_env = {**os.environ, "SKIN_SPOOL_DIR": str(spool), "SKIN_DATA_DIR": str(tmp / "data")}
        scratch = None
        if args.pg_admin_url:
            import psycopg2

            scratch = f"skin_bench_{os.getpid()}"
            admin = psycopg2.connect(args.pg_admin_url)
            admin.autocommit = True
            admin.cursor().execute(f"CREATE DATABASE {scratch}")
            side_env["DATABASE_URL"] = args.pg_admin_url.rsplit("/", 1)[0] + f"/{scratch}"
        else:
            side_env.pop("DATABASE_URL", None)
        sidecar = subprocess.Popen([sys.executable, "-m", "logger", "run", "--interval", "0.2"], cwd=REPO,
                                   env=side_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for ts in (on, off):
                ts.start()
            for ts in (on, off):
                ts.wait_ready(min_workers=2)
            lat = {"on": [], "off": []}
            session = requests.Session()
            for i in range(args.requests + 20):
                for label, ts in (("on", on), ("off", off)) if i % 2 else (("off", off), ("on", on)):
                    t0 = time.perf_counter()
                    r = session.post(f"{ts.inference_url}/predictions/{name}", data=images[i % len(images)], timeout=60,
                                     headers=ts.headers())
                    r.raise_for_status()
                    if i >= 20:  # warm-up excluded
                        lat[label].append((time.perf_counter() - t0) * 1000)
            time.sleep(2)
            rows = subprocess.run([sys.executable, "-m", "logger", "status"], cwd=REPO, env=side_env,
                                  capture_output=True, text=True).stdout
        finally:
            sidecar.terminate()
            sidecar.wait(timeout=20)
            for ts in (on, off):
                ts.stop()
            if scratch:
                admin.cursor().execute(f"DROP DATABASE IF EXISTS {scratch} WITH (FORCE)")
                admin.close()
    print(f"{args.requests} sequential requests per setup, interleaved; real HAM10000 JPEGs; "
          f"sidecar database: {'PostgreSQL' if args.pg_admin_url else 'SQLite'}")
    print("| audit trail | p50 ms | p95 ms | mean ms |\n|---|---|---|---|")
    for label in ("off", "on"):
        v = lat[label]
        print(f"| {label:11} | {statistics.median(v):6.1f} | {pct(v, 95):6.1f} | {statistics.fmean(v):7.1f} |")
    print(f"p50 ratio on/off: {statistics.median(lat['on']) / statistics.median(lat['off']):.3f}")
    print("sidecar status after the run:", " ".join(rows.split()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
