"""Pictures that are not dermoscopy, from nothing but what the installed packages ship and what code draws.

Two disjoint pools, so that the gate is never scored on what it was fitted on:
- fitting: random crops of matplotlib's and scikit-learn's sample photos (Grace Hopper's portrait among them),
  the 100 non-face crops of scikit-image's LFW subset (its second half), and 1,500 drawn pictures of ten kinds;
  `fitting_negatives(part="val")` holds a fifth of them out to choose the gate's strength on.
- evaluation: scikit-image's own photographs, the subset's 100 face crops (no face is in the fitting pool) and
  100 drawn pictures of another seed,
  less any file identical to a fitted one: `evaluation_sets(fitted)`, the figures the model card reports.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from skinmodel.formats import sniff
from training.release.shifts import FAMILIES, encode, shifted

SIZE = (200, 150)  # HAM10000's size: nothing tells the pictures apart by shape


def _drawn(kind: int, rng: np.random.Generator) -> Image.Image:
    w, h = SIZE
    colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    if kind == 0:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noise
    if kind == 1:
        return Image.new("RGB", SIZE, colour())  # flat colour
    if kind == 2:  # gradient
        g = np.linspace(rng.uniform(0, 128), rng.uniform(128, 255), w)
        return Image.fromarray(np.stack([np.tile(g, (h, 1)) * rng.uniform(0.3, 1) for _ in range(3)], -1).astype(np.uint8))
    if kind == 3:  # checkerboard
        board = ((np.indices((h, w)) // int(rng.integers(4, 40))).sum(0) % 2).astype(bool)
        return Image.fromarray(np.where(board[..., None], colour(), colour()).astype(np.uint8))
    if kind == 4:  # a document: strokes on paper
        arr = np.full((h, w, 3), int(rng.integers(200, 256)), np.uint8)
        for _ in range(int(rng.integers(10, 60))):
            y, x = rng.integers(0, h - 5), rng.integers(0, w - 40)
            arr[y:y + 3, x:x + int(rng.integers(10, 40))] = rng.integers(0, 80)
        return Image.fromarray(arr)
    if kind == 5:  # smooth noise: clouds, textures
        small = rng.integers(0, 256, (int(rng.integers(3, 20)), int(rng.integers(3, 20)), 3), dtype=np.uint8)
        return Image.fromarray(small).resize(SIZE, Image.BICUBIC)
    if kind == 6:  # shapes
        img = Image.new("RGB", SIZE, colour())
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 15))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = (x0, y0, x0 + int(rng.integers(5, 120)), y0 + int(rng.integers(5, 90)))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour())
        return img
    if kind == 7:  # stripes
        f, angle = rng.uniform(0.02, 0.3), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        on = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * f) > 0
        return Image.fromarray(np.where(on[..., None], colour(), colour()).astype(np.uint8))
    if kind == 8:  # black, white
        return Image.new("RGB", SIZE, (int(rng.choice([0, 5, 250, 255])),) * 3)
    base = np.array([rng.uniform(150, 240), rng.uniform(100, 190), rng.uniform(80, 160)])  # bare skin tone, no lesion
    return Image.fromarray((np.zeros((h, w, 3)) + base + rng.normal(0, 4, (h, w, 3))).clip(0, 255).astype(np.uint8))


def _package_photos() -> list[Image.Image]:
    import matplotlib
    import sklearn.datasets

    sample = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"
    photos = [Image.open(sample / n).convert("RGB") for n in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png",
                                                              "logo2.png")]
    return photos + [Image.fromarray(a) for a in sklearn.datasets.load_sample_images().images]


def _lfw() -> np.ndarray:
    """scikit-image's LFW subset: 100 face crops, then 100 crops of the same photos' backgrounds."""
    import skimage

    return np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")


def fitting_pool(seed: int = 1) -> list[tuple[str, bytes, bool]]:
    """The whole fitting pool as (source, file, held out?): a fifth of it, drawn at random, is held out to choose
    the head's strength. Sources: "photo", "background" (LFW crops without a face) and "drawn <kind>"."""
    rng = np.random.default_rng(seed)
    out = []
    for photo in _package_photos():
        w, h = photo.size
        for _ in range(48):  # random crops under random shifts: many views of few photos
            s = rng.uniform(0.2, 1.0)
            cw, ch = int(w * s), int(h * s)
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = photo.crop((left, top, left + cw, top + ch)).resize(SIZE, Image.BILINEAR)
            out.append(("photo", shifted(crop, list(FAMILIES)[int(rng.integers(len(FAMILIES)))],
                                         int(rng.integers(2**31)))))
    for crop in _lfw()[100:]:
        out.append(("background", encode(Image.fromarray((crop * 255).astype(np.uint8)).convert("RGB")
                                         .resize(SIZE, Image.BILINEAR))))
    out += [(f"drawn {i % 10}", encode(_drawn(i % 10, rng))) for i in range(1500)]
    # A seeded draw, not every fifth index: the drawn kinds cycle with the index, and a stride would hold out
    # only some kinds. Files identical to a fitted one (plain black or white) are dropped from the held-out part.
    held_out = set(np.random.default_rng(seed + 7).permutation(len(out))[: len(out) // 5].tolist())
    seen = {hashlib.sha256(b).digest() for i, (_, b) in enumerate(out) if i not in held_out}
    return [(src, b, i in held_out) for i, (src, b) in enumerate(out)
            if i not in held_out or hashlib.sha256(b).digest() not in seen]


def fitting_negatives(part: str = "train", seed: int = 1) -> list[bytes]:
    """The fitting pool's files; part "train" (what the head is fitted on) or "val" (held out)."""
    return [b for _, b, held in fitting_pool(seed) if held == (part == "val")]


def evaluation_sets(fitted: Iterable[bytes] = (), seed: int = 0, drawn: int = 100) -> dict[str, list[bytes]]:
    """Photographs that ship inside scikit-image, its other face crops, and drawn pictures of another seed, less
    any file identical to one in `fitted` (a black or a white picture is drawn by every seed)."""
    import skimage

    seen = {hashlib.sha256(b).digest() for b in fitted}

    data = Path(skimage.__file__).parent / "data"
    out = {"scikit-image photographs": [], "LFW faces (scikit-image)": [], "generated": []}
    for f in sorted(data.iterdir()):
        if f.suffix.lower() in (".png", ".jpg", ".gif") and os.path.getsize(f) > 2000:
            raw = f.read_bytes()
            # The service decodes only the formats the page lists; a GIF keeps its pixels as a PNG.
            out["scikit-image photographs"].append(raw if sniff(raw) else encode(Image.open(f).convert("RGB")))
    out["LFW faces (scikit-image)"] = [encode(Image.fromarray((face * 255).astype(np.uint8))) for face in _lfw()[:100]]
    rng = np.random.default_rng(seed)
    out["generated"] = [encode(_drawn(i % 10, rng)) for i in range(drawn)]
    return {name: [b for b in blobs if hashlib.sha256(b).digest() not in seen] for name, blobs in out.items()}
