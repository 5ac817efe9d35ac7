"""meta.json, typed: the metadata that travels with a release's weights, read and written only through
ReleaseMeta (load / save), as timm's pretrained_cfg travels with its weights.

Every reader (the handler, the page build, the archive, ops, the model card) and every writer (export,
calibration, abstention thresholds, int8 quantization, the archive's renaming) goes through this class, so
the file has one schema, a version, atomic writes, and one serialised form of the preprocessing.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from skinmodel.inputs import PreprocessConfig
from skinmodel.labels import CONCERNING

SCHEMA = 1
FILE_NAME = "meta.json"
MODEL_NAME = "skin-lesion"  # the name a release is served under unless it says otherwise


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
    concerning: list[str] = field(default_factory=list)  # codes the page words more strongly when ranked high
    temperature: float = 1.0
    weights_file: str = "model.pt"
    weights_dtype: str = "float16"
    weights_sha256: str = ""
    split_hash: str = ""
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    created: str = ""
    calibration: dict | None = None
    abstention: dict | None = None
    quantization: dict | None = None
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

    @classmethod
    def from_dict(cls, d: dict, source: str = "meta.json") -> "ReleaseMeta":
        if d.get("schema", SCHEMA) > SCHEMA:
            raise ReleaseError(f"{source} has schema {d['schema']}; this code reads up to {SCHEMA} (update the code)")
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
