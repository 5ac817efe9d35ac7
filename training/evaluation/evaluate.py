"""One test table for every model on the lesion-grouped test split: report.md, results.json, confusion PNGs."""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from training.common import data as D
from training.common.checkpoint import StudyError, checkpoint_preprocessing, models_from_spec
from training.common.device import add_device_args, resolve_device
from training.common.metrics import classification_metrics, predict_logits
from training.common.plots import plot_confusion

TABLE_COLUMNS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate checkpoints on the lesion-grouped test split (never used for "
                                            "any choice). A release on any labelled set, as served: "
                                            "python -m training evaluate-release (evaluate --release is kept as its "
                                            "old spelling).", add_help=add_help)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", action="append", metavar="NAME=CKPT[+CKPT]",
                       help="a model to evaluate; several checkpoints joined by + are evaluated as an ensemble")
    which.add_argument("--release", help="the old spelling of python -m training evaluate-release --release")
    p.add_argument("--split", choices=D.SPLITS, help="with --release and the HAM10000 folder: that part of the "
                                                    "study's lesion-grouped split (with its age/sex/site metadata)")
    D.add_data_args(p, sizes=False)
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--latency-runs", type=int, default=30, help="single-image forward passes timed per model")
    p.add_argument("--command", default="", help="the command line to record in the report")
    add_device_args(p)
    return p


def slug(name: str) -> str:
    """'teacher: resnet18' -> 'teacher_resnet18': file names without spaces, colons or brackets."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def cpu_latency_ms(model, crop: int, runs: int) -> float:
    """Median wall time of one single-image forward pass at the current torch thread count."""
    x = torch.randn(1, 3, crop, crop)
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def evaluate(data: D.DataConfig, models: dict[str, str], out: Path, latency_runs: int = 30,
             command: str = "", device: str = "auto") -> dict:
    """Every model (name -> checkpoint, or checkpoints joined by +) on the test split, never used for a choice:
    report.md, results.json and a confusion matrix per model in OUT."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data.use_threads()
    split = D.load_split(data)
    split_hash = D.write_splits(split.records, out / "splits.csv")
    train, test = split.part("train"), split.part("test")
    y_test = np.array([r.label for r in test])
    results = {"split_hash": split_hash, "n_test_images": len(test), "n_test_lesions": len({r.lesion_id for r in test}),
               "test_class_counts": dict(zip(D.CLASS_NAMES, D.class_counts(test))),
               "torch_threads": torch.get_num_threads(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": command, "models": {}}
    majority = Counter(r.label for r in train).most_common(1)[0][0]
    results["models"]["majority class (always nv)"] = {
        **classification_metrics(y_test, np.full(len(test), majority), D.CLASS_NAMES), "size_mb": 0.0, "latency_ms": 0.0}
    for name, paths in models.items():
        model, ckpt = models_from_spec(paths)
        size_mb = sum(p.numel() * p.element_size() for p in model.state_dict().values()) / 2**20
        if ckpt["split_hash"] != split_hash:
            raise StudyError(f"{name} was trained on another split (hash {ckpt['split_hash'][:12]} != "
                             f"{split_hash[:12]}): its test numbers would not be honest")
        cfg = checkpoint_preprocessing(ckpt)
        x_test = D.build_cache(test, "eval", cfg, data.cache, "decode test")
        logits = predict_logits(model.to(resolve_device(device)), x_test, cfg.mean, cfg.std)
        model.cpu()  # latency is the serving CPU's
        m = classification_metrics(y_test, logits.argmax(1).numpy(), D.CLASS_NAMES)
        m.update(size_mb=round(size_mb, 2), latency_ms=round(cpu_latency_ms(model, cfg.crop_size, latency_runs), 2),
                 arch=ckpt["arch"], checkpoint=paths, input_size=cfg.crop_size, preprocessing=cfg.to_dict(),
                 test_nll=float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y_test))))
        results["models"][name] = m
        plot_confusion(m["confusion_matrix"], D.CLASS_NAMES, name, out / f"confusion_{slug(name)}.png")
        print(f"{name:28} acc {m['accuracy']:.3f}  bal-acc {m['balanced_accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(render_report(results))
    print(f"wrote {out / 'report.md'} and {out / 'results.json'}")
    return results


def render_table(results: dict) -> str:
    head = ["model", *TABLE_COLUMNS, *[f"recall {c}" for c in D.CLASS_NAMES], "size MB", "CPU ms/img"]
    lines = ["| " + " | ".join(h.replace("_", " ") for h in head) + " |", "|" + "---|" * len(head)]
    for name, m in results["models"].items():
        cells = [name, *[f"{m[k]:.3f}" for k in TABLE_COLUMNS],
                 *[f"{m['per_class_recall'][c]:.2f}" for c in D.CLASS_NAMES], f"{m['size_mb']:.1f}", f"{m['latency_ms']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(results: dict) -> str:
    counts = ", ".join(f"{c} {n}" for c, n in results["test_class_counts"].items())
    return f"""# HAM10000 test report

Test split: {results['n_test_images']} images of {results['n_test_lesions']} lesions ({counts}); grouped by
`lesion_id`, so no lesion of the test split was seen in training or used for any choice (checkpoint, teacher,
alpha/T were all chosen on the validation split). Split sha256 `{results['split_hash']}`.
Evaluation is deterministic: the shared preprocessing (resize shorter side, centre crop, normalise), no test-time
augmentation (but for a teacher named "+ TTA": the mean of its 8 flipped and rotated views). Latency: median single-image forward pass on this CPU with {results['torch_threads']} torch thread(s).
Generated {results['date']} by `{results['command'] or 'python -m training evaluate ...'}`.

{render_table(results)}

Balanced accuracy is the mean per-class recall; macro-F1 is the unweighted mean of per-class F1 (the reference
project's "F1" was a harmonic mean of weighted precision and recall, not comparable).
"""


def main(args: argparse.Namespace) -> dict:
    if args.release:  # the old spelling of evaluate-release
        from training.evaluation import evaluate_release

        return evaluate_release.main(args)
    models = dict(spec.partition("=")[::2] for spec in args.model)
    return evaluate(D.DataConfig.from_args(args), models, Path(args.out), args.latency_runs, args.command,
                    args.device)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
