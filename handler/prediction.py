"""What a request looks like and what an answer looks like: payload extraction and the response JSON.

Kept out of the handler class so the handler stays a thin TorchServe adapter and this logic can be
tested without a server. Flat inside a .mar: imports only sibling modules.
"""
from __future__ import annotations

import base64
import binascii

try:  # inside a .mar the modules sit flat; in the repository they form the handler package
    from formats import JSON_IMAGE_KEYS
    from preprocessing import InputError
except ImportError:  # pragma: no cover - import path depends on where we run
    from handler.formats import JSON_IMAGE_KEYS
    from handler.preprocessing import InputError

NOTICE = ("Research software, not a medical device. This is not a diagnosis: consult a dermatologist or other "
          "qualified clinician about any skin lesion.")


def _decode_base64(text: str) -> bytes:
    if text.startswith("data:") and "," in text:  # a data URL straight from a browser's FileReader
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, "bad_base64", "the JSON image field is not valid base64") from None


def extract_image_bytes(row) -> bytes:
    """TorchServe hands each request as a dict: raw bodies under 'body'/'data', multipart fields under
    their names; the frontend has already turned JSON bodies into dicts and text bodies into str."""
    if isinstance(row, dict):
        payload = None
        for key in ("data", "file", "body"):
            if row.get(key) is not None:
                payload = row[key]
                break
        else:  # a multipart form with another field name: take the first file-like field
            payload = next((v for v in row.values() if isinstance(v, (bytes, bytearray))), None)
    else:
        payload = row
    if isinstance(payload, dict):  # JSON body: {"data": "<base64>"} or one of the aliases
        for key in JSON_IMAGE_KEYS:
            if isinstance(payload.get(key), str):
                return _decode_base64(payload[key])
        raise InputError(400, "bad_json", "JSON bodies must carry the image as base64 in a 'data' field")
    if isinstance(payload, str):
        raise InputError(415, "not_an_image", "the body is text, not an image (send the file's bytes, "
                         "multipart form data, or JSON with base64)")
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, list):
        raise InputError(400, "bad_json", "JSON bodies must be an object with the image as base64 in 'data'")
    if payload is None:
        raise InputError(400, "empty_body", "the request body is empty; send an image file")
    raise InputError(400, "bad_payload", f"unsupported request payload of type {type(payload).__name__}")


VERDICT_REASONS = {
    "ok": "the image looks like the dermoscopy images the model was trained on",
    "uncertain": "the model is unsure: no class stands out, so treat the ranking as weak",
    "not_dermoscopy": "this does not look like a dermoscopy image of a skin lesion; the probabilities are "
                      "meaningless for it",
}


def verdict(top_probability: float, ood_distance: float | None, abstention: dict | None) -> str:
    """'not_dermoscopy' beats 'uncertain' beats 'ok'; thresholds come from meta.json (chosen on validation)."""
    if not abstention:
        return "ok"
    if ood_distance is not None and ood_distance > abstention["ood_distance_above"]:
        return "not_dermoscopy"
    if top_probability < abstention["uncertain_below"]:
        return "uncertain"
    return "ok"


def format_prediction(probabilities, meta: dict, request_id: str | None = None, ood_distance: float | None = None) -> dict:
    """All classes sorted by probability, the top one (none for a non-dermoscopy image), the verdict, the model
    identity and the notice."""
    codes, names = meta["class_names"], meta["class_full_names"]
    ranked = sorted(zip(codes, names, (float(p) for p in probabilities)), key=lambda t: -t[2])
    predictions = [{"code": c, "name": n, "probability": round(p, 6)} for c, n, p in ranked]
    v = verdict(predictions[0]["probability"], ood_distance, meta.get("abstention"))
    return {
        "top": None if v == "not_dermoscopy" else predictions[0],
        "verdict": v,
        "verdict_reason": VERDICT_REASONS[v],
        "predictions": predictions,
        "model": {"name": meta["name"], "version": meta["version"]},
        "request_id": request_id,
        "notice": NOTICE,
    }


def format_error(error: InputError, request_id: str | None = None) -> dict:
    return {"error": error.code, "reason": error.reason, "status": error.status, "request_id": request_id}


def make_event(request_id, meta: dict, model_sha256: str, image: dict, latency_ms: float,
               probabilities=None, error: InputError | None = None, answer: dict | None = None) -> dict:
    """One audit record: who (model + hash) said what about which image (hash only, never pixels)."""
    from datetime import datetime, timezone

    event = {"request_id": request_id, "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
             "model_name": meta["name"], "model_version": meta["version"], "model_sha256": model_sha256,
             "image_sha256": image.get("sha256"), "image_bytes": image.get("bytes"),
             "image_format": image.get("format"), "image_width": image.get("width"),
             "image_height": image.get("height"), "latency_ms": round(latency_ms, 2)}
    if error is not None:
        event.update(status=error.status, error_code=error.code, error_reason=error.reason)
    else:
        probs = {c: round(float(p), 6) for c, p in zip(meta["class_names"], probabilities)}
        top = max(probs, key=probs.get)
        event.update(status=200, probabilities=probs, top_class=top, top_probability=probs[top],
                     uncertain=(answer or {}).get("verdict", "ok") != "ok", verdict=(answer or {}).get("verdict"))
    return event
