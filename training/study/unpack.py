"""Turn what an accelerator run left in its output folder (training/study/accelerator.py) back into a release folder.

    python -m training unpack --from /path/to/out --release release-2.0
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from training.study.accelerator import unpack


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Check the parts an accelerator run packed (sha256 of each) and rebuild "
                                            "its release folder; the weights must load before it is put in place.",
                                add_help=add_help)
    p.add_argument("--from", dest="source", required=True, help="folder with manifest.json and release.tar.gz.NNN")
    p.add_argument("--release", required=True, help="release folder to create")
    p.add_argument("--replace", action="store_true", help="replace the release folder if it exists")
    return p


def main(args: argparse.Namespace):
    meta, manifest = unpack(Path(args.source), Path(args.release), args.replace)
    if meta is not None:
        print(f"release {meta.version} ({meta.arch}, {meta.preprocessing.crop_size} px) in {args.release}")
        return meta
    here = Path(args.release)
    ckpt, report, r = here / manifest["rescued"], here / "report", f"{args.release}-release"
    name = "resnet18 distilled" if manifest["rescued"].startswith("resnet18_kd") else "resnet18 (scratch)"
    steps = [["evaluate", "--model", f"{name}={ckpt}", "--out", report],
             ["export", "--checkpoint", ckpt, "--out", r, "--results", report / "results.json", "--results-key", name],
             ["calibrate", "--checkpoint", ckpt, "--release", r], ["dermoscopy-check", "--release", r],
             ["model-card", "--release", r]]
    print(f"the accelerator run sent back its student only ({manifest['error']}).\n{here} holds "
          f"{manifest['rescued']} (fp16 weights) and every run's history. Finish on this machine:")
    for step in steps:
        print("  python -m training " + shlex.join(map(str, step)))
    return None


if __name__ == "__main__":
    main(get_args_parser().parse_args())
