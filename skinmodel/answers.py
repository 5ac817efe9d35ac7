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
# The other cause of "uncertain": the dermoscopy gate's score lies between "clearly dermoscopy" and refusal.
CHECK_UNCERTAIN_REASON = ("the picture may not be a dermoscopy image (the dermoscopy check is unsure), so no "
                         "class is given with confidence; the ranking may be meaningless")


def decide(top_probability: float, ood_score: float | None, abstention: dict | None) -> tuple[str, str]:
    """(verdict, reason). 'not_dermoscopy' beats 'uncertain' beats 'ok'; thresholds come from meta.json (chosen on
    validation). A gate score above ood_score_above refuses; between ood_score_clear_below and it, the answer is
    'uncertain' whatever the confidence: a low gate score never gets 'ok'."""
    if not abstention:
        return "ok", VERDICT_REASONS["ok"]
    above = abstention.get("ood_score_above", abstention.get("ood_distance_above"))  # 1.0's first key
    clear = abstention.get("ood_score_clear_below")  # releases from 1.2 on
    if ood_score is not None and above is not None and ood_score > above:
        return "not_dermoscopy", VERDICT_REASONS["not_dermoscopy"]
    if ood_score is not None and clear is not None and ood_score > clear:
        return "uncertain", CHECK_UNCERTAIN_REASON
    if top_probability < abstention["uncertain_below"]:
        return "uncertain", VERDICT_REASONS["uncertain"]
    return "ok", VERDICT_REASONS["ok"]


def verdict(top_probability: float, ood_score: float | None, abstention: dict | None) -> str:
    return decide(top_probability, ood_score, abstention)[0]


def format_prediction(probabilities, meta: ReleaseMeta, request_id: str | None = None, ood_score: float | None = None) -> dict:
    """All classes sorted by probability, the top one (none for a non-dermoscopy image), the verdict, the model
    identity and the notice."""
    codes, names = meta.class_names, meta.class_full_names
    ranked = sorted(zip(codes, names, (float(p) for p in probabilities)), key=lambda t: -t[2])
    predictions = [{"code": c, "name": n, "probability": round(p, 6)} for c, n, p in ranked]
    v, reason = decide(predictions[0]["probability"], ood_score, meta.abstention)
    return {
        "top": None if v == "not_dermoscopy" else predictions[0],
        "verdict": v,
        "verdict_reason": reason,
        "predictions": predictions,
        "model": {"name": meta.name, "version": meta.version},
        "request_id": request_id,
        "notice": NOTICE,
    }


def format_error(error: InputError, request_id: str | None = None) -> dict:
    return {"error": error.code, "reason": error.reason, "status": error.status, "request_id": request_id}
