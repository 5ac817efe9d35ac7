"""Which release serves by default, decided on validation only: each release's network as served (its meta.json's
preprocessing, fp32) scored as the recipe search scores a run (training/study/recipe_search.py): validation balanced
accuracy averaged over the plain split and the split under the colour-temperature and brightness shifts (the same
draws for every release), and plain accuracy against always answering `nv`.

    python -m training compare-releases --release release/1.3 runs/study-2.0s/release
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from skinmodel.networks import build_model, load_state_dict_file
from skinmodel.release import ReleaseMeta
from training.common import data as D
from training.common.metrics import classification_metrics, predict_logits
from training.study.recipe_search import SCORE_SHIFTS, _shifted_val


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score releases on validation (plain + shifted) to choose the default.",
                                add_help=add_help)
    p.add_argument("--release", nargs="+", required=True, help="release folders (meta.json + weights)")
    p.add_argument("--json", help="also write the scores here")
    D.add_data_args(p, sizes=False)
    return p


def score_release(folder: Path, data: D.DataConfig) -> dict:
    """Validation balanced accuracy plain and under SCORE_SHIFTS, their mean (the score) and plain accuracy."""
    meta = ReleaseMeta.load(folder)
    split = D.load_split(data)
    if split.hash != meta.split_hash:
        raise SystemExit(f"{folder}: trained on another split than --data / --split-seed make")
    model = build_model(meta.arch, meta.num_classes)
    model.load_state_dict(load_state_dict_file(folder / meta.weights_file))
    cfg, val = meta.preprocessing, split.part("val")
    y = np.array([r.label for r in val])
    sets = {"plain": D.build_cache(val, "eval", cfg, data.cache, "decode val")}
    sets.update({fam: _shifted_val(val, cfg, fam, 40_000_000 + 100_000 * i) for i, fam in enumerate(SCORE_SHIFTS)})
    out = {"version": meta.version, "input_size": meta.input_size,
           "colour_constancy": getattr(cfg, "colour_constancy", "none")}
    for name, x in sets.items():
        m = classification_metrics(y, predict_logits(model.eval(), x, cfg.mean, cfg.std).argmax(1).numpy(),
                                   D.CLASS_NAMES)
        out[name] = m["balanced_accuracy"]
        if name == "plain":
            out["accuracy"], out["macro_f1"] = m["accuracy"], m["macro_f1"]
    out["score"] = float(np.mean([out[k] for k in ("plain", *SCORE_SHIFTS)]))
    return out


def main(args: argparse.Namespace) -> dict:
    data = D.DataConfig.from_args(args)
    data.use_threads()
    scores = {folder: score_release(Path(folder), data) for folder in args.release}
    print("| release | version | input | colour constancy | val balanced acc. | colour temperature | brightness | "
          "score (mean) | val accuracy | val macro-F1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for folder, s in scores.items():
        print(f"| `{folder}` | {s['version']} | {s['input_size']} px | {s['colour_constancy']} | {s['plain']:.3f} | "
              f"{s['colour temperature']:.3f} | {s['brightness']:.3f} | {s['score']:.3f} | {s['accuracy']:.3f} | "
              f"{s['macro_f1']:.3f} |")
    best = max(scores, key=lambda k: scores[k]["score"])
    print(f"highest validation score: {best} ({scores[best]['version']})")
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2))
    return scores


if __name__ == "__main__":
    main(get_args_parser().parse_args())
