"""Outlier exposure (Hendrycks et al. 2019) as a short CPU fine-tune after training, measured on VALIDATION sources.

The release's network is fine-tuned (layer4 and fc; the rest frozen, to fit a CPU budget) with the classification
loss on HAM10000 training lesions plus `--weight` x the cross-entropy to the uniform distribution on the fitting
sources' pictures (training/dermoscopy/pool.py). Scored by the maximum softmax probability and by energy. Because this
changes the weights, a winner would not be the release's network: the result is a comparison row, not a release.

Reduced protocol (what fits 2 shared cores): thresholds keep --lesion-keep of the plain validation lesions of every
class (no shifted copies); the release's chosen head is scored the same way beside it, from the cached features.

    python -m training.dermoscopy.outlier_exposure --release release --steps 120 --out runs/oe.json
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from skinmodel.networks import (build_model, dermoscopy_check_score, features_and_logits, load_check_statistics,
                                load_state_dict_file)
from skinmodel.preprocessing import preprocess_bytes
from skinmodel.release import ReleaseMeta
from training.common import data as D
from training.dermoscopy import pool
from training.dermoscopy.features import features
from training.dermoscopy.rejectors import refusal_threshold


def fine_tune(model, lesions: torch.Tensor, labels: torch.Tensor, pictures: torch.Tensor, steps: int,
              weight: float, batch: int = 48, seed: int = 0):
    """A copy of model after `steps` of outlier exposure on layer4 and fc (inputs: normalised tensors)."""
    tuned = copy.deepcopy(model).train()
    for name, p in tuned.named_parameters():
        p.requires_grad = name.startswith(("layer4", "fc"))
    for m in tuned.modules():  # frozen BatchNorm statistics outside layer4
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        i = torch.randint(len(lesions), (batch,), generator=gen)
        j = torch.randint(len(pictures), (batch,), generator=gen)
        flip = torch.rand(batch, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], lesions[i].flip(3), lesions[i])
        logits = tuned(torch.cat([x, pictures[j]]))
        loss = torch.nn.functional.cross_entropy(logits[:batch], labels[i])
        loss = loss + weight * -torch.log_softmax(logits[batch:], 1).mean(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(f"step {step}: loss {float(loss):.3f}", flush=True)
    return tuned.eval()


@torch.no_grad()
def scores(model, x: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    out = {"MSP": [], "energy": []}
    for chunk in torch.split(x, 128):
        _, logits = features_and_logits(model, chunk)
        out["MSP"].append(-(logits / temperature).softmax(1).max(1).values)
        out["energy"].append(-torch.logsumexp(logits, 1))
    return {k: torch.cat(v) for k, v in out.items()}


def _tensors(meta, blobs):
    return torch.stack(list(D.thread_map(lambda b: preprocess_bytes(b, meta.preprocessing), blobs)))


def run(release: Path, steps: int, weight: float, keep: float, cache: Path, seed: int = 0) -> dict:
    meta = ReleaseMeta.load(release)
    model = build_model(meta.arch, meta.num_classes)
    model.load_state_dict(load_state_dict_file(release / meta.weights_file))
    model.eval()
    split = D.load_split(D.DataConfig())
    train, val = split.part("train"), split.part("val")
    rng = np.random.default_rng(seed)
    picked = [train[i] for i in sorted(rng.choice(len(train), min(3000, len(train)), replace=False))]
    lesions = _tensors(meta, [Path(r.path).read_bytes() for r in picked])
    labels = torch.tensor([r.label for r in picked])
    pictures = torch.cat([_tensors(meta, pool.pictures(s, seed)) for s in pool.sources("fit")])
    tuned = fine_tune(model, lesions, labels, pictures, steps, weight, seed=seed)
    val_x = _tensors(meta, [Path(r.path).read_bytes() for r in val])
    val_y = np.array([r.label for r in val])
    val_pics = {s.name: pool.pictures(s, seed) for s in pool.sources("val")}
    stats = load_check_statistics(meta.check_stats_path(release))
    rows = {}
    lesion_scores = {f"OE fine-tune ({steps} steps, weight {weight:g}), {k}": v
                     for k, v in scores(tuned, val_x, meta.temperature).items()}
    pic_scores = {k: {} for k in lesion_scores}
    for name, blobs in val_pics.items():
        for k, v in scores(tuned, _tensors(meta, blobs), meta.temperature).items():
            pic_scores[f"OE fine-tune ({steps} steps, weight {weight:g}), {k}"][name] = v
    head = f"release's dermoscopy check ({meta.dermoscopy_check.get('rejector', 'head')})"
    val_feats = features(model, meta, [Path(r.path).read_bytes() for r in val], "val")[0]
    lesion_scores[head] = dermoscopy_check_score(val_feats, stats)
    pic_scores[head] = {n: dermoscopy_check_score(features(model, meta, b, n)[0], stats) for n, b in val_pics.items()}
    for name, les in lesion_scores.items():
        t = refusal_threshold([les], val_y, keep)
        per = {n: float((s > t).float().mean()) for n, s in pic_scores[name].items()}
        rows[name] = {"mean_refused": float(np.mean(list(per.values()))), "per_source": per}
        print(f"{name:60} refuses {rows[name]['mean_refused']:.1%} of validation-source pictures", flush=True)
    with torch.no_grad():
        pred = torch.cat([features_and_logits(tuned, c)[1].argmax(1) for c in torch.split(val_x, 128)]).numpy()
    from sklearn.metrics import balanced_accuracy_score

    rows["_tuned_val_balanced_accuracy"] = float(balanced_accuracy_score(val_y, pred))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Outlier exposure as a short CPU fine-tune, compared on validation sources")
    p.add_argument("--release", type=Path, default=Path("release"))
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--weight", type=float, default=0.5)
    p.add_argument("--lesion-keep", type=float, default=0.995)
    p.add_argument("--cache-dir", type=Path, default=Path("runs/cache"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = run(args.release, args.steps, args.weight, args.lesion_keep, args.cache_dir)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
