"""What an answer looks like: the prediction JSON (every class, ranked; the verdict; the model; the notice)
and the JSON of a refusal. The handler, the tools that read answers and the tests share these.
"""
from __future__ import annotations

from skinmodel.inputs import InputError
from skinmodel.release import ReleaseMeta

NOTICE = ("Research software, not a medical device. This is not a diagnosis: consult a dermatologist or other "
          "qualified clinician about any skin lesion.")


VERDICT_REASONS = {
    "ok": "the image looks like the dermoscopy images the model was trained on",
    "uncertain": "the model is unsure: no class stands out, so treat the ranking as weak",
    "not_dermoscopy": "this does not look like a dermoscopy image of a skin lesion; the probabilities are "
                      "meaningless for it",
}
# The other cause of "uncertain": the dermoscopy check's score lies between "clearly dermoscopy" and refusal.
CHECK_UNCERTAIN_REASON = ("the picture may not be a dermoscopy image (the dermoscopy check is unsure), so no "
                          "class is given with confidence; the ranking may be meaningless")


def decide(top_probability: float, score: float | None, check: dict | None) -> tuple[str, str]:
    """(verdict, reason). 'not_dermoscopy' beats 'uncertain' beats 'ok'; thresholds come from meta.json's
    dermoscopy_check (chosen on validation). A dermoscopy-check score above refuse_above refuses; between
    clear_below and it, the answer is 'uncertain' whatever the confidence: such a score never gets 'ok'."""
    if not check:
        return "ok", VERDICT_REASONS["ok"]
    above, clear = check.get("refuse_above"), check.get("clear_below")  # clear_below: releases from 1.2 on
    if score is not None and above is not None and score > above:
        return "not_dermoscopy", VERDICT_REASONS["not_dermoscopy"]
    if score is not None and clear is not None and score > clear:
        return "uncertain", CHECK_UNCERTAIN_REASON
    if top_probability < check["uncertain_below"]:
        return "uncertain", VERDICT_REASONS["uncertain"]
    return "ok", VERDICT_REASONS["ok"]


# The former rule, for releases whose meta.json has no concern threshold (none chosen, or the former rule kept on
# validation by training/release/concern.py): a concerning class among the two most likely, or any at 25 % or more.
FORMER_CONCERN_RANKS, FORMER_CONCERN_PROBABILITY = 2, 0.25
FORMER_CONCERN_RULE = (f"a concerning class among the {FORMER_CONCERN_RANKS} most likely, or any at "
                       f"{FORMER_CONCERN_PROBABILITY:.0%} or more")


def concern(predictions: list[dict], meta: ReleaseMeta) -> dict:
    """Whether the answer urges an examination: the probability of the concerning (possibly malignant) classes
    together, flagged at meta.json's concern threshold (chosen on validation; training/release/concern.py) or,
    without one, by FORMER_CONCERN_RULE. `predictions`: ranked."""
    worrying = [p for p in predictions if p["code"] in meta.concerning]
    share = round(min(sum(p["probability"] for p in worrying), 1.0), 6)  # the number answered is the one compared
    threshold = (meta.concern or {}).get("threshold")
    if threshold is not None:
        flagged = share >= threshold
    else:
        flagged = (any(p["code"] in meta.concerning for p in predictions[:FORMER_CONCERN_RANKS])
                   or any(p["probability"] >= FORMER_CONCERN_PROBABILITY for p in worrying))
    return {"flagged": bool(flagged), "probability": share, "classes": list(meta.concerning)}


def verdict(top_probability: float, score: float | None, check: dict | None) -> str:
    return decide(top_probability, score, check)[0]


def format_prediction(probabilities, meta: ReleaseMeta, request_id: str | None = None,
                      check_score: float | None = None) -> dict:
    """All classes sorted by probability, the top one (none for a non-dermoscopy image), the verdict, whether
    it urges an examination (concern; none for a non-dermoscopy image), the model identity and the notice.
    check_score: the dermoscopy check's score of the image (None: no check)."""
    codes, names = meta.class_names, meta.class_full_names
    ranked = sorted(zip(codes, names, (float(p) for p in probabilities)), key=lambda t: -t[2])
    predictions = [{"code": c, "name": n, "probability": round(p, 6)} for c, n, p in ranked]
    v, reason = decide(predictions[0]["probability"], check_score, meta.dermoscopy_check)
    return {
        "top": None if v == "not_dermoscopy" else predictions[0],
        "verdict": v,
        "verdict_reason": reason,
        "predictions": predictions,
        "concern": None if v == "not_dermoscopy" else concern(predictions, meta),
        "model": {"name": meta.name, "version": meta.version},
        "request_id": request_id,
        "notice": NOTICE,
    }


def format_error(error: InputError, request_id: str | None = None) -> dict:
    return {"error": error.code, "reason": error.reason, "status": error.status, "request_id": request_id}
