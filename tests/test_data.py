"""Loading HAM10000, the lesion-grouped split and the loader's error messages."""
from __future__ import annotations

import shutil
from collections import Counter

import pytest

from training.common import data as D


@pytest.fixture(scope="module")
def records(data_dir):
    return D.load_records(data_dir)


def test_loads_all_images_with_metadata(records):
    assert len(records) == 10015
    assert Counter(r.dx for r in records) == {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113,
                                              "nv": 6705, "vasc": 142}


def test_split_has_no_lesion_in_two_splits(records):
    split = D.split_records(records, seed=0)
    lesions_by_split = {s: {r.lesion_id for r in split if r.split == s} for s in D.SPLITS}
    assert not lesions_by_split["train"] & lesions_by_split["val"]
    assert not lesions_by_split["train"] & lesions_by_split["test"]
    assert not lesions_by_split["val"] & lesions_by_split["test"]
    sizes = Counter(r.split for r in split)
    for s, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert abs(sizes[s] / len(split) - share) < 0.02
    # stratified: every class in every split, at roughly its overall share
    for s in D.SPLITS:
        counts = D.class_counts([r for r in split if r.split == s])
        assert all(c > 0 for c in counts)
        assert abs(counts[D.CLASS_NAMES.index("nv")] / sizes[s] - 6705 / 10015) < 0.02


def test_split_is_deterministic_and_hashed(records, tmp_path):
    h1 = D.write_splits(D.split_records(records, seed=0), tmp_path / "a.csv")
    h2 = D.write_splits(D.split_records(records, seed=0), tmp_path / "b.csv")
    h3 = D.write_splits(D.split_records(records, seed=1), tmp_path / "c.csv")
    assert h1 == h2 != h3
    assert (tmp_path / "a.csv").read_text().startswith("image_id,lesion_id,dx,split\n")


def _mini_dataset(tmp_path, data_dir, n=6, layout="nested"):
    rows = (data_dir / "HAM10000_metadata.csv").read_text().splitlines()
    header, body = rows[0], rows[1:n + 1]
    (tmp_path / "HAM10000_metadata.csv").write_text("\n".join([header, *body]) + "\n")
    for i, line in enumerate(body):
        image_id = line.split(",")[1]
        folder = tmp_path / (f"HAM10000_images_part_{1 + i % 2}" if layout == "nested" else "")
        folder.mkdir(exist_ok=True)
        shutil.copy(next(data_dir.rglob(f"{image_id}.jpg")), folder / f"{image_id}.jpg")
    return body


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_finds_images_anywhere_below_root(tmp_path, data_dir, layout):
    body = _mini_dataset(tmp_path, data_dir, layout=layout)
    assert [r.image_id for r in D.load_records(tmp_path)] == sorted(line.split(",")[1] for line in body)


@pytest.mark.fast
def test_missing_metadata_is_a_clear_error(tmp_path):
    with pytest.raises(D.DataError, match="no HAM10000_metadata.csv"):
        D.load_records(tmp_path)


def test_missing_images_are_named_and_counted(tmp_path, data_dir):
    body = _mini_dataset(tmp_path, data_dir)
    gone = [line.split(",")[1] for line in body[:2]]
    for image_id in gone:
        next(tmp_path.rglob(f"{image_id}.jpg")).unlink()
    with pytest.raises(D.DataError) as err:
        D.load_records(tmp_path)
    assert f"2 of {len(body)} images" in str(err.value) and gone[0] in str(err.value)


def test_unknown_dx_is_a_clear_error(tmp_path, data_dir):
    _mini_dataset(tmp_path, data_dir)
    meta = tmp_path / "HAM10000_metadata.csv"
    lines = meta.read_text().splitlines()
    lines[1] = lines[1].replace(",bkl,", ",melanoma,")
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(D.DataError, match="unknown dx value.*melanoma"):
        D.load_records(tmp_path)


def test_imagefolder_layout_keeps_its_split(tmp_path, sample_images):
    for split in D.SPLITS:
        for img in sample_images[:3]:
            dx = ["akiec", "bcc", "bkl"][sample_images.index(img)]
            (tmp_path / split / dx).mkdir(parents=True, exist_ok=True)
            shutil.copy(img, tmp_path / split / dx / img.name)
    records = D.split_records(D.load_records(tmp_path))
    assert Counter(r.split for r in records) == {"train": 3, "val": 3, "test": 3}
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(D.DataError, match="unknown class folder"):
        D.load_records(tmp_path)


@pytest.mark.fast
def test_no_data_dir_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HAM10000_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(D.DataError, match="does not exist"):
        D.resolve_data_dir(None)
