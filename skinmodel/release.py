"""meta.json, typed: the metadata that travels with a release's weights, read and written only through
ReleaseMeta (load / save), as timm's pretrained_cfg travels with its weights.

Every reader (the handler, the page build, the archive, ops, the model card) and every writer (export,
calibration, the dermoscopy check, int8 quantization, the archive's renaming) goes through this class, so
the file has one schema, a version, atomic writes, and one serialised form of the preprocessing.

Schema 2 names the dermoscopy check `dermoscopy_check`; schema 1 files (its keys formerly `abstention` and
`ood_*`) are migrated on read (`migrate`), so older release folders keep loading and keep refusing.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from skinmodel.inputs import PreprocessConfig
from skinmodel.labels import CONCERNING

SCHEMA = 2
FILE_NAME = "meta.json"
MODEL_NAME = "skin-lesion"  # the name a release is served under unless it says otherwise
CHECK_STATS_FILE = "dermoscopy_check.pt"  # the dermoscopy check's statistics, beside the weights
FORMER_CHECK_STATS_FILE = "ood_stats.pt"  # their file name in release folders written before schema 2
# Schema 1's names (formerly) of the dermoscopy check's keys: the block was "abstention", the threshold of
# release 1.0 "ood_distance_above"; any other "ood_" key loses the prefix.
FORMER_CHECK_KEYS = {"ood_distance_above": "refuse_above", "ood_score_above": "refuse_above",
                     "ood_score_clear_below": "clear_below", "ood_stats_file": "stats_file",
                     "test_lesions_rejected_as_ood": "test_lesions_refused",
                     "test_lesions_gate_uncertain": "test_lesions_check_uncertain",
                     "test_ood_auroc_all": "test_auroc_all", "gate_sources": "sources"}


class ReleaseError(ValueError):
    """A meta.json that cannot be used, phrased for the person who has to fix it."""


@dataclass
class ReleaseMeta:
    name: str
    version: str
    arch: str
    class_names: list[str]
    class_full_names: list[str]
    class_descriptions: list[str]
    preprocessing: PreprocessConfig
    concerning: list[str] = field(default_factory=list)  # possibly malignant codes (answers.concern sums them)
    temperature: float = 1.0
    weights_file: str = "model.pt"
    weights_dtype: str = "float16"
    weights_sha256: str = ""
    split_hash: str = ""
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    created: str = ""
    calibration: dict | None = None
    dermoscopy_check: dict | None = None  # thresholds, statistics file and figures of the "is it dermoscopy" check
    quantization: dict | None = None
    concern: dict | None = None  # when an answer urges an examination: threshold and figures (answers.concern)
    schema: int = SCHEMA
    extra: dict = field(default_factory=dict)  # keys this code does not know (a newer writer's): kept, written back

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_size(self) -> int:
        return self.preprocessing.crop_size

    def to_dict(self) -> dict:
        out = {"schema": self.schema, "name": self.name, "version": self.version, "arch": self.arch,
               "num_classes": self.num_classes, "class_names": list(self.class_names),
               "class_full_names": list(self.class_full_names), "class_descriptions": list(self.class_descriptions),
               "input_size": self.input_size, "preprocessing": self.preprocessing.to_dict()}
        for f in dataclasses.fields(self):
            if f.name not in out and f.name not in ("preprocessing", "extra"):
                value = getattr(self, f.name)
                if value is not None:
                    out[f.name] = value
        return {**out, **{k: v for k, v in self.extra.items() if k not in out}}

    def check_stats_path(self, folder: Path | str) -> Path | None:
        """The dermoscopy check's statistics in a release folder: the file meta.json names, else the file under its
        current or its former name; None for a release without a check."""
        named = (self.dermoscopy_check or {}).get("stats_file")
        if not named:
            return None
        for name in (named, CHECK_STATS_FILE, FORMER_CHECK_STATS_FILE):
            if (Path(folder) / name).is_file():
                return Path(folder) / name
        raise ReleaseError(f"{Path(folder) / named} is missing: the dermoscopy check's statistics, named in meta.json")

    @classmethod
    def from_dict(cls, d: dict, source: str = "meta.json") -> "ReleaseMeta":
        if d.get("schema", SCHEMA) > SCHEMA:
            raise ReleaseError(f"{source} has schema {d['schema']}; this code reads up to {SCHEMA} (update the code)")
        d = migrate(d)
        missing = [k for k in ("name", "version", "arch", "class_names", "preprocessing") if k not in d]
        if missing:
            raise ReleaseError(f"{source} lacks {', '.join(missing)}")
        names = list(d["class_names"])
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in d.items() if k in known}
        derived = ("num_classes", "input_size")  # written for readers, recomputed from the fields
        values["extra"] = {k: v for k, v in d.items() if k not in known and k not in derived}
        values.update(name=str(d["name"]), version=str(d["version"]), class_names=names,
                      class_full_names=list(d.get("class_full_names", names)),
                      class_descriptions=list(d.get("class_descriptions", [""] * len(names))),
                      # meta.json written before "concerning" travelled with it: HAM10000's malignant classes
                      concerning=list(d.get("concerning", [c for c in CONCERNING if c in names])),
                      preprocessing=PreprocessConfig.from_dict(d["preprocessing"]),
                      temperature=float(d.get("temperature", 1.0)))
        _check_concern(values, names, source)
        return cls(**values)

    @classmethod
    def load(cls, path: Path | str) -> "ReleaseMeta":
        """From a release folder or a meta.json path."""
        path = Path(path)
        path = path if path.suffix == ".json" else path / FILE_NAME
        if not path.is_file():
            raise ReleaseError(f"{path} is missing: export a model first (python -m training export ... or "
                               "python -m training all)")
        try:
            return cls.from_dict(json.loads(path.read_text()), str(path))
        except (ValueError, KeyError, TypeError) as exc:
            raise ReleaseError(f"{path} is not a usable meta.json: {exc}") from None

    def save(self, path: Path | str) -> Path:
        """Atomically, into a release folder or to a meta.json path: a crash never leaves half a file."""
        path = Path(path)
        path = path if path.suffix == ".json" else path / FILE_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path


def _check_concern(values: dict, names: list[str], source: str) -> None:
    """What answers.concern reads, checked when a release loads rather than failing on a request."""
    unknown = [c for c in values["concerning"] if c not in names]
    if unknown:
        raise ReleaseError(f"{source}: concerning classes {', '.join(map(str, unknown))} are not among class_names")
    rule = values.get("concern")
    if rule is not None and not isinstance(rule, dict):
        raise ReleaseError(f"{source}: concern must be an object")
    t = (rule or {}).get("threshold")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1):
        raise ReleaseError(f"{source}: the concern threshold {t!r} is not a probability")


def migrate(d: dict) -> dict:
    """A meta.json dict in schema 2's shape: schema 1's "abstention" block and any top-level "ood_*" key become
    the "dermoscopy_check" block, their keys renamed (FORMER_CHECK_KEYS); values are kept as they are."""
    if d.get("schema", 1) >= 2:
        return d
    top = {k: v for k, v in d.items() if k.startswith("ood_")}
    out = {k: v for k, v in d.items() if k != "abstention" and k not in top}
    block = {**(d.get("abstention") or {}), **top}
    if block:
        out["dermoscopy_check"] = {FORMER_CHECK_KEYS.get(k, k.removeprefix("ood_")): v for k, v in block.items()}
    return {**out, "schema": SCHEMA}
