"""Build the TorchServe archive (.mar) of a release: its weights and meta.json, the handler, and the
skinmodel package as a folder. `./skin archive` and archive.sh (a thin wrapper) call build_mar; `./skin up`
calls ensure_archive, which rebuilds only when an input is newer than the archive or the version differs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from skinmodel.release import CHECK_STATS_FILE, ReleaseError, ReleaseMeta
from stack.settings import REPO

HANDLER = REPO / "handler" / "skin_handler.py"
MODEL_CONFIG = REPO / "handler" / "model-config.yaml"
CORE = REPO / "skinmodel"
OPTIONAL = ("model_card.md",)  # shipped when the release has it; the dermoscopy check's statistics when meta.json
# names them (as dermoscopy_check.pt, whichever name an older release folder gave them)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class ArchiveError(RuntimeError):
    pass


def inputs(release: Path) -> list[Path]:
    """Every file the archive is made of: a change to any of them makes the archive stale."""
    meta = ReleaseMeta.load(release)
    stats = meta.check_stats_path(release)
    return [release / "meta.json", release / meta.weights_file, HANDLER, MODEL_CONFIG, *sorted(CORE.glob("*.py")),
            *(release / f for f in OPTIONAL if (release / f).exists()), *([stats] if stats else [])]


def mar_version(mar: Path) -> str:
    with zipfile.ZipFile(mar) as z:
        return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]


def build_mar(release: Path, out_dir: Path, name: str | None = None, version: str | None = None,
              file_name: str | None = None, model_config: Path = MODEL_CONFIG) -> tuple[ReleaseMeta, Path]:
    """OUT/<name>.mar from the release; the meta.json inside carries the name and version it is served as.
    model_config (workers, batching) is handler/model-config.yaml unless a test needs other batching."""
    release, out_dir = Path(release), Path(out_dir)
    meta = ReleaseMeta.load(release)
    meta.name, meta.version = name or meta.name, version or meta.version
    if not NAME.fullmatch(meta.name):
        raise ArchiveError(f"model name {meta.name!r} may only use letters, digits, '.', '_' and '-'")
    weights = release / meta.weights_file
    if not weights.is_file():
        raise ArchiveError(f"weights file {weights} (named in {release / 'meta.json'}) is missing")
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    if not archiver.exists():
        found = shutil.which("torch-model-archiver")
        if not found:
            raise ArchiveError("torch-model-archiver not found: install requirements.txt (./skin up does it)")
        archiver = Path(found)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        # The archiver copies a folder's contents to the archive root: stage skinmodel/ one level down.
        shutil.copytree(CORE, stage / "code" / "skinmodel", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        extra = [stage / "code", stage / "meta.json", *(release / f for f in OPTIONAL if (release / f).exists())]
        stats = meta.check_stats_path(release)
        if stats is not None:
            shutil.copy(stats, stage / CHECK_STATS_FILE)
            meta.dermoscopy_check = {**meta.dermoscopy_check, "stats_file": CHECK_STATS_FILE}
            extra.append(stage / CHECK_STATS_FILE)
        meta.save(stage / "meta.json")
        (stage / "tmp").mkdir()
        r = subprocess.run([str(archiver), "--model-name", meta.name, "--version", meta.version,
                            "--serialized-file", str(weights), "--handler", str(HANDLER),
                            "--extra-files", ",".join(map(str, extra)), "--config-file", str(model_config),
                            "--export-path", str(stage), "--force"], capture_output=True, text=True,
                           # The archiver assembles its files in $TMPDIR/<model name>: a private folder, so two
                           # builds of the same model at once (./skin up and ops publish) cannot mix their files.
                           env={**os.environ, "TMPDIR": str(stage / "tmp")})
        if r.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed: {r.stderr.strip()[-2000:]}")
        mar = out_dir / (file_name or f"{meta.name}.mar")
        shutil.move(str(stage / f"{meta.name}.mar"), mar)
    return meta, mar


def ensure_archive(release: Path, store: Path, force: bool = False, log=print) -> tuple[str, Path]:
    """The release's archive in store, rebuilt when missing, older than any input, or of another version."""
    try:
        meta = ReleaseMeta.load(release)
    except ReleaseError as exc:
        raise ArchiveError(f"{exc} (the committed release model should be there, or train one: "
                           "python -m training all --quick --release-dir release)") from None
    mar = Path(store) / f"{meta.name}.mar"
    stale = (force or not mar.exists() or mar.stat().st_mtime < max(p.stat().st_mtime for p in inputs(release))
             or mar_version(mar) != meta.version)
    if stale:
        log(f"building {mar} ...")
        meta, mar = build_mar(release, store)
        log(f"built {mar} ({meta.name} {meta.version}, {mar.stat().st_size / 2**20:.0f} MB)")
    return meta.name, mar
