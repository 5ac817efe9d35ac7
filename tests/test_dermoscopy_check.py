"""What the dermoscopy check is fitted and judged on: shifted lesion copies that the service can decode,
non-dermoscopy pools that never overlap, a head that separates what it was given, and the table the README and
the model card print. Fast tier: synthetic lesions stand in for HAM10000 here; the release test re-measures the
real check on real test lesions.
"""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from skinmodel.inputs import PreprocessConfig
from skinmodel.networks import dermoscopy_check_score
from skinmodel.preprocessing import preprocess_bytes
from training.dermoscopy.check import fit_head, render_comparison, render_table
from training.dermoscopy import pool
from training.dermoscopy.shifts import FAMILIES, shifted

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


def _packages(source) -> set[str]:
    """The packages a source reads: "deb:a+b" is two; scikit-image's LFW faces are scikit-image's."""
    registry, _, names = source.package.partition(":")
    return {f"{registry}:{n.split(':')[0]}" for n in names.split("+")} if names else {registry}


def test_every_package_feeds_one_part_only_so_held_out_sources_are_never_fitted():
    """Split by source, not by picture: a package whose pictures are held out (val, test) may not give a single
    picture to the fitting pool, nor the validation sources to the test ones."""
    owner = {}
    for source in pool.SOURCES:
        for package in _packages(source):
            assert owner.setdefault(package, source.part) == source.part, (package, owner[package], source.part)
    for part in pool.PARTS:
        kinds = " ".join(s.kind for s in pool.sources(part))
        assert "photographs" in kinds, f"{part}: photographs are the pictures that leaked: every part needs some"
    assert len(pool.sources("val")) >= 3 and len(pool.sources("test")) >= 3
    assert {s.name for s in pool.sources("test")} >= {"scikit-image photographs", "LFW faces (scikit-image)"}


def test_a_gimp_pattern_file_reads_as_its_pixels():
    pixels = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(3, 4, 3)
    name = b"tiny\0"
    header = struct.pack(">5I4s", 24 + len(name), 1, 4, 3, 3, b"GPAT") + name
    img = pool.read_gimp_pattern(header + pixels.tobytes())
    assert img.size == (4, 3) and img.mode == "RGB" and (np.asarray(img) == pixels).all()
    with pytest.raises(ValueError):
        pool.read_gimp_pattern(header.replace(b"GPAT", b"GBRH") + pixels.tobytes())


def test_each_file_counts_whole_and_as_crops_of_half_and_a_quarter_of_its_side():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 1024, 3), dtype=np.uint8))
    views = pool.views(img, np.random.default_rng(1))
    assert [v.size for v in views] == [(512, 300), (512, 300), (256, 150)]  # at most 512 px, the model sees 96
    assert len(pool.views(img.resize((100, 60)), np.random.default_rng(1))) == 2  # no crop under 24 px


def test_the_head_separates_what_it_saw_and_stores_fp32_statistics():
    """What it claims, no more: the fitted head scores through skinmodel.networks.dermoscopy_check_score (the function
    the handler calls) as the logit of "not dermoscopy", and its statistics are fp32. The handler itself answering
    with these statistics is tests/test_verdicts.py's."""
    gen = torch.Generator().manual_seed(0)
    lesions = torch.randn(400, 16, generator=gen) + 2.0
    others = torch.randn(400, 16, generator=gen) - 2.0
    stats = fit_head(lesions, others, strength=1.0)
    s_lesion, s_other = dermoscopy_check_score(lesions, stats), dermoscopy_check_score(others, stats)
    assert (s_other > 0).float().mean() > 0.95 and (s_lesion < 0).float().mean() > 0.95  # logit of "not dermoscopy"
    assert all(v.dtype == torch.float32 for v in stats.values())  # saved as scored: the handler reads them as is


def test_a_column_that_never_varied_cannot_decide_the_score():
    """A colour cell empty in every fitted picture and lesion: an upload that fills it moves the score by a bounded
    amount (the scale floor), not by a z-score of a million."""
    from training.dermoscopy.rejectors import SCALE_FLOOR, fit_logistic, fit_mlp

    gen = torch.Generator().manual_seed(0)
    lesions = torch.cat([torch.randn(300, 8, generator=gen) + 2.0, torch.zeros(300, 1)], 1)
    others = torch.cat([torch.randn(300, 8, generator=gen) - 2.0, torch.zeros(300, 1)], 1)
    hostile = lesions[:50].clone()
    hostile[:, 8] = 1.0  # the never-seen column at its largest value (a histogram share of 1)
    for stats in (fit_logistic(lesions, [others], 1.0, per_source=False), fit_mlp(lesions, [others], epochs=5)):
        assert float(stats["scale"][8]) == pytest.approx(SCALE_FLOOR)
        moved = (dermoscopy_check_score(hostile, stats) - dermoscopy_check_score(lesions[:50], stats)).abs().max()
        assert float(moved) < 100


def test_the_mlp_head_separates_what_a_line_cannot_and_scores_through_the_served_function():
    """Pictures on both sides of the lesions (a ring no single line separates): the one-hidden-layer head refuses
    them through dermoscopy_check_score, as the handler scores; its statistics are fp32 and seeded."""
    from training.dermoscopy.rejectors import fit_mlp

    gen = torch.Generator().manual_seed(0)
    lesions = torch.randn(600, 8, generator=gen) * 0.5
    sides = [torch.randn(300, 8, generator=gen) * 0.5 + 4.0, torch.randn(300, 8, generator=gen) * 0.5 - 4.0]
    stats = fit_mlp(lesions, sides, hidden=16, epochs=20, seed=0)
    assert (dermoscopy_check_score(lesions, stats) < 0).float().mean() > 0.95
    assert all((dermoscopy_check_score(side, stats) > 0).float().mean() > 0.95 for side in sides)
    line = fit_head(lesions, torch.cat(sides), strength=1.0)
    assert min((dermoscopy_check_score(side, line) > 0).float().mean() for side in sides) < 0.9  # why a hidden layer
    assert all(v.dtype == torch.float32 for v in stats.values())
    again = fit_mlp(lesions, sides, hidden=16, epochs=20, seed=0)
    assert all(torch.equal(stats[k], again[k]) for k in stats)


def test_render_table_shows_every_family_class_and_held_out_source():
    check = {"test_lesions_refused": 0.004, "test_rejected_per_class": {"mel": 0.009, "vasc": 0.0},
             "test_rejected_per_shift": {"unshifted": {"all": 0.004, "mel": 0.009, "balanced_accuracy": 0.6},
                                         "blur": {"all": 0.02, "mel": 0.031, "balanced_accuracy": 0.5}},
             "non_skin_sets": {"Pingus data": {"images": 90, "not_dermoscopy": 0.97, "uncertain": 0.02, "ok": 0.01,
                                               "auroc": 0.9995}},
             "held_out_sources": {"images": 90, "not_dermoscopy": 0.97, "uncertain": 0.02, "ok": 0.01},
             "test_auroc_all": 0.9995}
    table = render_table(check)
    assert "0.4% overall" in table and "mel 0.9%" in table and "vasc 0.0%" in table
    assert "| blur | 2.0% | 3.1% | 0.500 |" in table
    assert "| Pingus data | 90 | 97.0% | 2.0% | 1.0% | 1.000 |" in table
    assert "| all held-out sources | 90 | 97.0% | 2.0% | 1.0% | 1.000 |" in table


def test_render_comparison_marks_the_chosen_rejector():
    row = {"mean_refused": 0.9, "min_refused": 0.8, "mean_ok": 0.01, "worst_family_refused": 0.02}
    check = {"rejector": "b", "rejector_comparison": {"a": row, "b": {**row, "mean_refused": 0.95}}}
    text = render_comparison(check)
    assert "| a | 99.5% | 90.0% | 80.0% | 1.0% | 2.0% |" in text and "| b (chosen) | 99.5% | 95.0% |" in text


def _val(shift_offset: float, n: int = 2000):
    """Validation lesions: scores ~ N(0, 1) plain and under one shift (moved by shift_offset), two classes."""
    g = torch.Generator().manual_seed(0)
    plain = torch.randn(n, generator=g)
    return {"plain": plain, "shift": {"blur": plain + shift_offset}, "labels": torch.arange(n) % 2}


def test_the_lesion_keep_is_the_smallest_whose_validation_refusals_stay_within_the_limits():
    """The refusal threshold keeps as few lesions as LESION_LIMITS allow on validation. Shifted copies scoring
    far above the plain lesions fill the refused tail: a smaller keep fits until a shift family passes its limit.
    Shifted copies like the plain ones: the plain lesions fill it, only the most cautious keep fits. Shifted
    copies far below: none fits, and the most cautious is used. Pictures far above are refused in every case."""
    from training.dermoscopy.rejectors import LESION_LIMITS, SEARCHED_KEEPS, Candidate, evaluate, within_limits

    identity = Candidate("identity", lambda x: x, None)
    pics = {"far": {"feats": torch.full((50,), 10.0), "top": torch.ones(50)}}
    up = evaluate(identity, _val(3.0), pics, 0.0, SEARCHED_KEEPS)
    assert up["lesion_keep"] == 0.99 and within_limits(up) and up["val_lesions_refused"] == 0.0
    smaller = evaluate(identity, _val(3.0), pics, 0.0, keeps=(0.985,))
    assert smaller["worst_family_refused"] > LESION_LIMITS["family"]  # why 0.99 and not 0.985
    alike = evaluate(identity, _val(0.0), pics, 0.0, SEARCHED_KEEPS)
    assert alike["lesion_keep"] == max(SEARCHED_KEEPS) and within_limits(alike)
    down = evaluate(identity, _val(-3.0), pics, 0.0, SEARCHED_KEEPS)
    assert down["lesion_keep"] == max(SEARCHED_KEEPS) and not within_limits(down)
    assert all(r["per_source"]["far"]["not_dermoscopy"] == 1.0 for r in (up, alike, down))
