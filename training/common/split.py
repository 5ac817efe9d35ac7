"""Write the lesion-grouped split and show what is in it."""
from __future__ import annotations

import argparse
from pathlib import Path

from training.common import data as D


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write splits.csv (60/20/20 by lesion_id, stratified by dx).",
                                add_help=add_help)
    D.add_data_args(p, sizes=False, compute=False)
    p.add_argument("--out", default="runs/study/splits.csv", help="where to write splits.csv")
    return p


def write_split(data: D.DataConfig, out: Path) -> str:
    """splits.csv of the lesion-grouped split, a table of what is in it; returns its sha256."""
    split = D.load_split(data)
    digest = D.write_splits(split.records, Path(out))
    print(f"{'split':6} {'images':>7} {'lesions':>8}  " + " ".join(f"{c:>6}" for c in D.CLASS_NAMES))
    for name in D.SPLITS:
        part = split.part(name)
        print(f"{name:6} {len(part):7d} {len({r.lesion_id for r in part}):8d}  "
              + " ".join(f"{n:6d}" for n in D.class_counts(part)))
    print(f"wrote {out}  sha256 {digest}")
    return digest


def main(args: argparse.Namespace) -> str:
    return write_split(D.DataConfig.from_args(args), Path(args.out))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
