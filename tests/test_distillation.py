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


def test_teacher_is_frozen_and_gets_no_gradient_through_a_step():
    torch.manual_seed(0)
    student, teacher = build_model("resnet18", 7), build_model("resnet18", 7)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 7, (4,))
    student_before = [p.clone() for p in student.parameters()][0]
    with torch.no_grad():
        t_logits = teacher(x)
    loss, kd, _ = kd_loss(student(x), t_logits, y, alpha=0.9, temperature=5.0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert kd.item() > 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()), "teacher (incl. BN stats) changed"
    assert not torch.equal(student_before, next(student.parameters())), "student did not learn"


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
