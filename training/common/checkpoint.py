"""Checkpoints that rebuild themselves: each file carries its architecture, classes and preprocessing."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from skinmodel.inputs import PreprocessConfig
from skinmodel.networks import DihedralTTA, ProbabilityEnsemble, build_model, load_state_dict_file


class StudyError(RuntimeError):
    """A step's inputs do not fit (a checkpoint of another split, a teacher of other preprocessing, weights of
    another architecture): phrased for the person running the study, shown without a traceback."""


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise StudyError(f"{path} is not a checkpoint written by this project's training")
    return ckpt


def model_from_checkpoint(path) -> tuple[nn.Module, dict]:
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["arch"], len(ckpt["class_names"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def checkpoint_preprocessing(ckpt: dict) -> PreprocessConfig:
    return PreprocessConfig.from_dict(ckpt["preprocessing"])


TTA_PREFIX = "tta:"


def teacher_spec(checkpoints: list[str], tta: bool = False) -> str:
    """The one-string name of a teacher that models_from_spec rebuilds."""
    return (TTA_PREFIX if tta else "") + "+".join(checkpoints)


def models_from_spec(spec: str) -> tuple[nn.Module, dict]:
    """'a.pt', 'a.pt+b.pt' (an ensemble averaging probabilities), either behind 'tta:' (the 8 dihedral views
    averaged) -> (model, the first checkpoint)."""
    tta = spec.startswith(TTA_PREFIX)
    models, ckpts = zip(*(model_from_checkpoint(p) for p in spec.removeprefix(TTA_PREFIX).split("+")))
    model = models[0] if len(models) == 1 else ProbabilityEnsemble(list(models))
    return (DihedralTTA(model) if tta else model).eval(), ckpts[0]


def load_init_weights(model: nn.Module, path) -> list[str]:
    """Initialise from a state_dict file (e.g. ImageNet weights a user has locally). Only the final
    classifier may differ (the 1000-class head is re-initialised); anything else that does not fit is an error."""
    state = load_state_dict_file(path)
    own = model.state_dict()
    last_linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    head = {f"{last_linear}.weight", f"{last_linear}.bias"}
    misfits = [k for k in own if k not in head and (k not in state or state[k].shape != own[k].shape)]
    if misfits:
        raise StudyError(f"{path} does not match this architecture: {len(misfits)} of {len(own)} tensors are "
                         f"missing or of another shape (first: {misfits[0]})")
    skipped = sorted(k for k in head if k not in state or state[k].shape != own[k].shape)
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in skipped}, strict=False)
    return skipped


def load_teacher(checkpoints, weights=None, arch=None, num_classes=7, expected_cfg: PreprocessConfig | None = None,
                 tta: bool = False):
    """A frozen teacher: one checkpoint, several (averaged as an ensemble) or a plain state_dict file; with tta,
    every prediction averaged over the 8 dihedral views."""
    members = []
    for path in checkpoints or []:
        model, ckpt = model_from_checkpoint(path)
        cfg = checkpoint_preprocessing(ckpt)
        if expected_cfg and (cfg.crop_size, cfg.mean, cfg.std) != (expected_cfg.crop_size, expected_cfg.mean,
                                                                    expected_cfg.std):
            raise StudyError(f"teacher {path} was trained with other preprocessing ({cfg}); "
                             f"distillation needs the student's ({expected_cfg})")
        members.append(model)
    if weights:
        if not arch:
            raise StudyError("--teacher-weights needs --teacher-arch")
        model = build_model(arch, num_classes)
        model.load_state_dict(load_state_dict_file(weights))
        members.append(model)
    if not members:
        return None
    teacher = members[0] if len(members) == 1 else ProbabilityEnsemble(members)
    teacher = DihedralTTA(teacher) if tta else teacher
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
