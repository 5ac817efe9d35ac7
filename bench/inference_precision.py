"""A release's network on the CPU in each inference precision, side by side in one run: fp32 (as served), fp32
channels_last, bf16 autocast + channels_last (oneDNN's AMX / AVX512-BF16 kernels where the CPU has them), and the
int8 variant (release/int8, post-training static quantization). For each: images/s at batch 1 and batch 8 on the
threads a TorchServe worker gets (one by default), and on the lesion-grouped test split: balanced accuracy, the
share of top-1 answers that differ from fp32's, the largest calibrated-probability difference, and the test lesions
the dermoscopy check refuses with that precision's features.

    .venv/bin/python bench/inference_precision.py --release release [--int8 release/int8] [--threads 1]

The ratios against fp32 are what to read on a noisy machine; the choice of the served default is made on them.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from skinmodel.networks import (build_model, check_inputs, dermoscopy_check_score, features_and_logits,  # noqa: E402
                                load_check_statistics, load_state_dict_file)
from skinmodel.preprocessing import normalize  # noqa: E402
from skinmodel.release import ReleaseMeta  # noqa: E402
from stack.settings import current  # noqa: E402
from training.common import data as D  # noqa: E402
from training.common.device import describe_cpu, native_bf16  # noqa: E402
from training.common.metrics import classification_metrics  # noqa: E402
from training.release.quantize import throughput  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--release", default=str(current().release_dir), help="release folder (SKIN_RELEASE_DIR)")
    p.add_argument("--int8", default=None, help="its int8 variant (default: RELEASE/int8 when it exists)")
    p.add_argument("--data", help="HAM10000 folder (default: $HAM10000_DIR, else ../shared/data/ham10000)")
    p.add_argument("--cache-dir", default="runs/cache", help="decoded-image cache")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a TorchServe worker here has one)")
    p.add_argument("--seconds", type=float, default=3.0, help="timing per row and batch size")
    return p


def load(folder: Path) -> tuple[torch.nn.Module, ReleaseMeta]:
    meta = ReleaseMeta.load(folder)
    net = build_model(meta.arch, meta.num_classes)
    net.load_state_dict(load_state_dict_file(folder / meta.weights_file))
    return net.eval(), meta


def variants(release: Path, int8: Path | None) -> dict:
    """name -> (network, input memory format, autocast context factory)."""
    fp32, _ = load(release)
    fp32_cl, _ = load(release)
    fp32_cl = fp32_cl.to(memory_format=torch.channels_last)
    out = {"fp32 (served)": (fp32, torch.contiguous_format, contextlib.nullcontext),
           "fp32 channels_last": (fp32_cl, torch.channels_last, contextlib.nullcontext),
           "bf16 autocast, channels_last": (fp32_cl, torch.channels_last,
                                            lambda: torch.autocast("cpu", dtype=torch.bfloat16))}
    if int8 is not None and (int8 / "meta.json").exists():
        out["int8 (release/int8)"] = (load(int8)[0], torch.contiguous_format, contextlib.nullcontext)
    return out


def scored(net, fmt, ctx, x_uint8: torch.Tensor, colour: torch.Tensor, meta: ReleaseMeta, stats: dict | None):
    """Calibrated probabilities and check scores of the test images (colour: their colour statistics; fp32 out of
    every precision)."""
    cfg, probs, scores = meta.preprocessing, [], []
    with torch.inference_mode(), ctx():
        for i in range(0, len(x_uint8), 128):
            x = normalize(x_uint8[i:i + 128], cfg.mean, cfg.std).contiguous(memory_format=fmt)
            f, logits = (t.float() for t in features_and_logits(net, x))
            probs.append((logits / meta.temperature).softmax(1))
            if stats is not None:
                with torch.autocast("cpu", enabled=False):  # the check scores in fp32 whatever the network ran in
                    scores.append(dermoscopy_check_score(check_inputs(f, colour[i:i + 128]), stats))
    return torch.cat(probs), (torch.cat(scores) if scores else None)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    release = Path(args.release)
    int8 = Path(args.int8) if args.int8 else release / "int8"
    meta = ReleaseMeta.load(release)
    cfg = meta.preprocessing
    data = D.DataConfig(data=args.data, cache_dir=args.cache_dir, split_seed=meta.training["args"]["split_seed"])
    test = D.load_split(data).part("test")
    x = D.build_cache(test, "eval", cfg, data.cache, "decode test")
    y = np.array([r.label for r in test])
    colour = D.colour_statistics_of(test, cfg)
    check = meta.dermoscopy_check or {}
    path = meta.check_stats_path(release)
    stats = load_check_statistics(path) if path else None
    print(f"{meta.name} {meta.version}, {meta.arch}, {cfg.crop_size} px, {len(test)} test images, "
          f"{args.threads} thread(s); native bf16 here: {native_bf16(torch.device('cpu'))} ({describe_cpu()})",
          flush=True)
    rows, reference = {}, None
    for name, (net, fmt, ctx) in variants(release, int8).items():
        probs, scores = scored(net, fmt, ctx, x, colour, meta, stats)
        reference = probs if reference is None else reference
        m = classification_metrics(y, probs.argmax(1).numpy(), D.CLASS_NAMES)
        rows[name] = {
            "batch 1": throughput(net, cfg.crop_size, 1, args.seconds, fmt, ctx),
            "batch 8": throughput(net, cfg.crop_size, 8, args.seconds, fmt, ctx),
            "balanced_accuracy": m["balanced_accuracy"],
            "top1_differs": float((probs.argmax(1) != reference.argmax(1)).float().mean()),
            "max_prob_diff": float((probs - reference).abs().max()),
            "refused": None if scores is None else float((scores > check["refuse_above"]).float().mean())}
    base = rows["fp32 (served)"]
    print("| precision | images/s, batch 1 | x fp32 | images/s, batch 8 | x fp32 | balanced acc. | top-1 differs "
          "from fp32 | max prob. diff | test lesions refused |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        refused = "-" if r["refused"] is None else f"{r['refused']:.1%}"
        print(f"| {name} | {r['batch 1']:.0f} | {r['batch 1'] / base['batch 1']:.2f} | {r['batch 8']:.0f} | "
              f"{r['batch 8'] / base['batch 8']:.2f} | {r['balanced_accuracy']:.3f} | {r['top1_differs']:.1%} | "
              f"{r['max_prob_diff']:.3f} | {refused} |")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
