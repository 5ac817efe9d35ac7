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


def verdict(top_probability: float, ood_score: float | None, abstention: dict | None) -> str:
    """'not_dermoscopy' beats 'uncertain' beats 'ok'; thresholds come from meta.json (chosen on validation)."""
    if not abstention:
        return "ok"
    above = abstention.get("ood_score_above", abstention.get("ood_distance_above"))  # 1.0's first key
    if ood_score is not None and above is not None and ood_score > above:
        return "not_dermoscopy"
    if top_probability < abstention["uncertain_below"]:
        return "uncertain"
    return "ok"


def format_prediction(probabilities, meta: ReleaseMeta, request_id: str | None = None, ood_score: float | None = None) -> dict:
    """All classes sorted by probability, the top one (none for a non-dermoscopy image), the verdict, the model
    identity and the notice."""
    codes, names = meta.class_names, meta.class_full_names
    ranked = sorted(zip(codes, names, (float(p) for p in probabilities)), key=lambda t: -t[2])
    predictions = [{"code": c, "name": n, "probability": round(p, 6)} for c, n, p in ranked]
    v = verdict(predictions[0]["probability"], ood_score, meta.abstention)
    return {
        "top": None if v == "not_dermoscopy" else predictions[0],
        "verdict": v,
        "verdict_reason": VERDICT_REASONS[v],
        "predictions": predictions,
        "model": {"name": meta.name, "version": meta.version},
        "request_id": request_id,
        "notice": NOTICE,
    }


def format_error(error: InputError, request_id: str | None = None) -> dict:
    return {"error": error.code, "reason": error.reason, "status": error.status, "request_id": request_id}
