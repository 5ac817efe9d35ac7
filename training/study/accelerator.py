"""The whole study inside a wall-clock budget on an accelerator machine, packed into a few small files that a CPU
machine turns back into a release folder with one command.

    OUT=/path/to/out training/accelerator.sh                     # on the GPU box (defaults: 224 px, 8 minutes)
    python -m training unpack --from /path/to/out --release release-2.0     # back on any machine

What comes back is at most MAX_FILES files of under PART_BYTES each (a lent device returns 8 files of < 16 MB):
the release folder as a tar.gz cut into parts, manifest.json (sha256 of every part, the device, the measured
throughput of every run, the test table, the time each step took) and the script's log.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from skinmodel.networks import build_model, load_state_dict_file
from skinmodel.release import ReleaseMeta
from training.common import data as D
from training.common.checkpoint import StudyError, model_from_checkpoint
from training.common.device import add_device_args, resolve_device
from training.study.pipeline import StudyConfig, run_study
from training.network.recipe import Recipe
from training.network.train import add_recipe_args

MAX_FILES = 8
PART_BYTES = 15 * 2**20          # under the 16 MiB a lent device returns per file
BUDGET_S = 480.0                 # 8 minutes: one device call of at most 10, with room to spare
AFTER_TRAINING_S = 180.0         # evaluation, calibration, the dermoscopy check, the served test report, packing
MANIFEST = "manifest.json"
ARCHIVE = "release.tar.gz"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run the whole study within a time budget and pack the release into "
                                            f"at most {MAX_FILES} files of < {PART_BYTES // 2**20} MiB in --out.",
                                add_help=add_help)
    p.add_argument("--out", default=os.environ.get("OUT"), help="where the files go (default: $OUT)")
    p.add_argument("--work", default="runs/accelerator", help="study folder (checkpoints stay here, not in --out)")
    p.add_argument("--data", help="HAM10000 folder (default: $HAM10000_DIR, else ../shared/data/ham10000)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="wall seconds for everything, packing included")
    p.add_argument("--after-training", type=float, default=AFTER_TRAINING_S,
                   help="seconds of the budget kept for the steps after training")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--resize-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-epochs", type=int, default=400, help="cap of every run; the budget decides below it")
    p.add_argument("--grid-images", type=int, default=2000,
                   help="the grid's proxy budget: each alpha x T cell trains on this many images (its share of the "
                        "time sizes the epochs)")
    p.add_argument("--version", default="2.0")
    add_recipe_args(p)
    p.add_argument("--teacher-tta", action="store_true", help="teacher candidates with 8-view test-time augmentation")
    p.add_argument("--recipe-search", action="store_true", help="choose class weighting x mix on validation first")
    add_device_args(p)
    p.add_argument("--quick", action="store_true", help="smoke run on the CPU: tiny subset, 32 px, 2-3 epochs")
    p.add_argument("--no-preflight", dest="preflight", action="store_false",
                   help="on CUDA, skip the 32 px run of every step that comes first")
    return p


def _throughput(run_dir: Path) -> dict:
    """What a run measured of itself: epochs, training images per second (epochs after the first) and seconds."""
    import csv

    rows = list(csv.DictReader(open(run_dir / "history.csv")))
    steady = [float(r["images_per_s"]) for r in rows[1:]] or [float(r["images_per_s"]) for r in rows]
    return {"epochs": len(rows), "images_per_s": round(sorted(steady)[len(steady) // 2], 1),
            "seconds": round(sum(float(r["seconds"]) for r in rows), 1)}


def pack(release: Path, out: Path, extra: dict) -> list[Path]:
    """release/ -> OUT/release.tar.gz.<hash>.000, .001, ... + OUT/manifest.json (sha256 of each part and the whole)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / ARCHIVE
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(release, arcname="release")
        blob = archive.read_bytes()
    # Parts named by the archive's hash, the manifest switched by one rename, old parts removed last: a run
    # killed at any moment leaves a manifest whose parts are all there (the early student or the release).
    tag = hashlib.sha256(blob).hexdigest()[:12]
    old = set(out.glob(f"{ARCHIVE}.*"))
    others = [p for p in out.iterdir() if p.is_file() and not p.name.startswith(MANIFEST) and p not in old]
    count = -(-len(blob) // PART_BYTES) or 1
    if len(others) + count + 1 > MAX_FILES:
        raise StudyError(f"{len(blob)} bytes make {count} parts of {PART_BYTES} beside {len(others)} other files "
                         f"(limit {MAX_FILES} files)")
    if len(others) + len(old) + count + 2 > MAX_FILES:  # no room for both at once: the earlier pack goes first
        for stale in (*old, out / MANIFEST):
            stale.unlink(missing_ok=True)
        old = set()
    parts = []
    for i in range(count):
        path = out / f"{ARCHIVE}.{tag}.{i:03d}"
        path.write_bytes(blob[i * PART_BYTES:(i + 1) * PART_BYTES])
        parts.append({"name": path.name, "bytes": path.stat().st_size,
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    manifest = {"archive_sha256": hashlib.sha256(blob).hexdigest(), "parts": parts, **extra}
    tmp_manifest = out / f"{MANIFEST}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp_manifest, out / MANIFEST)
    for stale in old - {out / p["name"] for p in parts}:
        stale.unlink()
    files = sorted(p for p in out.iterdir() if p.is_file())
    if any(p.stat().st_size >= 16 * 2**20 for p in files):
        raise StudyError(f"{out} holds a file of 16 MiB or more: " + ", ".join(f"{p.name} {p.stat().st_size}"
                                                                          for p in files))
    return files


def unpack(source: Path, release: Path, replace: bool = False) -> tuple[ReleaseMeta | None, dict]:
    """Parts + manifest -> a checked release folder. Every part's hash is verified before anything is written, the
    archive is extracted beside the target and swapped in only once its weights load. A run that ended before its
    release was made sent back its student checkpoint instead (manifest "rescued"): that folder comes out as it
    is, checkpoint checked, and no ReleaseMeta. Returns (meta or None, manifest)."""
    source, release = Path(source), Path(release)
    manifest_path = source / MANIFEST
    if not manifest_path.is_file():
        raise StudyError(f"{source} has no {MANIFEST}: point --from at the folder the accelerator run filled")
    manifest = json.loads(manifest_path.read_text())
    chunks = []
    for part in manifest["parts"]:
        path = source / part["name"]
        if not path.is_file():
            raise StudyError(f"{path} is missing: all {len(manifest['parts'])} parts are needed")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise StudyError(f"{path} is damaged or from another run (sha256 differs from {MANIFEST})")
        chunks.append(data)
    blob = b"".join(chunks)
    if hashlib.sha256(blob).hexdigest() != manifest["archive_sha256"]:
        raise StudyError("the parts do not add up to the archive the manifest describes")
    if release.exists() and any(release.iterdir()) and not replace:
        raise StudyError(f"{release} exists and is not empty: choose another folder or pass --replace")
    release.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=release.parent) as tmp:
        archive = Path(tmp) / ARCHIVE
        archive.write_bytes(blob)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # no absolute paths, links out or devices
        staged = Path(tmp) / "release"
        if manifest.get("rescued"):
            meta = None
            model_from_checkpoint(staged / manifest["rescued"])  # fp16 weights into the fp32 network: they load
        else:
            meta = ReleaseMeta.load(staged)
            build_model(meta.arch, meta.num_classes).load_state_dict(load_state_dict_file(staged / meta.weights_file))
        (staged / MANIFEST).write_text(manifest_path.read_text())
        if release.exists():
            shutil.rmtree(release)
        os.replace(staged, release)
    return meta, manifest


NEEDED_AFTER_TRAINING = ("sklearn", "matplotlib", "skimage", "scipy", "PIL")  # the dermoscopy check, plots, the split


def rescue(work: Path, out: Path, error: BaseException | None = None) -> None:
    """What cannot be rebuilt without the GPU, in OUT: the best checkpoint of the most advanced run, its weights
    in fp16 (it loads like any checkpoint: export, calibrate and dermoscopy-check take it on a CPU), with every run's history.
    Written as soon as training ends (error None; the full release replaces it at the end, so a run killed at its
    time limit still sends the student back) and again after a failure."""
    for run in ("resnet18_kd", "resnet18"):
        best = work / run / "best.pt"
        if best.exists():
            break
    else:
        print(f"nothing to send back: no run finished ({error or 'no error'})", flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "release"
        folder.mkdir()
        ckpt = torch.load(best, map_location="cpu", weights_only=False)
        ckpt["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
        torch.save(ckpt, folder / f"{run}_best.pt")
        for path in [*work.glob("*/history.csv"), *work.glob("*.json"), *work.glob("*/budget.json")]:
            shutil.copy(path, folder / f"{path.parent.name}_{path.name}" if path.parent != work else folder / path.name)
        state = f"{type(error).__name__}: {error}" if error else "training done; the steps after it did not end"
        pack(folder, out, {"error": state, "rescued": f"{run}_best.pt"})
    print(f"{run}/best.pt (fp16) and the histories are in {out} ({state})", flush=True)


def run(args: argparse.Namespace) -> list[Path]:
    started = time.time()
    if not args.out:
        raise StudyError("no --out and no $OUT: say where the files should go")
    import importlib.util

    missing = [m for m in NEEDED_AFTER_TRAINING if importlib.util.find_spec(m) is None]
    if missing:  # found out now, not after the GPU time is spent
        raise StudyError(f"python {sys.version.split()[0]} here lacks {', '.join(missing)}, needed after training")
    out, work = Path(args.out), Path(args.work)
    device = resolve_device(args.device)
    cap = 3 if args.quick else args.max_epochs
    data = D.DataConfig(data=args.data, img_size=args.img_size, resize_size=args.resize_size,
                        cache_dir=str(work / "cache"))
    study = StudyConfig(out=str(work), data=data, epochs_resnet18=cap, epochs_resnet50=cap, epochs_kd=cap,
                        batch_size=args.batch_size, grid=True, grid_epochs=cap,
                        grid_max_train_images=args.grid_images, device=args.device,
                        teacher_tta=args.teacher_tta, recipe_search=args.recipe_search, recipe_epochs=cap,
                        recipe_sizes=[args.img_size],
                        recipe=Recipe.from_args(args),
                        release_dir=str(work / "release"), version=args.version,
                        command="training/accelerator.sh " + " ".join(sys.argv[2:]))
    if args.quick:
        study = dataclasses.replace(study.quick(), epochs_resnet18=cap, epochs_kd=cap, grid_max_train_images=None)
    elif args.preflight and device.type == "cuda":
        # Every step once on the GPU at 32 px before the real run: a CUDA-only fault then stops it before the long
        # steps, not after them. Its budget path runs too (3 epochs capped, a budget of 60 s).
        t0 = time.time()
        run_study(dataclasses.replace(study.quick(), out=str(work / "preflight"), epochs_resnet18=3, epochs_kd=3,
                                      release_dir=str(work / "preflight" / "release"), time_budget=60.0,
                                      grid_max_train_images=None))
        print(f"preflight: every step ran on {device} in {time.time() - t0:.0f} s", flush=True)
    study.time_budget = max(1.0, args.budget - args.after_training - (time.time() - started))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"accelerator study on {device} ({gpu}): {study.time_budget:.0f} s for training, {args.budget:.0f} s in all",
          flush=True)
    if (work / "release").exists():
        shutil.rmtree(work / "release")  # a release is rebuilt from the (resumable) runs every time
    try:
        meta = run_study(study, after_training=lambda: rescue(work, out))
    except Exception as error:  # noqa: BLE001 - whatever broke, the trained weights must still come back
        rescue(work, out, error)
        raise
    results = json.loads((work / "report" / "results.json").read_text())
    runs = {p.name: _throughput(p) for p in sorted(work.iterdir()) if (p / "history.csv").exists()}
    runs.update({f"grid/{p.name}": _throughput(p) for p in sorted((work / "grid").glob("a*_t*"))})
    extra = {
        "version": meta.version, "device": gpu,
        "torch": torch.__version__, "img_size": study.data.img_size, "batch_size": study.batch_size,
        "budget_s": args.budget, "training_budget_s": round(study.time_budget, 1), "runs": runs,
        "test": {name: {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
                 for name, m in results["models"].items()},
        "split_hash": results["split_hash"], "seconds": round(time.time() - started, 1),
    }
    files = pack(work / "release", out, extra)
    print(f"{len(files)} files in {out} after {time.time() - started:.0f} s; rebuild the release with\n"
          f"  python -m training unpack --from {out} --release release-{meta.version}", flush=True)
    return files


def main(args: argparse.Namespace):
    return run(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
