"""Test-time augmentation at serving, measured before it is built: the serving handler in this process (decoding,
preprocessing, temperature, dermoscopy check, verdicts as served) with its network's logits averaged over the first
k of the 8 dihedral views (flips and right-angle rotations; dermoscopy has no up or down), side by side for each k
in one run. Printed per k: on the lesion-grouped validation split, balanced accuracy, macro-F1 and accuracy (a
refused image counts as a miss), the share of answers whose top class differs from one view's; and the median
single-image latency of the network's forward passes, with its ratio to one view.

    .venv/bin/python bench/test_time_augmentation.py [--release release] [--views 1 2 4 8] [--limit-per-class N]

Validation only: this is the measurement a choice to serve with k views would be made on. The release's
temperature was fitted for one view; a served k would need its own (and its own concern threshold), so calibration
is not compared here. The dermoscopy check reads the unturned view's features, as it would when served.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from stack.settings import current, ham10000_dir  # noqa: E402
from training.common.device import describe_cpu  # noqa: E402
from training.evaluation.evaluate_release import REFUSED, _metrics_with_refusals  # noqa: E402
from training.evaluation.labelled import load_labelled  # noqa: E402

VIEWS = 8


def dihedral(x: torch.Tensor, i: int) -> torch.Tensor:
    """View i of 8 (0: the image as it is; then the horizontal flip, then the quarter turns and their flips)."""
    turned = torch.rot90(x, i // 2, (2, 3))
    return turned.flip(3) if i % 2 else turned


class MeanOfViews(nn.Module):
    """The mean logits of the first k views. The unturned view runs last, so that the hook on `fc` the handler
    reads the dermoscopy check's features from keeps that view's."""

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        self.model, self.fc, self.k = model, model.fc, k

    def forward(self, x):
        return torch.stack([self.model(dihedral(x, i)) for i in reversed(range(self.k))]).mean(0)


def score(handler, items, k: int, batch: int = 32) -> list[dict]:
    network = handler.model
    handler.model = MeanOfViews(network, k)
    try:
        answers = []
        for i in range(0, len(items), batch):
            answers += handler.answer([it.path.read_bytes() for it in items[i:i + batch]])
        return answers
    finally:
        handler.model = network


def latency_ms(model: nn.Module, k: int, size: int, runs: int) -> float:
    x = torch.randn(1, 3, size, size)
    wrapped = MeanOfViews(model, k).eval()
    times = []
    with torch.inference_mode():
        for i in range(runs + 3):
            t = time.perf_counter()
            wrapped(x)
            if i >= 3:  # warm-up runs aside
                times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", default=str(current().release_dir), help="the release (default: the served one)")
    p.add_argument("--views", type=int, nargs="+", default=[1, 2, 4, 8], choices=range(1, VIEWS + 1),
                   metavar="K", help="view counts to compare, each 1..8, besides 1 (default: 1 2 4 8)")
    p.add_argument("--limit-per-class", type=int, default=None,
                   help="a quick run: at most N images per class before the split")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a TorchServe worker's)")
    p.add_argument("--latency-runs", type=int, default=50)
    args = p.parse_args(argv)
    data = ham10000_dir()
    if data is None:
        p.error("HAM10000 not found: set HAM10000_DIR or put it at ../shared/data/ham10000")
    import logging

    logging.getLogger("ts").setLevel(logging.ERROR)  # TorchServe's import-time notes
    from handler.skin_handler import SkinLesionHandler

    torch.set_num_threads(args.threads)
    handler = SkinLesionHandler.in_process(Path(args.release))
    items = load_labelled(data, "val", limit_per_class=args.limit_per_class)
    y = np.array([it.label for it in items])
    names = list(handler.meta.class_names)
    print(f"{handler.meta.name} {handler.meta.version}, {len(items)} validation images, {args.threads} thread(s); "
          f"{describe_cpu()}")
    print("| views | balanced accuracy | macro-F1 | accuracy | top class differs from 1 view | latency ms (p50) "
          "| ratio |\n|---|---|---|---|---|---|---|")
    first_top, first_ms = None, None
    for k in sorted({1, *args.views}):  # one view first: the row the others are compared with
        answers = score(handler, items, k)
        answered = np.array([a.get("verdict") in ("ok", "uncertain") for a in answers])
        top = np.array([names.index(a["top"]["code"]) if a.get("top") else REFUSED for a in answers])
        m = _metrics_with_refusals(y, np.where(answered, top, REFUSED), names)
        first_top = top if first_top is None else first_top
        ms = latency_ms(handler.model, k, handler.cfg.crop_size, args.latency_runs)
        first_ms = first_ms or ms
        print(f"| {k} | {m['balanced_accuracy']:.4f} | {m['macro_f1']:.4f} | {m['accuracy']:.4f} | "
              f"{(top != first_top).mean():.1%} | {ms:.1f} | {ms / first_ms:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
