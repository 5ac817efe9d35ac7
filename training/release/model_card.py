"""Render release/model_card.md (Mitchell et al., 2019 sections) from meta.json and results.json: every number
in the card comes from those two files, which the study wrote."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from skinmodel.answers import FORMER_CONCERN_RULE
from skinmodel.release import ReleaseMeta
from training.common.checkpoint import StudyError
from training.dermoscopy.check import SCORES_PNG, render_table
from training.common.metrics import wilson
from training.evaluation.subgroups import render_subgroups

SERVED_TEST = "served_test"  # the release's own folder for its served-model test report


def confusions(matrix, names, top: int = 4) -> list[str]:
    pairs = [(matrix[i][j], names[i], names[j]) for i in range(len(names)) for j in range(len(names)) if i != j]
    return [f"{true} predicted as {pred}: {n} test images" for n, true, pred in sorted(pairs, reverse=True)[:top] if n]


def _recall_rows(meta: dict, cm) -> list[str]:
    """Per-class test recall of the model with 95 % Wilson intervals, one table row per class."""
    rows = []
    for i, (c, full) in enumerate(zip(meta["class_names"], meta["class_full_names"])):
        n, hit = sum(cm[i]), cm[i][i]
        lo, hi = wilson(hit, n)
        rows.append(f"| {c} | {full} | {n} | {hit / n if n else float('nan'):.2f} | {lo:.2f}-{hi:.2f} |")
    return rows


def _check_table(check: dict) -> str:
    """The dermoscopy check's figures: the shift table of the current check, or the older per-set table."""
    if "test_rejected_per_shift" in check:
        return render_table(check)
    return "\n".join(["| non-skin set | images | rejected | AUROC vs test lesions |", "|---|---|---|---|"]
                     + [f"| {name} | {v['images']} | {v['rejected']:.0%} | {v['auroc']:.3f} |"
                        for name, v in (check.get("non_skin_sets") or {}).items()])


def _subgroups(served_test: dict | None) -> str:
    if not served_test:
        return ("## Subgroups\nNot measured for this release (python -m training evaluate-release --release release "
                "--data <HAM10000 folder> --split test --out release/served_test).")
    return (render_subgroups(served_test["subgroups"], "Subgroups (test split, the release as served)")
            + "\nThe test split is small per group: read the intervals, and the groups marked too small not at all.")


def _continued(args: dict, meta: dict) -> str:
    """Where a run that started from earlier weights (--init-weights) started: a release of this project, so no
    outside data (the file as it was at the recorded commit)."""
    init = args.get("init_weights")
    return (f" in its last run, which continued from `{init}` as committed at git "
            f"{meta.get('training', {}).get('git_sha', '')[:10]}" if init else "")


def _card_head(meta: dict, t: dict, names: list[str]) -> str:
    """Model details, intended and out-of-scope use."""
    return f"""# Model card: {meta['name']} {meta['version']}

## Model details
- {meta['arch']} trained from scratch on HAM10000 at {meta['input_size']} px, {'distilled from a teacher' if
  meta.get('training', {}).get('distilled') else 'no teacher'}{_continued(t, meta)}; weights stored as {meta.get('weights_dtype')}
  (sha256 `{meta.get('weights_sha256', '')[:16]}...`). Trained with `{meta.get('training', {}).get('command', '')}`
  (git {meta.get('training', {}).get('git_sha', '')[:10]}), {t.get('epochs', '?')} epochs, best epoch
  {meta.get('training', {}).get('best_epoch', '?')} chosen on validation macro-F1.
- Output: probabilities over {len(names)} classes ({', '.join(names)}), temperature-scaled (T =
  {meta.get('temperature', 1.0):.3f}), plus a verdict: `ok`, `uncertain` or `not_dermoscopy`.

## Intended use
Research and teaching: exploring how a small CNN ranks dermoscopy images of pigmented lesions, and as a
reference implementation of a calibrated, audited serving stack. A clinician may look at its ranking as one
more input, never as a decision.

## Out-of-scope use
Diagnosis, triage or reassurance of patients; any use without a clinician; photographs that are not
dermoscopy (phone snapshots, non-skin images: the service tries to refuse these); lesion types outside the
7 classes (e.g. squamous cell carcinoma other than Bowen's, Merkel cell carcinoma); children; nails and mucosa.
"""


def _card_data_and_metrics(meta: dict, results: dict, others: str, rows: list[str], baseline: dict) -> str:
    """The data, the split, and the test metrics with per-class recall."""
    return f"""## Data
HAM10000 (Tschandl, Rosendahl & Kittler, Sci. Data 2018; CC BY-NC 4.0): 10,015 dermoscopy images of 7,470
pigmented lesions from the Medical University of Vienna (Austria) and Cliff Rosendahl's practice in Queensland
(Australia), about half confirmed by histopathology, the rest by follow-up, expert consensus or confocal
microscopy. The dataset does not record skin type; its Central-European and Australian patients are
predominantly fair-skinned, so performance on darker skin is unknown and likely worse. Images used at 200x150 (a 1/3 downscale of the originals).

Split: 60/20/20 by `lesion_id`, stratified by diagnosis (split sha256 `{meta['split_hash'][:16]}...`), so no
lesion has images in two splits. Test: {results['n_test_images']} images of {results['n_test_lesions']} lesions.

## Test metrics ({results['n_test_images']} images, never used for any choice)
| model | accuracy | balanced accuracy | macro-F1 |
|---|---|---|---|
{others}

Per-class recall of this model with 95 % Wilson intervals (small classes are very uncertain):

| code | class | test images | recall | 95 % CI |
|---|---|---|---|---|
{chr(10).join(rows)}

Always answering `nv` scores accuracy {baseline.get('accuracy', float('nan')):.3f}: accuracy alone says little
on this data; look at balanced accuracy and per-class recall.
"""


def _concern(concern: dict | None) -> str:
    """When the page urges an examination (meta.json's concern, chosen by training/release/concern.py)."""
    head = "## When the answer urges an examination\n"
    if not concern or "test" not in concern:
        rule = "threshold " + f"{concern['threshold']:.3f}" if (concern or {}).get("threshold") is not None else None
        return head + f"Flagged by {rule or FORMER_CONCERN_RULE} (no figures measured for this release).\n"
    t, old, v, former_v = concern["test"], concern["test_former_rule"], concern["val"], concern["val_former_rule"]
    if concern["threshold"] is not None:
        rule = (f"flagged when it reaches {concern['threshold']:.3f} ({concern['method']}; validation: "
                f"{v['sensitivity']:.1%} of concerning lesions' images flagged, {v['benign_flagged']:.1%} of benign, "
                f"against {former_v['sensitivity']:.1%} and {former_v['benign_flagged']:.1%} by the former rule: "
                f"{FORMER_CONCERN_RULE})")
        now, before = t, old
    else:
        rule = (f"flagged by the former rule ({FORMER_CONCERN_RULE}): on validation it flagged "
                f"{former_v['benign_flagged']:.1%} of benign lesions, a threshold of "
                f"{concern['candidate_threshold']:.3f} flagging as many concerning lesions would have flagged {v['benign_flagged']:.1%}")
        now, before = old, t
    return head + f"""Every answer carries `concern`: the calibrated probability of the possibly malignant classes together,
{rule}. The page then asks for a dermatologist's examination. On the test split, as served: images of concerning
lesions flagged **{now['sensitivity']:.1%}** ({now['concerning_images']} images), benign lesions flagged
**{now['benign_flagged']:.1%}**; the other rule would have flagged {before['sensitivity']:.1%} and
{before['benign_flagged']:.1%}. (`python -m training concern --release <this folder>`.)
"""


def _card_answers(meta: dict, cal: dict, check: dict, table: str, names: list[str], cm, subgroups: str) -> str:
    """Calibration, the dermoscopy check (check: meta.json's dermoscopy_check), failure modes, subgroups, ethics."""
    return f"""## Calibration
Temperature scaling fitted on validation: test ECE {cal.get('test_ece_before', float('nan')):.3f} ->
{cal.get('test_ece_after', float('nan')):.3f} (15 bins), test NLL {cal.get('test_nll_before', float('nan')):.3f} ->
{cal.get('test_nll_after', float('nan')):.3f}. Reliability diagram: `reliability.png`. Class weights in training
push probability towards rare classes, so probabilities are not prevalence-calibrated per class.

## Uncertain and non-dermoscopy inputs (the dermoscopy check)
- `uncertain` when the calibrated top probability is below {check.get('uncertain_below', float('nan')):.3f}
  ({check.get('test_uncertain_share', float('nan')):.0%} of test lesions; accuracy {check.get('test_accuracy_confident') or float('nan'):.2f}
  on the rest vs {check.get('test_accuracy_uncertain') or float('nan'):.2f} on the flagged ones).
- `not_dermoscopy` when the dermoscopy check's score exceeds {check.get('refuse_above', float('nan')):.2f}
  ({check.get('method', '')}): {check.get('test_lesions_refused', float('nan')):.1%} of real test lesions are
  wrongly refused; AUROC lesions vs all pictures that are not dermoscopy {check.get('test_auroc_all', float('nan')):.3f}.
  Shifted test copies (other cameras, light, focus, compression, framing) and pictures the check never saw
  (`python -m training dermoscopy-check --release release` prints this table; `{SCORES_PNG}` shows where the
  scores of each group fall against the threshold):

{table}

{_concern(meta.get('concern'))}
## Known failure modes
{chr(10).join('- ' + line for line in confusions(cm, names))}
- Trained from scratch on a CPU budget at low resolution: far below published ImageNet-pretrained results.
- Not evaluated on real images from other dermatoscopes, clinics or skin types. The shifted copies above stand
  in for them: they show how often the dermoscopy check refuses such images and how much balanced accuracy
  drops, not how the model does on a real other population, which is likely worse.

{subgroups}

## Ethical considerations
A wrong "benign" answer can delay care; the page therefore always shows all classes, a persistent
"not a diagnosis" notice and asks for an examination when the possibly malignant classes reach the threshold above. It stores no image unless its
operator switches on review retention (SKIN_REVIEW_KEEP_DAYS), which keeps uploads answered `uncertain` or
`not_dermoscopy` for that many days, and the page then says so.
"""


def render(meta: dict, results: dict, key: str, served_test: dict | None = None) -> str:
    """The card's text: the template below, filled from meta.json, results.json and the served test report."""
    m = results["models"][key]
    names, cm = meta["class_names"], m["confusion_matrix"]
    rows = _recall_rows(meta, cm)
    cal, check = meta.get("calibration") or {}, meta.get("dermoscopy_check") or {}
    baseline = results["models"].get("majority class (always nv)", {})
    others = "\n".join(f"| {name} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | {r['macro_f1']:.3f} |"
                       for name, r in results["models"].items())
    table, subgroups = _check_table(check), _subgroups(served_test)
    t = meta.get("training", {}).get("args", {})
    return (_card_head(meta, t, names) + "\n" + _card_data_and_metrics(meta, results, others, rows, baseline)
            + "\n" + _card_answers(meta, cal, check, table, names, cm, subgroups))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write model_card.md from meta.json + results.json.", add_help=add_help)
    p.add_argument("--release", required=True, help="folder with meta.json and results.json")
    p.add_argument("--results-key", default="resnet18 distilled")
    p.add_argument("--variant", action="append", default=[],
                   help="a variant folder (the int8 one): its card is this card with its own concern rule")
    return p


def write_model_card(release: Path, results_key: str = "resnet18 distilled") -> Path:
    """release/model_card.md from the release's meta.json and results.json."""
    release = Path(release)
    meta = ReleaseMeta.load(release).to_dict()
    results = json.loads((release / "results.json").read_text())
    served = release / SERVED_TEST / "results.json"  # python -m training evaluate-release --release ... --split test
    out = release / "model_card.md"
    out.write_text(render(meta, results, results_key, json.loads(served.read_text()) if served.exists() else None))
    print(f"wrote {out}")
    return out


def write_variant_card(release: Path, variant: Path) -> Path:
    """A variant's card (the int8 network's): the release's card, with the variant's own concern rule."""
    text = (Path(release) / "model_card.md").read_text()
    ours, theirs = _concern(ReleaseMeta.load(release).concern), _concern(ReleaseMeta.load(variant).concern)
    if ours not in text:
        raise StudyError(f"{Path(release) / 'model_card.md'} is older than its meta.json: run model-card first")
    out = Path(variant) / "model_card.md"
    out.write_text(text.replace(ours, theirs))
    print(f"wrote {out}")
    return out


def main(args: argparse.Namespace) -> Path:
    card = write_model_card(Path(args.release), args.results_key)
    for variant in args.variant:
        write_variant_card(Path(args.release), Path(variant))
    return card


if __name__ == "__main__":
    main(get_args_parser().parse_args())
