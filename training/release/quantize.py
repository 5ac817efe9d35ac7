"""int8 ResNet18 with PyTorch's own post-training static quantization, and an fp32-vs-int8 comparison.

    python -m training quantize --release release --out release/int8

Fuses conv+bn+relu, calibrates activation ranges on training images (never test), converts, saves a plain
int8 state_dict + meta.json (arch "resnet18_int8") that the same handler serves. The comparison (size, CPU
throughput, test metrics) is measured side by side in one run and written to int8_comparison.json/.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from skinmodel.networks import (build_model, check_inputs, dermoscopy_check_score, features_and_logits,
                                load_check_statistics, load_state_dict_file, quantizable_resnet18)
from skinmodel.preprocessing import normalize
from skinmodel.release import ReleaseMeta
from training.release.concern import fit_concern
from training.release.model_card import write_variant_card
from training.common import data as D
from training.common.checkpoint import StudyError, atomic_save
from training.common.metrics import classification_metrics, predict_logits
from training.dermoscopy.check import SCORES_PNG


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Quantize the release ResNet18 to int8 and compare it with fp32.",
                                add_help=add_help)
    p.add_argument("--release", required=True, help="fp32/fp16 release folder (meta.json + weights)")
    p.add_argument("--out", required=True, help="folder for the int8 weights + meta.json")
    D.add_data_args(p, sizes=False, threads=1)  # the throughput comparison runs on one thread, as a worker has
    p.add_argument("--calibration-images", type=int, default=512)
    return p


def throughput(model, crop: int, batch: int = 8, seconds: float = 4.0, memory_format=torch.contiguous_format,
               context=contextlib.nullcontext) -> float:
    """Images/s of forward passes on random inputs (memory_format and context, e.g. an autocast, as served)."""
    x = torch.randn(batch, 3, crop, crop).contiguous(memory_format=memory_format)
    with torch.inference_mode(), context():
        for _ in range(3):
            model(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += batch
    return n / (time.perf_counter() - t0)


def quantize(release: Path, out: Path, data: D.DataConfig, calibration_images: int = 512) -> dict:
    """OUT: an int8 release of release's ResNet18 (weights, meta.json, the dermoscopy check's statistics and model
    card) and the fp32-vs-int8 comparison; returns the comparison."""
    release, out = Path(release), Path(out)
    meta = ReleaseMeta.load(release)
    if meta.arch != "resnet18":
        raise StudyError(f"int8 export supports resnet18, not {meta.arch}")
    cfg = meta.preprocessing
    fp32 = build_model("resnet18", meta.num_classes)
    fp32.load_state_dict(load_state_dict_file(release / meta.weights_file))
    fp32.eval()
    split = D.load_split(data)
    cache = data.cache
    train = split.part("train")[:calibration_images]
    test = split.part("test")
    model = quantizable_resnet18(meta.num_classes, fp32.state_dict())
    with torch.inference_mode():  # observers record activation ranges on training images
        x_cal = normalize(D.build_cache(train, "eval", cfg, cache, "decode calibration"), cfg.mean, cfg.std)
        for i in range(0, len(x_cal), 64):
            model(x_cal[i:i + 64])
    int8 = torch.ao.quantization.convert(model)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save(int8.state_dict(), out / "model.pt")
    # the saved file must load into the structure the handler builds
    reloaded = build_model("resnet18_int8", meta.num_classes)
    reloaded.load_state_dict(load_state_dict_file(out / "model.pt"))
    reloaded.eval()

    data.use_threads()
    x_test = D.build_cache(test, "eval", cfg, cache, "decode test")
    y = [r.label for r in test]
    colour = D.colour_statistics_of(test, cfg)
    rows = {}
    for name, net, path in (("fp32", fp32, release / meta.weights_file), ("int8", reloaded, out / "model.pt")):
        with torch.inference_mode():
            logits = predict_logits(net, x_test, cfg.mean, cfg.std)
        m = classification_metrics(y, logits.argmax(1).numpy(), D.CLASS_NAMES)
        rows[name] = {"file_mb": path.stat().st_size / 2**20, "images_per_s": throughput(net, cfg.crop_size),
                      "balanced_accuracy": m["balanced_accuracy"], "macro_f1": m["macro_f1"], "accuracy": m["accuracy"],
                      "not_dermoscopy": check_refusals(net, x_test, colour, release, meta)}
    drop = rows["fp32"]["balanced_accuracy"] - rows["int8"]["balanced_accuracy"]
    speed = rows["int8"]["images_per_s"] / rows["fp32"]["images_per_s"]
    meets = rows["int8"]["file_mb"] <= 12 and speed >= 2 and drop <= 0.01
    comparison = {"rows": rows, "speedup": speed, "balanced_accuracy_drop": drop, "meets_targets": meets,
                  "threads": data.threads or 1,
                  "targets": "<= 12 MB, >= 2x throughput, <= 1 point balanced-accuracy drop"}
    int8_meta = dataclasses.replace(
        meta, arch="resnet18_int8", weights_dtype="int8", version=meta.version + "-int8",
        weights_sha256=hashlib.sha256((out / "model.pt").read_bytes()).hexdigest(),
        quantization={"method": "post-training static (torch.ao.quantization, fbgemm/x86), "
                                f"{len(train)} training images for calibration", **comparison},
        metrics={**meta.metrics, "test": {**(meta.metrics.get("test") or {}),
                                          **{k: rows["int8"][k] for k in ("balanced_accuracy", "macro_f1", "accuracy")}}})
    for extra in (meta.check_stats_path(release), release / SCORES_PNG):
        if extra is not None and extra.exists():
            shutil.copy(extra, out / extra.name)
    int8_meta.save(out)
    if meta.concern:  # the int8 network's own rule, on its own probabilities
        fit_concern(out, data)
    if (release / "model_card.md").exists():
        write_variant_card(release, out)
    text = write_comparison(rows, comparison, out)
    print(text)
    return comparison


def write_comparison(rows: dict, comparison: dict, out: Path) -> str:
    """int8_comparison.md (a table) and int8_comparison.json beside the int8 weights; returns the table's text."""
    speed, drop = comparison["speedup"], comparison["balanced_accuracy_drop"]
    table = ["| model | file MB | images/s (1 thread, batch 8) | balanced acc. | macro-F1 | test lesions refused |",
             "|---|---|---|---|---|---|"]
    table += [f"| {k} | {v['file_mb']:.1f} | {v['images_per_s']:.0f} | {v['balanced_accuracy']:.3f} | {v['macro_f1']:.3f} "
              f"| {'-' if v['not_dermoscopy'] is None else format(v['not_dermoscopy'], '.1%')} |" for k, v in rows.items()]
    text = "\n".join(table) + (f"\n\nint8/fp32 throughput {speed:.2f}x, balanced-accuracy drop {drop * 100:.1f} points: "
                               f"{'meets' if comparison['meets_targets'] else 'does NOT meet'} the targets "
                               f"({comparison['targets']}).\n")
    (out / "int8_comparison.md").write_text(text)
    (out / "int8_comparison.json").write_text(json.dumps(comparison, indent=2))
    return text


def check_refusals(net, x_uint8: torch.Tensor, colour: torch.Tensor, release: Path, meta: ReleaseMeta) -> float | None:
    """Share of test lesions the dermoscopy check refuses with this network's features (colour: the images' colour
    statistics): the check was fitted on fp32 features, and int8 features must not push real lesions over its
    threshold."""
    check = meta.dermoscopy_check or {}
    if not check.get("stats_file") or "refuse_above" not in check:
        return None
    stats = load_check_statistics(meta.check_stats_path(release))
    cfg, refused = meta.preprocessing, []
    with torch.inference_mode():
        for i in range(0, len(x_uint8), 128):
            feats, _ = features_and_logits(net, normalize(x_uint8[i:i + 128], cfg.mean, cfg.std))
            refused.append(dermoscopy_check_score(check_inputs(feats, colour[i:i + 128]), stats) > check["refuse_above"])
    return float(torch.cat(refused).float().mean())


def main(args: argparse.Namespace) -> dict:
    return quantize(Path(args.release), Path(args.out), D.DataConfig.from_args(args), args.calibration_images)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
