"""Cost of a Grad-CAM explanation next to a plain prediction, same server, same images, one run.

    .venv/bin/python bench/explanations.py [--release release] [--images 40]
"""
from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import requests  # noqa: E402

from stack.torchserve import TorchServe, free_port  # noqa: E402
from stack.archive import build_mar  # noqa: E402
from stack.settings import current, sample_images  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", default=str(current().release_dir), help="the release to serve (SKIN_RELEASE_DIR)")
    p.add_argument("--images", type=int, default=40)
    args = p.parse_args()
    images = sample_images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        meta, mar = build_mar(Path(args.release), Path(tmp))
        ts = TorchServe(Path(tmp), {meta.name: mar.name}, Path(tmp) / "ts", free_port(), free_port(),
                        free_port()).start()
        try:
            ts.wait_ready(min_workers=2)
            s = requests.Session()
            lat = {"predictions": [], "explanations": []}
            sizes = []
            for i, data in enumerate(images + images[:5]):
                for kind in ("predictions", "explanations"):
                    t0 = time.perf_counter()
                    r = s.post(f"{ts.inference_url}/{kind}/{meta.name}", data=data, timeout=60, headers=ts.headers())
                    r.raise_for_status()
                    if i >= 5:
                        lat[kind].append((time.perf_counter() - t0) * 1000)
                    if kind == "explanations" and i >= 5:
                        sizes.append(len(base64.b64decode(r.json()["explanation"]["image_png_base64"])))
        finally:
            ts.stop()
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    print(f"{len(lat['predictions'])} real 200x150 HAM10000 JPEGs, one client, model {meta.version}")
    print("| endpoint | p50 ms | max ms |\n|---|---|---|")
    for k, v in lat.items():
        print(f"| /{k} | {p50[k]:.1f} | {max(v):.1f} |")
    print(f"explanation/prediction p50 ratio {p50['explanations'] / p50['predictions']:.2f}; overlay PNG "
          f"{statistics.median(sizes) / 1024:.0f} KiB median, {max(sizes) / 1024:.0f} KiB max")
    return 0


if __name__ == "__main__":
    sys.exit(main())
