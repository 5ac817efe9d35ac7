"""What the page's gate costs a client: the same real HAM10000 JPEGs sent straight to TorchServe (with its
inference key) and through the gate of a running `./skin up`, interleaved, with keep-alive sessions and with
a new connection per request.

    .venv/bin/python bench/proxy_overhead.py [--requests 300]

The hostile-traffic review measured +44 ms per keep-alive request through the old http.server proxy
(p50 76 vs 32 ms): Nagle's algorithm and delayed ACKs on a response written in two pieces.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stress.local_stack import LocalStack  # noqa: E402
from stack.settings import MODEL_NAME, current, sample_images  # noqa: E402

API = f"/predictions/{MODEL_NAME}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", default=str(current().release_dir), help="the release to serve (SKIN_RELEASE_DIR)")
    p.add_argument("--requests", type=int, default=300)
    args = p.parse_args()
    images = sample_images(30)
    with tempfile.TemporaryDirectory() as tmp:
        stack = LocalStack(Path(args.release), Path(tmp)).start()
        try:
            auth = stack.tokens.header("inference")
            targets = {"TorchServe direct": (stack.inference_url + API, auth), "through the gate": (stack.page_url + API, {})}
            lat = {(t, mode): [] for t in targets for mode in ("keep-alive", "new connection")}
            sessions = {t: requests.Session() for t in targets}
            for i in range(args.requests + 20):
                order = list(targets) if i % 2 else list(reversed(targets))
                for target in order:
                    url, headers = targets[target]
                    for mode in ("keep-alive", "new connection"):
                        client = sessions[target] if mode == "keep-alive" else requests
                        t0 = time.perf_counter()
                        r = client.post(url, data=images[i % len(images)], headers=headers, timeout=60)
                        r.raise_for_status()
                        if i >= 20:  # warm-up excluded
                            lat[(target, mode)].append((time.perf_counter() - t0) * 1000)
        finally:
            stack.stop()
    print(f"{args.requests} requests per row, interleaved; real HAM10000 JPEGs; release {args.release}")
    print("| connection | TorchServe direct p50 / p95 ms | through the gate p50 / p95 ms | gate adds (p50) |")
    print("|---|---|---|---|")
    for mode in ("keep-alive", "new connection"):
        d, g = lat[("TorchServe direct", mode)], lat[("through the gate", mode)]
        q = lambda v, k: statistics.quantiles(v, n=20)[k]  # noqa: E731
        print(f"| {mode} | {statistics.median(d):.1f} / {q(d, 18):.1f} | {statistics.median(g):.1f} / {q(g, 18):.1f} | "
              f"{statistics.median(g) - statistics.median(d):+.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
