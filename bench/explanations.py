"""Cost of a Grad-CAM explanation next to a plain prediction, same server, same images, one run.

    .venv/bin/python bench/explanations.py [--release release] [--images 40]
"""
from __future__ import annotations

import argparse
import base64
import json
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

from stack.torchserve import TorchServe, free_port  # noqa: E402
from training.data import default_data_dir  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", default=str(REPO / "release"))
    p.add_argument("--images", type=int, default=40)
    args = p.parse_args()
    meta = json.loads((Path(args.release) / "meta.json").read_text())
    images = [f.read_bytes() for f in sorted((default_data_dir() / "images").glob("*.jpg"))[: args.images]]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(REPO / "archive.sh"), "--weights-dir", args.release, "--out", tmp], check=True,
                       capture_output=True, env={**os.environ, "PYTHON": sys.executable})
        ts = TorchServe(Path(tmp), {meta["name"]: f"{meta['name']}.mar"}, Path(tmp) / "ts", free_port(), free_port(),
                        free_port()).start()
        try:
            ts.wait_ready(min_workers=2)
            s = requests.Session()
            lat = {"predictions": [], "explanations": []}
            sizes = []
            for i, data in enumerate(images + images[:5]):
                for kind in ("predictions", "explanations"):
                    t0 = time.perf_counter()
                    r = s.post(f"{ts.inference_url}/{kind}/{meta['name']}", data=data, timeout=60, headers=ts.headers())
                    r.raise_for_status()
                    if i >= 5:
                        lat[kind].append((time.perf_counter() - t0) * 1000)
                    if kind == "explanations" and i >= 5:
                        sizes.append(len(base64.b64decode(r.json()["explanation"]["image_png_base64"])))
        finally:
            ts.stop()
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    print(f"{len(lat['predictions'])} real 200x150 HAM10000 JPEGs, one client, model {meta['version']}")
    print(f"| endpoint | p50 ms | max ms |\n|---|---|---|")
    for k, v in lat.items():
        print(f"| /{k} | {p50[k]:.1f} | {max(v):.1f} |")
    print(f"explanation/prediction p50 ratio {p50['explanations'] / p50['predictions']:.2f}; overlay PNG "
          f"{statistics.median(sizes) / 1024:.0f} KiB median, {max(sizes) / 1024:.0f} KiB max")
    return 0


if __name__ == "__main__":
    sys.exit(main())
