"""The distillation loss does what the reference project's did not: it actually distils."""
from __future__ import annotations

import pytest

import torch
import torch.nn.functional as F

from skinmodel.networks import DihedralTTA, ProbabilityEnsemble, build_model
from training.network.recipe import kd_loss

pytestmark = pytest.mark.fast


def test_kd_term_is_positive_when_teacher_and_student_differ():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 7), torch.randn(8, 7), torch.randint(0, 7, (8,))
    _, kd, _ = kd_loss(s, t, y, alpha=0.5, temperature=4.0)
    assert kd.item() > 1e-3


def test_kd_term_is_zero_when_they_agree():
    s, y = torch.randn(8, 7), torch.randint(0, 7, (8,))
    total, kd, ce = kd_loss(s, s.clone(), y, alpha=0.5, temperature=4.0)
    assert abs(kd.item()) < 1e-6
    assert torch.isclose(total, 0.5 * ce)


def test_alpha_weights_the_two_terms():
    s, t, y = torch.randn(4, 7), torch.randn(4, 7), torch.randint(0, 7, (4,))
    total1, kd, ce = kd_loss(s, t, y, alpha=1.0, temperature=2.0)
    total0, _, _ = kd_loss(s, t, y, alpha=0.0, temperature=2.0)
    assert torch.isclose(total1, kd) and torch.isclose(total0, ce)
    # the T^2 factor: the KD term equals T^2 * KL of the softened distributions
    expected = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    assert torch.isclose(kd, expected, atol=1e-6)


def test_the_loaded_teacher_stays_frozen_through_the_projects_own_training_steps(tmp_path):
    """The teacher as the study loads it (training.common.checkpoint.load_teacher, from a checkpoint file) and two
    real steps of training.network.train.train_one_epoch: the student learns, the teacher does not change at all,
    BatchNorm statistics included (a teacher left in train mode would update them on every forward pass)."""
    from skinmodel.inputs import PreprocessConfig
    from training.common.checkpoint import atomic_save, load_teacher
    from training.common.device import Runtime
    from training.network.train import Batches, TrainConfig, train_one_epoch

    torch.manual_seed(0)
    cfg = PreprocessConfig(32, 32, (0.5,) * 3, (0.25,) * 3)
    atomic_save({"arch": "resnet18", "class_names": list("abcdefg"), "model": build_model("resnet18", 7).state_dict(),
                 "preprocessing": cfg.to_dict()}, tmp_path / "teacher.pt")
    teacher = load_teacher([str(tmp_path / "teacher.pt")], expected_cfg=cfg)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    rt = Runtime(torch.device("cpu"), "fp32")
    student = rt.prepare(build_model("resnet18", 7))
    first = next(student.parameters()).detach().clone()
    run = TrainConfig(out=str(tmp_path / "run"), batch_size=4, alpha=0.9, temperature=5.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    data = Batches(torch.randint(0, 256, (8, 3, 32, 43), dtype=torch.uint8), torch.randint(0, 7, (8,)),
                   torch.ones(7), steps=2)
    sums = train_one_epoch(run, rt, student, student, None, rt.prepare(teacher), optimizer, scheduler, data, cfg, 0, "kd")
    assert sums["kd"] > 0, "no distillation term: the teacher did not take part"
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()), "teacher (incl. BN stats) changed"
    assert not torch.equal(first, next(student.parameters())), "student did not learn"


def test_ensemble_teacher_returns_log_of_mean_probabilities():
    torch.manual_seed(0)
    a, b = build_model("resnet18", 7).eval(), build_model("resnet18", 7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ProbabilityEnsemble([a, b])(x)
        expected = (a(x).softmax(1) + b(x).softmax(1)) / 2
    assert torch.allclose(out.exp(), expected, atol=1e-6)


def test_a_tta_teacher_answers_the_same_for_every_flip_and_right_angle_turn():
    torch.manual_seed(0)
    model = build_model("resnet18", 7).eval()
    tta, x = DihedralTTA(model).eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = tta(x)
        assert torch.allclose(out.exp().sum(1), torch.ones(2), atol=1e-5)
        for view in (torch.rot90(x, 1, (2, 3)), x.flip(3), torch.rot90(x, 3, (2, 3)).flip(2)):
            assert torch.allclose(tta(view), out, atol=1e-5)
        assert not torch.allclose(model(torch.rot90(x, 1, (2, 3))).log_softmax(1), model(x).log_softmax(1), atol=1e-3)
