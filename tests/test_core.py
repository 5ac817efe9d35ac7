"""The shared core on synthetic data: ReleaseMeta, settings, features by hook, Grad-CAM, the audit contract,
and the archive that ships the core as a folder. Fast tier: no Java, PostgreSQL, browser or HAM10000."""
from __future__ import annotations

import io
import json
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from skinmodel.audit import EVENT_COLUMNS, make_event
from skinmodel.gradcam import grad_cam
from skinmodel.inputs import PreprocessConfig
from skinmodel.preprocessing import COLOUR_LAYOUT, COLOUR_STATISTICS
from skinmodel.networks import (build_model, check_inputs, dermoscopy_check_score, features_and_logits,
                                load_check_statistics, name_colour_layout, validate_check_statistics)
from skinmodel.release import SCHEMA, ReleaseError, ReleaseMeta
from stack.settings import Settings

pytestmark = pytest.mark.fast
REPO = Path(__file__).resolve().parents[1]
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def synthetic_release(folder: Path, seed: int = 0) -> ReleaseMeta:
    """A random ResNet18 at 32 px written as a release: weights + meta.json, nothing trained."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model("resnet18", len(CLASSES))
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, folder / "model.pt")
    meta = ReleaseMeta("skin-lesion", "0.0-synthetic", "resnet18", CLASSES, [c.upper() for c in CLASSES],
                       [""] * len(CLASSES), PreprocessConfig(32, 32, (0.5,) * 3, (0.25,) * 3))
    meta.save(folder)
    return meta


def test_release_meta_round_trips_and_writes_atomically(tmp_path, monkeypatch):
    meta = synthetic_release(tmp_path / "r")
    meta.dermoscopy_check = {"uncertain_below": 0.4, "refuse_above": 9.0}
    meta.save(tmp_path / "r")
    again = ReleaseMeta.load(tmp_path / "r")
    assert again == meta and again.input_size == 32 and again.num_classes == 7
    on_disk = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert on_disk["schema"] == SCHEMA and on_disk["preprocessing"]["crop_size"] == 32
    before = (tmp_path / "r" / "meta.json").read_bytes()

    def crash(*_args):
        raise OSError("the machine died here")

    monkeypatch.setattr("skinmodel.release.os.replace", crash)  # a crash between writing and renaming
    again.temperature = 2.0
    with pytest.raises(OSError):
        again.save(tmp_path / "r")
    assert (tmp_path / "r" / "meta.json").read_bytes() == before, "a crash mid-save changed meta.json"


def test_keys_a_newer_writer_added_are_kept(tmp_path):
    synthetic_release(tmp_path)
    doc = json.loads((tmp_path / "meta.json").read_text())
    doc["subgroups"] = {"sex": {"female": 0.6}}
    (tmp_path / "meta.json").write_text(json.dumps(doc))
    meta = ReleaseMeta.load(tmp_path)
    meta.temperature = 1.5
    meta.save(tmp_path)
    assert json.loads((tmp_path / "meta.json").read_text())["subgroups"] == {"sex": {"female": 0.6}}


@pytest.mark.parametrize("broken,message", [
    ({"schema": SCHEMA + 1}, "schema"), ({"arch": None}, "lacks arch"), ("not json", "not a usable meta.json"),
])
def test_release_meta_refuses_what_it_cannot_read(tmp_path, broken, message):
    meta = synthetic_release(tmp_path)
    doc = meta.to_dict()
    if isinstance(broken, dict):
        doc.update(broken)
        doc = {k: v for k, v in doc.items() if v is not None}
        (tmp_path / "meta.json").write_text(json.dumps(doc))
    else:
        (tmp_path / "meta.json").write_text(broken)
    with pytest.raises(ReleaseError, match=message):
        ReleaseMeta.load(tmp_path)
    with pytest.raises(ReleaseError, match="missing"):
        ReleaseMeta.load(tmp_path / "nowhere")


# Schema 1's keys of the dermoscopy check (formerly "abstention"), as release 1.2's meta.json had them before the
# rename, keyed by their names now.
SCHEMA_1_NAMES = {"refuse_above": "ood_score_above", "clear_below": "ood_score_clear_below", "method": "ood_method",
                  "stats_file": "ood_stats_file", "test_lesions_refused": "test_lesions_rejected_as_ood",
                  "test_lesions_check_uncertain": "test_lesions_gate_uncertain", "test_auroc_all": "test_ood_auroc_all",
                  "sources": "gate_sources"}
SCHEMA_1_KEYS = ["gate_sources", "held_out_sources", "non_skin_sets", "ood_method", "ood_score_above",
                 "ood_score_clear_below", "ood_stats_file", "rejector", "rejector_comparison", "test_accuracy_confident",
                 "test_accuracy_uncertain", "test_lesions_gate_uncertain", "test_lesions_rejected_as_ood",
                 "test_ood_auroc_all", "test_rejected_per_class", "test_rejected_per_shift", "test_uncertain_share",
                 "uncertain_below"]


def _schema_1(doc: dict) -> dict:
    """A schema-2 meta.json dict put back in schema 1's shape (its dermoscopy check formerly "abstention")."""
    doc = dict(doc)
    check = doc.pop("dermoscopy_check")
    return {**doc, "schema": 1, "abstention": {SCHEMA_1_NAMES.get(k, k): v for k, v in check.items()}}


def test_a_schema_1_meta_json_reads_as_the_committed_release(tmp_path):
    """The committed release/meta.json with its dermoscopy check renamed back to schema 1's keys: ReleaseMeta
    migrates it on read to exactly the committed release's meta, and writes it back in the new shape."""
    committed = json.loads((REPO / "release" / "meta.json").read_text())
    old = _schema_1(committed)
    assert sorted(old["abstention"]) == SCHEMA_1_KEYS and "dermoscopy_check" not in old
    (tmp_path / "meta.json").write_text(json.dumps(old))
    migrated = ReleaseMeta.load(tmp_path)
    assert migrated == ReleaseMeta.load(REPO / "release")
    assert json.loads(migrated.save(tmp_path / "again.json").read_text()) == committed


@pytest.mark.parametrize("stats_file", ["ood_stats.pt", "dermoscopy_check.pt"])
def test_an_older_release_folder_keeps_refusing(tmp_path, stats_file):
    """A schema-1 release folder (its statistics formerly ood_stats.pt, or renamed since): the handler finds them and
    refuses with them; its archive ships them as dermoscopy_check.pt, named so in the meta.json inside."""
    from handler.skin_handler import SkinLesionHandler
    from stack.archive import build_mar

    meta = synthetic_release(tmp_path / "r")
    torch.save({"mean": torch.zeros(512), "scale": torch.ones(512), "weight": torch.zeros(512),
                "bias": torch.tensor(5.0)}, tmp_path / "r" / stats_file)  # every image scores 5
    check = {"uncertain_below": 0.0, "refuse_above": 1.0, "stats_file": "ood_stats.pt"}
    (tmp_path / "r" / "meta.json").write_text(json.dumps(_schema_1({**meta.to_dict(), "dermoscopy_check": check})))
    png = io.BytesIO()
    Image.new("RGB", (200, 150), (200, 120, 100)).save(png, "PNG")
    answer = SkinLesionHandler.in_process(tmp_path / "r").answer([png.getvalue()])[0]
    assert answer["verdict"] == "not_dermoscopy", answer
    _, mar = build_mar(tmp_path / "r", tmp_path / "store")
    with zipfile.ZipFile(mar) as z:
        assert json.loads(z.read("meta.json"))["dermoscopy_check"]["stats_file"] == "dermoscopy_check.pt"
        assert z.read("dermoscopy_check.pt") == (tmp_path / "r" / stats_file).read_bytes()


def test_settings_come_from_defaults_then_environment():
    d = Settings.from_env({})
    assert (d.site_port, d.inference_port, d.management_port) == (8000, 8080, 8081)
    assert d.key_file == d.state_dir / "torchserve" / "key_file.json" and d.audit_database.startswith("sqlite:///")
    e = Settings.from_env({"SKIN_SITE_PORT": "9000", "SKIN_STATE_DIR": "/tmp/x", "SKIN_TOKEN_AUTH": "false",
                           "DATABASE_URL": "postgresql://db/skin"})
    assert e.site_port == 9000 and e.spool == Path("/tmp/x/spool") and e.token_auth is False
    assert e.audit_database == "postgresql://db/skin" and e.page_url == "http://127.0.0.1:9000"


def test_each_default_is_written_once():
    """grep over the code (tests aside): each port, folder, file name, the model name and the body cap are set in
    one place (docstrings and help texts aside: the patterns match code, not prose)."""
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True)
    code = [REPO / f for f in tracked.stdout.split() if not f.startswith("tests/") and (REPO / f).is_file()]
    kserve = "stack/settings.py|ops/kserve.py"  # the local defaults; KServe's runtime has ports of its own
    for literal, home in ((r"\b8000\b", "stack/settings.py"), (r"\b8080\b", kserve),
                          (r"\b8081\b", kserve), (r"\b8082\b", kserve),
                          (r'REPO / "release"', "stack/settings.py"), (r'REPO / "model_store"', "stack/settings.py"),
                          (r'"\.stack"', "stack/settings.py"), (r'= "key_file\.json"', "stack/tokens.py"),
                          (r'"skin-lesion"', "skinmodel/release.py"), (r'"max_request_size"', "stack/gate.py|stress/bombs.py|ops/kserve.py"),
                          (r"10485760|10 \* 2\*\*20", "$^")):
        hits = sorted(p.relative_to(REPO).as_posix() for p in code if re.search(literal, p.read_text()))
        assert all(re.fullmatch(home, h) for h in hits) and (hits or home == "$^"), (literal, hits)


def _resnet_features(m, x):
    """The reference: the penultimate features computed block by block (what the hook replaced)."""
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return torch.flatten(m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(x))))), 1)


def test_features_come_from_the_forward_hook_unchanged():
    torch.manual_seed(0)
    model = build_model("resnet18", 7).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats, logits = features_and_logits(model, x)
        assert torch.equal(feats, _resnet_features(model, x)) and torch.equal(logits, model(x))
    assert feats.shape == (3, 512) and not model.fc._forward_hooks, "the hook was left on the network"


def test_features_of_the_int8_network_are_dequantized():
    from skinmodel.networks import quantizable_resnet18

    torch.manual_seed(0)
    prepared = quantizable_resnet18(7, build_model("resnet18", 7).state_dict())
    with torch.no_grad():
        prepared(torch.randn(8, 3, 32, 32))  # observers see some activations
    int8 = torch.ao.quantization.convert(prepared).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = features_and_logits(int8, x)
        reference = int8.dequant(_resnet_features(int8, int8.quant(x)))
    assert not feats.is_quantized and torch.equal(feats, reference) and torch.equal(logits, int8(x))


def test_the_dermoscopy_check_score_reads_either_kind_of_statistics():
    torch.manual_seed(0)
    feats = torch.cat([torch.randn(50, 8) + 5, torch.randn(50, 8) - 5])
    means = torch.stack([feats[:50].mean(0), feats[50:].mean(0)])
    near, far = dermoscopy_check_score(torch.stack([means[0], torch.full((8,), 40.0)]), {"means": means, "precision": torch.eye(8)})
    assert near == 0 and far > 30  # release 1.0's first statistics: the distance to the nearest class mean
    head = {"mean": torch.zeros(8), "scale": torch.full((8,), 2.0), "weight": torch.ones(8), "bias": torch.tensor(-1.0)}
    assert torch.allclose(dermoscopy_check_score(torch.full((1, 8), 4.0), head), torch.tensor([15.0]))  # 8 * 4/2 - 1: a logit
    # one hidden layer: unit 0 sees 8 * 4/2 = 16, unit 1 sees -16 and is cut by the ReLU; 2 * 16 - 1
    mlp = {**head, "hidden_weight": torch.stack([torch.ones(8), -torch.ones(8)]), "hidden_bias": torch.zeros(2),
           "weight": torch.tensor([2.0, 5.0])}
    assert torch.allclose(dermoscopy_check_score(torch.full((1, 8), 4.0), mlp), torch.tensor([31.0]))


def test_the_check_reads_the_columns_its_statistics_were_fitted_on():
    """Statistics fitted on the features alone (releases up to 1.3) score the features of check_inputs' rows as
    before; statistics fitted on features and colours read the colours too, and refuse rows without them."""
    torch.manual_seed(0)
    feats, colour = torch.randn(5, 8), torch.randn(5, 3)
    inputs = check_inputs(feats, colour)
    features_only = {"mean": torch.randn(8), "scale": torch.rand(8) + 0.5, "weight": torch.randn(8),
                     "bias": torch.tensor(0.3)}
    assert torch.equal(dermoscopy_check_score(inputs, features_only), dermoscopy_check_score(feats, features_only))
    energy = {"fc_weight": torch.randn(7, 8), "fc_bias": torch.randn(7)}
    assert torch.equal(dermoscopy_check_score(inputs, energy), dermoscopy_check_score(feats, energy))
    with_colour = {"mean": torch.zeros(11), "scale": torch.ones(11), "weight": torch.tensor([0.0] * 8 + [1.0, 2.0, 3.0]),
                   "bias": torch.tensor(0.0)}
    assert torch.allclose(dermoscopy_check_score(inputs, with_colour), colour @ torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="reads 11 columns"):
        dermoscopy_check_score(feats, with_colour)


@pytest.mark.parametrize("width, ok", [(512, True), (512 + COLOUR_STATISTICS, True), (520, False), (256, False)])
def test_check_statistics_of_another_width_are_refused_when_the_release_loads(width, ok):
    """Features alone or features and every colour statistic: any other width was fitted elsewhere."""
    stats = {"mean": torch.zeros(width), "scale": torch.ones(width), "weight": torch.zeros(width), "bias": torch.tensor(0.0)}
    if ok:
        validate_check_statistics(stats, 512)
    else:
        with pytest.raises(ValueError, match=f"read {width} columns"):
            validate_check_statistics(stats, 512)


def test_check_statistics_fitted_on_another_colour_layout_are_refused_when_the_release_loads(tmp_path):
    """Statistics that read colours carry the name of their layout through the file; a handler computing another
    layout refuses them, and files saved before the name existed (2.1, 2.2) count as the first layout."""
    width = 512 + COLOUR_STATISTICS
    stats = {"mean": torch.zeros(width), "scale": torch.ones(width), "weight": torch.zeros(width),
             "bias": torch.tensor(0.0, dtype=torch.float64)}
    named = name_colour_layout(stats, 512)
    assert named["colour_layout"] == COLOUR_LAYOUT and "colour_layout" not in name_colour_layout(
        {k: v[:512] if v.dim() else v for k, v in stats.items()}, 512)  # features alone: no colours, no name
    torch.save(named, tmp_path / "check.pt")
    loaded = load_check_statistics(tmp_path / "check.pt")
    assert loaded["colour_layout"] == COLOUR_LAYOUT and loaded["bias"].dtype == torch.float32
    validate_check_statistics(loaded, 512)
    validate_check_statistics(stats, 512)  # unnamed: the first layout, today's
    with pytest.raises(ValueError, match="colour layout 'rgb-grid-8'"):
        validate_check_statistics({**loaded, "colour_layout": "rgb-grid-8"}, 512)


@pytest.mark.parametrize("folder", ["release", "release/2.1", "release/1.3"])
def test_the_committed_checks_read_what_this_code_computes(folder):
    """Every committed release's check loads as the handler loads it: its width and colour layout (2.1 and 2.2 were
    saved before the layout had a name) are the ones this code computes, or they would be served on other colours."""
    release = Path(__file__).resolve().parents[1] / folder
    meta = ReleaseMeta.load(release)
    stats = load_check_statistics(meta.check_stats_path(release))
    validate_check_statistics(stats, build_model(meta.arch, meta.num_classes).fc.in_features)


def test_grad_cam_explains_the_requested_class():
    torch.manual_seed(0)  # a random network whose class-0 map is not all zeros
    model = build_model("resnet18", 7).eval()
    x = torch.randn(1, 3, 64, 64)
    # the reference, by hand: gradients of the class score with respect to the last block's output
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    fmap = model.layer4(model.layer3(model.layer2(model.layer1(h))))
    score = model.fc(torch.flatten(model.avgpool(fmap), 1))[0, 0]
    (grads,) = torch.autograd.grad(score, fmap)
    ref = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * fmap).sum(1, keepdim=True)).detach()
    ref = torch.nn.functional.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    ref = (ref - ref.min()) / (ref - ref.min()).max()
    for p in model.parameters():
        p.requires_grad_(False)  # frozen weights still explain: the graph starts at the input
    cam, explained, logits = grad_cam(model, x, target=0)
    assert explained == 0 and logits.shape == (1, 7) and not model.layer4._forward_hooks
    assert cam.shape == (64, 64) and cam.max() == 1 and torch.allclose(torch.from_numpy(cam), ref, atol=1e-5)


def test_audit_events_fill_exactly_the_table_columns(tmp_path):
    meta = synthetic_release(tmp_path)
    event = make_event("r1", meta, "sha", {"sha256": "i", "bytes": 3, "format": "PNG", "width": 2, "height": 2}, 1.0,
                       [1 / 7] * 7, answer={"verdict": "ok"})
    assert set(event) <= set(EVENT_COLUMNS)
    schema = (REPO / "logger" / "schema.sql").read_text()
    table = schema[schema.index("CREATE TABLE IF NOT EXISTS predictions"):schema.index(");")]
    columns = [line.split()[0] for line in table.splitlines()[1:] if line.strip() and not line.strip().startswith("--")]
    assert columns == [*EVENT_COLUMNS, "inserted_at"], "schema.sql and skinmodel/audit.py disagree"


def test_a_refused_answer_is_audited_without_a_top_class(tmp_path):
    """The audit row says what the user saw: no top class when the API's top was null."""
    from skinmodel.answers import format_prediction

    meta = synthetic_release(tmp_path)
    meta.dermoscopy_check = {"uncertain_below": 0.3, "refuse_above": 1.0}
    meta.concerning = ["akiec", "bcc", "mel"]
    probs = [0.05, 0.05, 0.05, 0.05, 0.6, 0.1, 0.1]
    image = {"sha256": "i", "bytes": 3, "format": "PNG", "width": 2, "height": 2}
    refused = format_prediction(probs, meta, "r1", check_score=5.0)
    event = make_event("r1", meta, "sha", image, 1.0, probs, answer=refused, kind="explanation")
    assert refused["top"] is None and event["verdict"] == "not_dermoscopy" and event["kind"] == "explanation"
    assert event["top_class"] is None and event["top_probability"] is None
    assert event["probabilities"]["mel"] == 0.6  # the probabilities stay, for audits of the dermoscopy check
    assert event["concern_flagged"] is None  # nothing was urged about a refused picture
    answered = format_prediction(probs, meta, "r2", check_score=0.0)
    event = make_event("r2", meta, "sha", image, 1.0, probs, answer=answered)
    assert (event["top_class"], event["verdict"], event["kind"]) == ("mel", "ok", "prediction")
    assert event["concern_flagged"] is True and answered["concern"]["flagged"]  # the audit says who was told
    meta.concern = {"threshold": 0.9}  # mel 0.6 + the other concerning classes' 0.1 stay below
    quiet = format_prediction(probs, meta, "r3", check_score=0.0)
    assert make_event("r3", meta, "sha", image, 1.0, probs, answer=quiet)["concern_flagged"] is False


def test_the_archive_ships_the_core_as_a_folder_and_the_served_name(tmp_path):
    from stack.archive import build_mar, ensure_archive, mar_version

    synthetic_release(tmp_path / "release")
    meta, mar = build_mar(tmp_path / "release", tmp_path / "store", version="9.9")
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        inside = json.loads(z.read("meta.json"))
    assert {"skin_handler.py", "model.pt", "meta.json", "skinmodel/preprocessing.py", "skinmodel/release.py"} <= names
    assert not any("__pycache__" in n for n in names) and not any(n.startswith("code/") for n in names)
    assert inside["version"] == "9.9" == mar_version(mar) == meta.version
    name, again = ensure_archive(tmp_path / "release", tmp_path / "store2")  # missing: built
    stamp = again.stat().st_mtime_ns
    assert ensure_archive(tmp_path / "release", tmp_path / "store2") == (name, again)
    assert again.stat().st_mtime_ns == stamp, "an up-to-date archive was rebuilt"
