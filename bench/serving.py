"""End-to-end TorchServe latency/throughput next to the same pipeline in-process, in one run, as ratios.

    .venv/bin/python bench/serving.py [--release release] [--clients 8] [--requests 240]

In-process single = one image at a time through preprocess_bytes + the model (all cores);
in-process batched = the same in batches of 8. TorchServe = real HTTP against 2 workers x 1 thread, batch 4.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import requests  # noqa: E402
import torch  # noqa: E402

from skinmodel.answers import format_prediction  # noqa: E402
from skinmodel.networks import build_model, load_state_dict_file  # noqa: E402
from skinmodel.preprocessing import preprocess_bytes  # noqa: E402
from stack.torchserve import TorchServe, free_port  # noqa: E402
from stack.archive import build_mar  # noqa: E402
from stack.settings import current, sample_images  # noqa: E402


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def summarize(name, latencies_ms, wall_s, n):
    return {"name": name, "n": n, "p50_ms": statistics.median(latencies_ms), "p95_ms": pct(latencies_ms, 95),
            "p99_ms": pct(latencies_ms, 99), "throughput_rps": n / wall_s}


def in_process(meta, weights, images, batch):
    model = build_model(meta.arch, meta.num_classes)
    model.load_state_dict(load_state_dict_file(weights))
    model.eval()
    cfg = meta.preprocessing
    lat, started = [], time.perf_counter()
    for i in range(0, len(images), batch):
        t0 = time.perf_counter()
        x = torch.stack([preprocess_bytes(b, cfg) for b in images[i:i + batch]])
        with torch.inference_mode():
            probs = torch.softmax(model(x), 1)
        _ = [json.dumps(format_prediction(p.tolist(), meta)) for p in probs]
        lat += [(time.perf_counter() - t0) * 1000] * len(x)
    return lat, time.perf_counter() - started


def over_http(url, images, clients, headers=None):
    session = requests.Session()

    def one(data):
        t0 = time.perf_counter()
        r = (session if clients == 1 else requests).post(url, data=data, timeout=60, headers=headers)
        r.raise_for_status()
        return (time.perf_counter() - t0) * 1000

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lat = list(pool.map(one, images))
    return lat, time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", default=str(current().release_dir), help="the release to serve (SKIN_RELEASE_DIR)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=240)
    args = p.parse_args()
    release = Path(args.release)
    images = sample_images(args.requests)
    if not images:
        print("HAM10000 images not found (set HAM10000_DIR)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        meta, mar = build_mar(release, Path(tmp))
        ts = TorchServe(Path(tmp), {meta.name: mar.name}, Path(tmp) / "ts", free_port(), free_port(), free_port()).start()
        try:
            ts.wait_ready(min_workers=2)
            url = f"{ts.inference_url}/predictions/{meta.name}"
            auth = ts.headers()
            over_http(url, images[:16], 2, auth)  # warm-up
            weights = release / meta.weights_file
            torch.set_num_threads(1)  # what one TorchServe worker gets (OMP_NUM_THREADS=1)
            in_process(meta, weights, images[:16], 1)
            one_thread = summarize("in-process, 1 at a time, 1 thread", *in_process(meta, weights, images, 1), len(images))
            torch.set_num_threads(os.cpu_count() or 1)
            rows = [summarize("in-process, 1 at a time", *in_process(meta, weights, images, 1), len(images)),
                    summarize("in-process, batches of 8", *in_process(meta, weights, images, 8), len(images)),
                    summarize("TorchServe, 1 client", *over_http(url, images, 1, auth), len(images)),
                    summarize(f"TorchServe, {args.clients} clients", *over_http(url, images, args.clients, auth),
                              len(images))]
        finally:
            ts.stop()
    rows.append(one_thread)
    print(f"model {meta.name} {meta.version} ({meta.arch}, {meta.input_size} px), {len(images)} real "
          f"HAM10000 JPEGs per row, {os.cpu_count()} cores, torch threads in-process {torch.get_num_threads()}")
    print(f"| {'setup':34} | p50 ms | p95 ms | p99 ms | req/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']:34} | {r['p50_ms']:6.1f} | {r['p95_ms']:6.1f} | {r['p99_ms']:6.1f} | {r['throughput_rps']:5.1f} |")
    p50_ratio = rows[2]["p50_ms"] / rows[0]["p50_ms"]
    tput_ratio = rows[3]["throughput_rps"] / rows[1]["throughput_rps"]
    print(f"p50 ratio TorchServe(1 client) / in-process(1 at a time): {p50_ratio:.2f} (target <= 1.15)")
    print(f"p50 ratio TorchServe(1 client) / in-process(1 at a time, 1 thread like a worker): "
          f"{rows[2]['p50_ms'] / one_thread['p50_ms']:.2f}")
    print(f"throughput ratio TorchServe({args.clients} clients) / in-process(batched): {tput_ratio:.2f} (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
