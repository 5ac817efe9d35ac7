"""Write the lesion-grouped split and show what is in it."""
from __future__ import annotations

import argparse
from pathlib import Path

from training import data as D


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write splits.csv (60/20/20 by lesion_id, stratified by dx).",
                                add_help=add_help)
    p.add_argument("--data", help="HAM10000 folder (default: $HAM10000_DIR, else ../shared/data/ham10000)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", default="runs/study/splits.csv", help="where to write splits.csv")
    return p


def main(args) -> str:
    records = D.split_records(D.load_records(D.resolve_data_dir(args.data)), args.split_seed)
    digest = D.write_splits(records, Path(args.out))
    print(f"{'split':6} {'images':>7} {'lesions':>8}  " + " ".join(f"{c:>6}" for c in D.CLASS_NAMES))
    for split in D.SPLITS:
        part = [r for r in records if r.split == split]
        print(f"{split:6} {len(part):7d} {len({r.lesion_id for r in part}):8d}  "
              + " ".join(f"{n:6d}" for n in D.class_counts(part)))
    print(f"wrote {args.out}  sha256 {digest}")
    return digest


if __name__ == "__main__":
    main(get_args_parser().parse_args())
