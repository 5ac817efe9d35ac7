"""Worst cases of the decoder, per accepted format: bytes in, CPU ms and memory of one preprocess_bytes call.

Each construction (stress/bombs.py) is decoded in a fresh child process (so peak memory is its own), under an
address-space cap and a time limit. A normal HAM10000-sized photo is measured in the same run as the yardstick.
With --before REV the same payloads also go through the decoder of git revision REV, side by side.

    .venv/bin/python bench/decode_worst_case.py [--before main] [--only NAME ...] [--limit-s 60]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from stress import bombs  # noqa: E402

MEMORY_CAP = 6 * 2**30  # per child: a bomb answers MemoryError instead of taking the machine


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(width: int = 600, height: int = 450) -> Image.Image:
    import numpy as np

    rng = np.random.default_rng(0)
    small = rng.integers(40, 220, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def constructions() -> dict[str, callable]:
    """name -> builder of the payload; the legitimate worst cases (40 MP) next to the hostile ones."""
    side = 6300  # 39.7 MP: just under the pixel cap
    return {
        "normal 600x450 JPEG (yardstick)": lambda: _save(_photo(), "JPEG", quality=90),
        "JPEG 40 MP, 9.9 MB": bombs.large_jpeg,
        "JPEG progressive 40 MP": lambda: _save(_photo(side, side), "JPEG", progressive=True, quality=90),
        "JPEG 10,000 scans": bombs.progressive_scan_bomb,
        "JPEG 10,000 scans labelled MPO": bombs.mpo_scan_bomb,
        "JPEG 2.6 M COM segments": bombs.jpeg_marker_flood,
        "JPEG 10 MiB of fill bytes": lambda: bombs.jpeg_marker_flood(filler=b"\xff"),
        "PNG 40 MP": lambda: bombs.png_with_size(side, side),
        "PNG 400000x1": lambda: bombs.png_with_size(400_000, 1),
        "PNG 8 MB eXIf, Orientation 6": bombs.png_exif_bomb,
        "PNG 16 zTXt inflating to 1 MB each": bombs.png_text_bomb,
        "PNG 64 zTXt inflating to 1 MB each": lambda: bombs.png_text_bomb(64),
        "PNG 870 k empty IDAT chunks": bombs.png_chunk_flood,
        "WebP 8 MB EXIF, Orientation 6": bombs.webp_exif_bomb,
        "WebP 16383x2441": lambda: _save(Image.new("RGB", (16383, 2441), (90, 60, 40)), "WEBP", quality=50),
        "TIFF float 5400x5400 deflate": bombs.float_tiff,
        "TIFF 1x2 listing 1.3 M strips": bombs.tiff_strip_flood,
        "TIFF 40 MP 1-bit raw in 155 k 16x16 tiles": bombs.tiff_tiny_tiles,
        "TIFF 40 MP 1-bit raw in 9.9 k 64x64 tiles": lambda: bombs.tiff_tiny_tiles(tile=64),
        "TIFF 40 MP, JPEG strip of 99 scans": bombs.tiff_jpeg_scan_bomb,
        "TIFF 40 MP, JPEG strip of 32 scans": lambda: bombs.tiff_jpeg_scan_bomb(scans=32),
        "BMP RLE8 20000x2000": bombs.bmp_rle_bomb,
        "BMP RLE4 20000x2000": lambda: bombs.bmp_rle_bomb(rle4=True),
        "BMP 1-bit 40 MP": lambda: _save(Image.new("1", (side, side), 1), "BMP"),
        "BMP 24-bit 3.4 MP": lambda: _save(_photo(2130, 1600), "BMP"),
    }


_CHILD = r"""
import pickle, resource, sys, time
path, cap = sys.argv[1], int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from skinmodel.preprocessing import InputError, PreprocessConfig, preprocess_bytes
data = open(path, "rb").read()
cfg = PreprocessConfig(96, 96, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
from PIL import Image
import io, gc
warm = io.BytesIO()
Image.new("RGB", (64, 48)).save(warm, "PNG")
preprocess_bytes(warm.getvalue(), cfg)  # first-call costs (lazy imports, allocator) out of the measure
gc.collect()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0, w0 = time.process_time(), time.perf_counter()
try:
    preprocess_bytes(data, cfg)
    result = "200"
except InputError as e:
    result = f"{e.status} {e.code}"
except MemoryError:
    result = "MemoryError"
except Exception as e:
    result = type(e).__name__
cpu, wall = time.process_time() - t0, time.perf_counter() - w0
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
print(repr((result, cpu * 1000, wall * 1000, grew)))
"""


def measure(data_path: str, pythonpath: str, limit_s: float) -> tuple[str, float, float, float]:
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, data_path, str(MEMORY_CAP)], env=env, cwd=pythonpath,
                             capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return (f"killed after {limit_s:.0f} s", limit_s * 1000, limit_s * 1000, float("nan"))
    if out.returncode != 0 or not out.stdout.strip():
        return (f"crashed rc={out.returncode}", float("nan"), float("nan"), float("nan"))
    import ast

    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def _checkout(rev: str, into: Path) -> str:
    """The project's skinmodel/ as of rev, for a side-by-side 'before' column."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "skinmodel"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return str(into)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", help="also decode with skinmodel/ of this git revision (e.g. main)")
    p.add_argument("--only", nargs="*", help="names (substrings) of the constructions to run")
    p.add_argument("--limit-s", type=float, default=60.0, help="time limit of one decode")
    p.add_argument("--json", help="write the rows to this file as well")
    args = p.parse_args()
    cases = {k: v for k, v in constructions().items() if not args.only or any(s in k for s in args.only)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        before = _checkout(args.before, Path(tmp)) if args.before else None
        print("| construction | bytes in | answer | CPU ms | MB |" + (f" before ({args.before}): answer, CPU ms, MB |"
                                                                       if before else ""))
        print("|---|---|---|---|---|" + ("---|" if before else ""))
        for name, build in cases.items():
            path = Path(tmp) / "payload"
            data = build()
            path.write_bytes(data)
            now = measure(str(path), str(REPO), args.limit_s)
            row = {"name": name, "bytes": len(data), "now": now}
            over = " (over the body cap)" if len(data) > bombs.MAX_BODY else ""
            line = f"| {name} | {len(data):,}{over} | {now[0]} | {now[1]:.0f} | {now[3]:.0f} |"
            if before:
                row["before"] = old = measure(str(path), before, args.limit_s)
                line += f" {old[0]}, {old[1]:.0f} ms, {old[3]:.0f} MB |"
            rows.append(row)
            print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
