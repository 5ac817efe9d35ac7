"""Labelled image sets from outside the study, for `python -m training evaluate-release --release`:

- a folder of `<class>/...` subfolders named by the 7 codes (images anywhere below each);
- a CSV with an image column (`image`, `image_id`, `path` or `file`) and either a label column (`label` or `dx`,
  the 7 codes) or ISIC's one-hot ground truth (one column per class, MEL/NV/BCC/AKIEC/BKL/DF/VASC, exactly one 1).
  Images are found relative to the CSV's folder, by path or by file name without its extension anywhere below.
  Other columns (age, sex, body site ...) travel along for the subgroup tables;
- the HAM10000 folder with a split name: that split of the study's lesion-grouped split, with its metadata.

Every problem is a DataError naming what to fix: unknown labels, missing files, a class without images.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from training.common import data as D

IMAGE_COLUMNS = ("image", "image_id", "path", "file")
LABEL_COLUMNS = ("label", "dx")


@dataclass(frozen=True)
class Labelled:
    path: Path
    label: int
    extra: dict = field(default_factory=dict)  # the CSV's other columns, lower-cased names


def _shown(items: list, n: int = 5) -> str:
    return ", ".join(map(str, items[:n])) + (" ..." if len(items) > n else "")


def _from_folders(root: Path) -> list[Labelled]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in dirs if p.name.lower() not in D.CLASS_NAMES]
    if unknown or not dirs:
        raise D.DataError(f"{root}: expected one subfolder per class named {', '.join(D.CLASS_NAMES)}"
                          + (f"; unknown folder(s) {_shown(unknown)}" if unknown else ""))
    return [Labelled(f, D.CLASS_NAMES.index(d.name.lower()))
            for d in dirs for f in sorted(d.rglob("*")) if f.suffix.lower() in D.IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(d).parts)]  # macOS ._x.jpg and the like


def _label(row: dict, one_hot: list[str] | None, label_col: str | None, line: int) -> int:
    if one_hot:
        try:
            hot = [c for c in one_hot if float(row[c] or 0) == 1.0]
        except ValueError:
            raise D.DataError(f"line {line}: one-hot values must be 0 or 1") from None
        if len(hot) != 1:
            raise D.DataError(f"line {line}: exactly one class column must be 1 (got {len(hot)})")
        return D.CLASS_NAMES.index(hot[0])
    value = (row.get(label_col) or "").strip().lower()
    if value not in D.CLASS_NAMES:
        raise D.DataError(f"line {line}: unknown label {value!r}; expected one of {', '.join(D.CLASS_NAMES)}")
    return D.CLASS_NAMES.index(value)


def _from_csv(path: Path) -> list[Labelled]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        # A row with more fields than the header puts the extras under None: they are dropped, not read.
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if isinstance(k, str)} for r in reader]
        columns = [(c or "").strip().lower() for c in reader.fieldnames or []]
    image_col = next((c for c in IMAGE_COLUMNS if c in columns), None)
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    one_hot = list(D.CLASS_NAMES) if set(D.CLASS_NAMES) <= set(columns) else None
    if image_col is None or (label_col is None and one_hot is None):
        raise D.DataError(f"{path}: needs an image column ({'/'.join(IMAGE_COLUMNS)}) and a label column "
                          f"({'/'.join(LABEL_COLUMNS)}) or one 0/1 column per class ({', '.join(D.CLASS_NAMES)}); "
                          f"found {', '.join(columns) or 'no header'}")
    index = D._index_images(path.parent)  # by file name without extension, anywhere below the CSV's folder
    items, missing = [], []
    for line, row in enumerate(rows, start=2):
        label = _label(row, one_hot, label_col, line)
        name = row[image_col]
        direct = path.parent / name
        found = direct if direct.is_file() else index.get(Path(name).stem if Path(name).suffix else name)
        if found is None:
            missing.append(name)
            continue
        skip = {image_col, label_col, *(one_hot or ())}
        items.append(Labelled(found, label, {k: v for k, v in row.items() if k not in skip}))
    if missing:
        raise D.DataError(f"{len(missing)} of {len(rows)} images listed in {path.name} were not found under "
                          f"{path.parent}: {_shown(missing)}")
    return items


def _from_study_split(root: Path, part: str, split_seed: int, limit_per_class: int | None) -> list[Labelled]:
    split = D.load_split(D.DataConfig(data=str(root), split_seed=split_seed, limit_per_class=limit_per_class))
    extra = {}
    for meta_file in list(root.rglob(D.METADATA_NAME))[:1]:  # the ImageFolder layout has none: no subgroups
        with open(meta_file, newline="") as f:
            extra = {r["image_id"]: {k: v for k, v in r.items() if k not in ("lesion_id", "image_id", "dx")}
                     for r in csv.DictReader(f)}
    return [Labelled(Path(r.path), r.label, extra.get(r.image_id, {})) for r in split.part(part)]


def load_labelled(source: str | Path, split: str | None = None, split_seed: int = 0,
                  limit_per_class: int | None = None) -> list[Labelled]:
    """The labelled set at `source` (see the module's docstring); every class must have at least one image."""
    source = Path(source)
    if not source.exists():
        raise D.DataError(f"{source}: no such file or folder")
    if split:
        if not source.is_dir():
            raise D.DataError(f"--split needs the study's data folder (HAM10000, or train/val/test folders), not {source}")
        items = _from_study_split(source, split, split_seed, limit_per_class)
    elif source.is_dir():
        items = _from_folders(source)
    else:
        items = _from_csv(source)
    counts = {c: sum(i.label == k for i in items) for k, c in enumerate(D.CLASS_NAMES)}
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise D.DataError(f"{source}: no image of class {', '.join(empty)}; balanced accuracy and per-class recall "
                          f"need every class (counts: {', '.join(f'{c} {n}' for c, n in counts.items())})")
    return items
