"""What the "is this dermoscopy" gate is fitted and judged on: shifted lesion copies that the service can decode,
non-dermoscopy pools that never overlap, a head that separates what it was given, and the table the README and
the model card print. Fast tier: synthetic lesions stand in for HAM10000 here; the release test re-measures the
real gate on real test lesions.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from skinmodel.inputs import PreprocessConfig
from skinmodel.networks import ood_score
from skinmodel.preprocessing import preprocess_bytes
from training.release.abstention import fit_head, render_table
from training.release.nonskin import evaluation_sets, fitting_negatives, fitting_pool
from training.release.shifts import FAMILIES, shifted

pytestmark = pytest.mark.fast
CFG = PreprocessConfig(64, 56, (0.5,) * 3, (0.25,) * 3)


def _lesion(seed: int = 0) -> Image.Image:
    """A brown blob on skin tone, HAM10000's size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:150, 0:200]
    blob = (((xx - 100) / 60) ** 2 + ((yy - 75) / 45) ** 2) < 1
    arr = np.where(blob[..., None], [90, 60, 40], [220, 170, 150]) + rng.normal(0, 6, (150, 200, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_shift_changes_the_image_reproducibly_and_the_service_decodes_it(family):
    img = _lesion()
    a, b, other = shifted(img, family, 7), shifted(img, family, 7), shifted(img, family, 8)
    assert a == b, "a seed must give the same copy (the reported figures must be reproducible)"
    assert a != other, "another seed must give another draw"
    out = Image.open(io.BytesIO(a)).convert("RGB")
    if out.size == img.size:
        assert np.abs(np.asarray(out, np.int16) - np.asarray(img, np.int16)).mean() > 1.0, "the shift did nothing"
    x = preprocess_bytes(a, CFG)  # the same decoder the handler uses: a copy it refused would measure nothing
    assert x.shape == (3, 56, 56) and torch.isfinite(x).all()


def test_jpeg_family_really_sends_low_quality_jpegs():
    blob = shifted(_lesion(), "JPEG quality 30-60", 3)
    assert blob[:3] == b"\xff\xd8\xff" and len(blob) < len(shifted(_lesion(), "blur", 3))


def test_the_fitting_pools_and_the_evaluation_sets_never_share_a_file():
    train, val = fitting_negatives("train", 1), fitting_negatives("val", 1)
    digest = lambda blobs: {hashlib.sha256(b).digest() for b in blobs}  # noqa: E731
    assert len(val) * 3 < len(train) and not digest(train) & digest(val)
    sets = evaluation_sets(train + val)
    assert set(sets) == {"scikit-image photographs", "LFW faces (scikit-image)", "generated"}
    for name, blobs in sets.items():
        assert blobs and not digest(blobs) & digest(train + val), name
    # Without the exclusion the drawn black and white pictures would be shared: the exclusion is what keeps
    # "never fitted on" true.
    assert len(evaluation_sets()["generated"]) > len(sets["generated"])
    faces = [np.asarray(Image.open(io.BytesIO(b)).convert("L").resize((40, 40))) for b in sets["LFW faces (scikit-image)"]]
    fitted = {np.asarray(Image.open(io.BytesIO(b)).convert("L").resize((40, 40))).tobytes() for b in train + val}
    assert not any(f.tobytes() in fitted for f in faces), "an evaluation face is also a fitting face"


def test_the_held_out_pictures_cover_every_source_of_the_fitting_pool():
    pool = fitting_pool(1)
    fitted = {src for src, _, held in pool if not held}
    held = [src for src, _, h in pool if h]
    # Each source (photo crops, face-free backgrounds, every drawn kind) must be in both parts: the head's
    # strength is chosen on the held-out part, so a kind it lacks would never count. Only plain black or white
    # ("drawn 8": four possible files, all fitted) cannot be held out without sharing a file.
    assert len(fitted) == 12 and set(held) == fitted - {"drawn 8"}, (fitted, set(held))
    assert 0.15 < len(held) / len(pool) < 0.21


def test_head_scores_the_way_the_handler_does_and_separates_what_it_saw():
    gen = torch.Generator().manual_seed(0)
    lesions = torch.randn(400, 16, generator=gen) + 2.0
    others = torch.randn(400, 16, generator=gen) - 2.0
    stats = fit_head(lesions, others, strength=1.0)
    s_lesion, s_other = ood_score(lesions, stats), ood_score(others, stats)
    assert (s_other > 0).float().mean() > 0.95 and (s_lesion < 0).float().mean() > 0.95  # logit of "not dermoscopy"
    assert all(v.dtype == torch.float32 for v in stats.values())  # saved as scored: the handler reads them as is


def test_render_table_shows_every_family_class_and_set():
    ab = {"test_lesions_rejected_as_ood": 0.004, "test_rejected_per_class": {"mel": 0.009, "vasc": 0.0},
          "test_rejected_per_shift": {"unshifted": {"all": 0.004, "mel": 0.009, "balanced_accuracy": 0.6},
                                      "blur": {"all": 0.02, "mel": 0.031, "balanced_accuracy": 0.5}},
          "non_skin_sets": {"generated": {"images": 90, "rejected": 0.99, "auroc": 0.9995}}}
    table = render_table(ab)
    assert "0.4% overall" in table and "mel 0.9%" in table and "vasc 0.0%" in table
    assert "| blur | 2.0% | 3.1% | 0.500 |" in table and "| generated | 90 | 99% | 1.000 |" in table
