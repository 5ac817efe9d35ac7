"""Export a checkpoint as the serving contract: a plain state_dict (fp16 storage) + meta.json beside it."""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path


from skinmodel.labels import CONCERNING
from skinmodel.release import MODEL_NAME, ReleaseMeta
from training.common import data as D
from training.common.checkpoint import atomic_save, checkpoint_preprocessing, load_checkpoint


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write model.pt + meta.json, the pair the handler and the archive read.",
                                add_help=add_help)
    p.add_argument("--checkpoint", required=True, help="a best.pt written by training")
    p.add_argument("--out", required=True, help="folder for model.pt + meta.json")
    p.add_argument("--name", default=MODEL_NAME, help="model name served by TorchServe")
    p.add_argument("--version", default="1.0", help="model version (also the .mar version)")
    p.add_argument("--results", help="results.json from evaluate, to embed the test metrics")
    p.add_argument("--results-key", help="which model of results.json this is")
    p.add_argument("--fp32", action="store_true", help="store fp32 instead of fp16")
    p.add_argument("--command", default="", help="the training command to record")
    return p


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def export(checkpoint: str, out: Path, name: str = MODEL_NAME, version: str = "1.0", results: str | None = None,
           results_key: str | None = None, fp32: bool = False, command: str = "") -> ReleaseMeta:
    """A checkpoint as a release: OUT/model.pt (a plain state_dict, fp16 unless fp32) and OUT/meta.json."""
    ckpt = load_checkpoint(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if (not fp32 and v.is_floating_point()) else v) for k, v in ckpt["model"].items()}
    weights = out / "model.pt"
    atomic_save(state, weights)
    test_metrics = None
    if results:
        test_metrics = json.loads(Path(results).read_text())["models"][results_key]
        test_metrics = {k: v for k, v in test_metrics.items() if k not in ("checkpoint", "preprocessing")}
    names = list(ckpt["class_names"])
    meta = ReleaseMeta(
        name=name, version=version, arch=ckpt["arch"], class_names=names,
        class_full_names=[D.CLASS_FULL_NAMES[c] for c in names],
        class_descriptions=[D.CLASS_DESCRIPTIONS[c] for c in names],
        concerning=[c for c in CONCERNING if c in names],
        preprocessing=checkpoint_preprocessing(ckpt), weights_file=weights.name,
        weights_dtype="float32" if fp32 else "float16", weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
        split_hash=ckpt["split_hash"],
        metrics={"val": {k: v for k, v in ckpt.get("val_metrics", {}).items() if k != "confusion_matrix"},
                 "test": test_metrics},
        training={"best_epoch": ckpt["epoch"] + 1, "distilled": ckpt.get("teacher", False), "args": ckpt["args"],
                  "command": command, "git_sha": git_sha()},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    meta.save(out)
    print(f"exported {weights} ({weights.stat().st_size / 2**20:.1f} MB) and {out / 'meta.json'}")
    return meta


def main(args: argparse.Namespace) -> ReleaseMeta:
    return export(args.checkpoint, Path(args.out), args.name, args.version, args.results, args.results_key, args.fp32,
                  args.command)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
