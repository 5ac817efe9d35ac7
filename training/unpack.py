"""Turn what an accelerator run left in its output folder (training/accelerator.py) back into a release folder.

    python -m training unpack --from /path/to/out --release release-2.0
"""
from __future__ import annotations

import argparse
from pathlib import Path

from training.accelerator import unpack


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Check the parts an accelerator run packed (sha256 of each) and rebuild "
                                            "its release folder; the weights must load before it is put in place.",
                                add_help=add_help)
    p.add_argument("--from", dest="source", required=True, help="folder with manifest.json and release.tar.gz.NNN")
    p.add_argument("--release", required=True, help="release folder to create")
    p.add_argument("--replace", action="store_true", help="replace the release folder if it exists")
    return p


def main(args: argparse.Namespace):
    meta = unpack(Path(args.source), Path(args.release), args.replace)
    print(f"release {meta.version} ({meta.arch}, {meta.preprocessing.crop_size} px) in {args.release}")
    return meta


if __name__ == "__main__":
    main(get_args_parser().parse_args())
