"""HAM10000 on disk -> records -> lesion-grouped split -> uint8 tensor caches, and DataConfig: the data
settings every training step shares (one definition of the --data, --split-seed, ... flags).

Two layouts are understood: the dataset's own (a HAM10000_metadata.csv anywhere below the root and
`<image_id>.jpg` files anywhere below it: Kaggle's part_1/part_2 folders or a flat folder), and the
ImageFolder layout `train|val|test/<class>/*.jpg` whose folders already define the split.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from skinmodel.inputs import COLOUR_CONSTANCIES
from skinmodel.labels import CLASS_DESCRIPTIONS, CLASS_FULL_NAMES, CLASS_NAMES  # noqa: F401 - re-exported
from skinmodel.preprocessing import (PreprocessConfig, decode_image, eval_uint8, preprocess_bytes_and_colour,
                                    resize_center_crop)
from skinmodel.dataset import ham10000_dir

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
METADATA_NAME = "HAM10000_metadata.csv"
SPLITS = ("train", "val", "test")


class DataError(RuntimeError):
    """A problem with the data on disk, phrased for the person who has to fix it."""


@dataclass(frozen=True)
class Record:
    image_id: str
    lesion_id: str
    dx: str
    path: str
    split: str = ""

    @property
    def label(self) -> int:
        return CLASS_NAMES.index(self.dx)


@dataclass(frozen=True)
class DataConfig:
    """Where the images are, how they are split and how they become tensors."""

    data: str | None = None             # HAM10000 folder; None: $HAM10000_DIR, else ../shared/data/ham10000
    split_seed: int = 0
    limit_per_class: int | None = None  # smoke runs: at most N images per class
    img_size: int = 96                  # input (crop) size
    resize_size: int | None = None      # shorter side before the crop (None: img_size)
    colour_constancy: str = "none"      # skinmodel.inputs.COLOUR_CONSTANCIES; travels in meta.json's preprocessing
    cache_dir: str | None = "runs/cache"
    threads: int | None = None          # torch CPU threads (None: all cores)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataConfig":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(self.resize_size or self.img_size, self.img_size, IMAGENET_MEAN, IMAGENET_STD,
                                colour_constancy=self.colour_constancy)

    @property
    def cache(self) -> Path | None:
        return Path(self.cache_dir) if self.cache_dir else None

    def use_threads(self) -> None:
        """torch's CPU thread count for this step, when one was asked for."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)


def add_data_args(p: argparse.ArgumentParser, sizes: bool = True, compute: bool = True,
                  threads: int | None = None) -> None:
    """The data flags, once. sizes=False for steps whose preprocessing comes from a checkpoint or a release;
    compute=False for steps that decode and run nothing (no cache, no threads); threads: the default count."""
    d = DataConfig()
    p.add_argument("--data", help="HAM10000 folder (default: $HAM10000_DIR, else ../shared/data/ham10000)")
    p.add_argument("--split-seed", type=int, default=d.split_seed, help="seed of the lesion-grouped split")
    p.add_argument("--limit-per-class", type=int, default=None, help="use at most N images per class (smoke runs)")
    if compute:
        p.add_argument("--cache-dir", default=d.cache_dir, help="where decoded uint8 tensors are kept between runs")
        p.add_argument("--threads", type=int, default=threads,
                       help=f"torch CPU threads (default: {threads or 'all cores'})")
    if sizes:
        p.add_argument("--img-size", type=int, default=d.img_size, help="input (crop) size in pixels")
        p.add_argument("--resize-size", type=int, default=None, help="shorter side before the crop (default: img-size)")
        p.add_argument("--colour-constancy", default=d.colour_constancy, choices=COLOUR_CONSTANCIES,
                       help="applied to every image before the crop, in training and (through meta.json) when served")


@dataclass(frozen=True)
class Split:
    records: list[Record]
    hash: str  # sha256 of splits.csv: checkpoints, reports and releases carry it

    def part(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]


def load_split(cfg: DataConfig) -> Split:
    """The one load-and-split chain: records of cfg.data, split by lesion with cfg.split_seed."""
    records = split_records(load_records(resolve_data_dir(cfg.data), cfg.limit_per_class), cfg.split_seed)
    return Split(records, hashlib.sha256(splits_csv(records)).hexdigest())


def resolve_data_dir(arg: str | None) -> Path:
    root = Path(arg) if arg else ham10000_dir()
    if root is None:
        raise DataError("no HAM10000 directory: pass --data DIR or set HAM10000_DIR")
    if not root.is_dir():
        raise DataError(f"HAM10000 directory {root} does not exist (from --data or HAM10000_DIR)")
    return root


def _index_images(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                found.setdefault(stem, Path(dirpath) / name)
    return found


def _imagefolder_records(root: Path) -> list[Record]:
    records = []
    for split in SPLITS:
        for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            if class_dir.name not in CLASS_NAMES:
                raise DataError(f"unknown class folder {class_dir} (expected one of {', '.join(CLASS_NAMES)})")
            for img in sorted(class_dir.iterdir()):
                if img.suffix.lower() in IMAGE_SUFFIXES:
                    # No lesion ids in this layout: each image is its own group and the folders are the split.
                    records.append(Record(img.stem, img.stem, class_dir.name, str(img), split))
    if not records:
        raise DataError(f"{root} has train/val/test folders but no images in <class> subfolders")
    return records


def load_records(root: Path, limit_per_class: int | None = None) -> list[Record]:
    """All labelled images under root, sorted by image_id; raises DataError with a clear reason."""
    root = Path(root)
    if all((root / s).is_dir() for s in SPLITS) and not list(root.rglob(METADATA_NAME)):
        records = _imagefolder_records(root)
    else:
        metas = sorted(root.rglob(METADATA_NAME))
        if not metas:
            raise DataError(f"no {METADATA_NAME} found under {root} (and no train/val/test ImageFolder layout)")
        with open(metas[0], newline="") as f:
            reader = csv.DictReader(f)
            missing_cols = {"lesion_id", "image_id", "dx"} - set(reader.fieldnames or [])
            if missing_cols:
                raise DataError(f"{metas[0]} lacks the column(s) {', '.join(sorted(missing_cols))}")
            rows = list(reader)
        unknown = sorted({r["dx"] for r in rows} - set(CLASS_NAMES))
        if unknown:
            raise DataError(f"{metas[0]} has unknown dx value(s) {', '.join(unknown)}; "
                            f"expected {', '.join(CLASS_NAMES)}")
        images = _index_images(root)
        missing = [r["image_id"] for r in rows if r["image_id"] not in images]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DataError(f"{len(missing)} of {len(rows)} images listed in {metas[0].name} are missing "
                            f"under {root}: {shown}")
        records = [Record(r["image_id"], r["lesion_id"], r["dx"], str(images[r["image_id"]])) for r in rows]
    records.sort(key=lambda r: r.image_id)
    if limit_per_class:
        kept, seen = [], Counter()
        for r in records:
            if seen[r.dx] < limit_per_class:
                kept.append(r)
                seen[r.dx] += 1
        records = kept
    return records


def split_records(records: list[Record], seed: int = 0) -> list[Record]:
    """60/20/20 split grouped by lesion_id and stratified by dx; deterministic for a given seed."""
    from sklearn.model_selection import StratifiedGroupKFold

    if all(r.split for r in records):
        return records  # ImageFolder layout: the folders are the split
    labels = np.array([r.label for r in records])
    groups = np.array([r.lesion_id for r in records])
    idx = np.arange(len(records))
    # 5 folds: one is test (20 %); of the remaining 80 %, one of 4 folds is val (20 % of the whole).
    rest, test = next(StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(idx, labels, groups))
    tr, va = next(StratifiedGroupKFold(4, shuffle=True, random_state=seed).split(rest, labels[rest], groups[rest]))
    split = np.empty(len(records), dtype=object)
    split[rest[tr]], split[rest[va]], split[test] = "train", "val", "test"
    return [Record(r.image_id, r.lesion_id, r.dx, r.path, s) for r, s in zip(records, split)]


def splits_csv(records: list[Record]) -> bytes:
    """splits.csv: no absolute paths, so its hash is the same on every machine."""
    lines = ["image_id,lesion_id,dx,split"] + [f"{r.image_id},{r.lesion_id},{r.dx},{r.split}"
                                                for r in sorted(records, key=lambda r: r.image_id)]
    return ("\n".join(lines) + "\n").encode()


def write_splits(records: list[Record], path: Path) -> str:
    """Writes splits.csv and returns its sha256."""
    payload = splits_csv(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
    return hashlib.sha256(payload).hexdigest()


def class_counts(records: list[Record]) -> list[int]:
    counts = Counter(r.dx for r in records)
    return [counts.get(c, 0) for c in CLASS_NAMES]


def thread_map(fn, items):
    """fn over items in threads, yielded in order: Pillow lets go of the GIL while it decodes, resizes, filters and
    encodes, so decoding-bound steps run several times faster on a many-core machine, with the sequential result."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        yield from pool.map(fn, items)


def _read(path: str, min_side: int) -> Image.Image:
    """Decoded as the handler decodes (min_side: the same reduced-scale JPEG decoding for small inputs)."""
    with open(path, "rb") as f:
        return decode_image(f.read(), min_side=min_side)


def colour_statistics_of(records: list[Record], cfg: PreprocessConfig) -> torch.Tensor:
    """The dermoscopy check's colour statistics of each record's file, read as the handler reads an upload."""
    return torch.stack(list(thread_map(lambda r: preprocess_bytes_and_colour(Path(r.path).read_bytes(), cfg)[1],
                                       records)))


def build_cache(records: list[Record], kind: str, cfg: PreprocessConfig, cache_dir: Path | None,
                desc: str = "") -> torch.Tensor:
    """Decode every image once. kind='eval': the shared preprocessing (resize + centre crop, uint8).
    kind='train': shorter side resized, 4:3 centre crop kept, so random crops see the whole lesion.
    Cached on disk keyed by the image list and the preprocessing, so later commands skip decoding."""
    # "decode-2": caches written before training decoded with the handler's reduced-scale JPEG path are not reused.
    ids = "|".join(r.image_id for r in records)
    key = hashlib.sha256((ids + repr((kind, cfg, "decode-2"))).encode()).hexdigest()[:16]
    cache_file = cache_dir / f"{kind}-{key}.pt" if cache_dir else None
    if cache_file and cache_file.exists():
        return torch.load(cache_file, weights_only=True)
    h, w = cfg.resize_size, round(cfg.resize_size * 4 / 3)
    out = torch.empty((len(records), 3, cfg.crop_size if kind == "eval" else h,
                       cfg.crop_size if kind == "eval" else w), dtype=torch.uint8)

    def one(r: Record) -> torch.Tensor:
        img = _read(r.path, cfg.resize_size)
        return eval_uint8(img, cfg) if kind == "eval" else resize_center_crop(img, h, h, w, cfg.colour_constancy)

    for i, t in enumerate(tqdm(thread_map(one, records), total=len(records), desc=desc or f"decode {kind}",
                               unit="img", leave=False)):
        out[i] = t
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")  # ranks of other nodes may write the same file
        torch.save(out, tmp)
        os.replace(tmp, cache_file)
    return out
