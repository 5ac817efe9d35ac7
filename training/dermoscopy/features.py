"""What the dermoscopy check is fitted, chosen and reported on: per image, the penultimate features and the
picture's colour statistics before the colour constancy (skinmodel.networks.check_inputs), computed once per release
and split and kept in the cache folder: every head (training/dermoscopy/rejectors.py) is then fitted on them, in
seconds.

- train: every training lesion, plain and under one random shift family each (what a head is fitted on);
- val / test: every lesion, plain and under each of the ten shift families (a threshold is chosen on val, the
  false refusals are reported on test).

Computed as the handler computes them (skinmodel.preprocessing.preprocess_bytes_and_colour on the image file, fp32).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from skinmodel.networks import check_inputs, features_and_logits
from skinmodel.preprocessing import COLOUR_LAYOUT, preprocess_bytes_and_colour
from skinmodel.release import ReleaseMeta
from training.common import data as D
from training.common.device import full_fp32
from training.dermoscopy.shifts import FAMILIES, shifted

# 2: with the colour statistics (their count in the key too). "gate": the check's name formerly (files' prefix)
CACHE_VERSION = f"gate-features-2-colour-{COLOUR_LAYOUT}"


@torch.no_grad()
def features(model, meta: ReleaseMeta, blobs: list[bytes], desc: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The check's inputs (penultimate features, then colour statistics), calibrated top probabilities and
    predicted classes of image files, computed as the handler computes them."""
    feats, tops, preds = [], [], []
    device = next(model.parameters()).device  # features come from the fp32 network, never the int8 one
    with full_fp32():  # decoding dominates on a GPU machine: in threads
        for i in tqdm(range(0, len(blobs), 128), desc=desc, unit="batch", leave=False):
            x, colour = map(torch.stack, zip(*D.thread_map(lambda b: preprocess_bytes_and_colour(b, meta.preprocessing),
                                                          blobs[i:i + 128])))
            f, logits = (t.float().cpu() for t in features_and_logits(model, x.to(device)))
            f = check_inputs(f, colour)
            probs = (logits / meta.temperature).softmax(1)
            feats.append(f)
            tops.append(probs.max(1).values)
            preds.append(probs.argmax(1))
    return torch.cat(feats), torch.cat(tops), torch.cat(preds).numpy()


def load_rgb(path) -> Image.Image:
    with Image.open(path) as img:  # closed at once: thousands of lazily opened files exhaust descriptors
        return img.convert("RGB")


def shifted_sets(records: list[D.Record], seed: int):
    """(family, files): every record under each shift family in turn (a different draw per image and family);
    one family's files at a time, since "source resolution" makes files several times the original's size."""
    images = list(D.thread_map(lambda r: load_rgb(r.path), records))
    for f, family in enumerate(tqdm(FAMILIES, desc="shifting", unit="family", leave=False)):
        # every draw is seeded by its image: in threads, the same files as one by one
        yield family, list(D.thread_map(lambda i: shifted(images[i], family, seed + 1000 * f + i), range(len(images))))


def _read(records: list[D.Record]) -> list[bytes]:
    return [Path(r.path).read_bytes() for r in records]


def _compute(model, meta: ReleaseMeta, split: D.Split, seed: int, part: str) -> dict:
    if part == "train":
        train = split.part("train")
        rng = np.random.default_rng(seed)
        families = list(FAMILIES)
        picks = [families[int(rng.integers(len(families)))] for _ in train]  # drawn in order, as always
        train_shifted = list(D.thread_map(lambda i: shifted(load_rgb(train[i].path), picks[i], 10_000_000 + i),
                                          range(len(train))))
        return {"plain": features(model, meta, _read(train), "train")[0],
                "shifted": features(model, meta, train_shifted, "train, shifted")[0]}
    recs = split.part(part)
    f, top, pred = features(model, meta, _read(recs), part)
    out = {"labels": torch.tensor([r.label for r in recs]), "plain": f, "top": top, "pred": torch.from_numpy(pred),
           "shift": {}, "shift_pred": {}}
    for fam, blobs in shifted_sets(recs, {"val": 20_000_000, "test": 30_000_000}[part]):
        f, _, pred = features(model, meta, blobs, f"{part}, {fam}")
        out["shift"][fam], out["shift_pred"][fam] = f, torch.from_numpy(pred)
    return out


def part_features(model, meta: ReleaseMeta, weights: Path, split: D.Split, cache: Path | None, part: str,
                  seed: int = 0) -> dict:
    """One part's lesion features (see the module's doc), from the cache when this release, split, seed and part
    were computed before (the three parts may be computed by three processes at once)."""
    key = hashlib.sha256(f"{CACHE_VERSION}|{hashlib.sha256(weights.read_bytes()).hexdigest()}|{split.hash}|"
                         f"{seed}|{meta.preprocessing}|{part}".encode()).hexdigest()[:16]
    path = cache / f"gate-lesions-{part}-{key}.pt" if cache else None
    if path and path.exists():
        return torch.load(path, weights_only=True)
    out = _compute(model, meta, split, seed, part)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return out


def lesion_features(model, meta: ReleaseMeta, weights: Path, split: D.Split, cache: Path | None,
                    seed: int = 0) -> dict:
    """{"train": {"plain", "shifted"}, "val": {...}, "test": {...}}: every part, cached."""
    return {part: part_features(model, meta, weights, split, cache, part, seed) for part in ("train", "val", "test")}
