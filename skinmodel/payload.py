"""What a request looks like: the image bytes inside one TorchServe request row, whatever shape the client
sent (raw bytes, a multipart field, JSON with base64). Kept out of the handler so it is tested without a server.
"""
from __future__ import annotations

import base64
import binascii

from skinmodel.formats import JSON_IMAGE_KEYS
from skinmodel.inputs import InputError


def _decode_base64(text: str) -> bytes:
    if text.startswith("data:") and "," in text:  # a data URL straight from a browser's FileReader
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, "bad_base64", "the JSON image field is not valid base64") from None


def extract_image_bytes(row, instances: bool = False) -> bytes:
    """TorchServe hands each request as a dict: raw bodies under 'body'/'data', multipart fields under
    their names; the frontend has already turned JSON bodies into dicts and text bodies into str.
    instances: the rows are KServe v1 instances ({"data": "<base64>"}, TorchServe's kserve envelope), so a
    string under an image key is base64, not a text body."""
    if instances and isinstance(row, dict):
        for key in JSON_IMAGE_KEYS:
            if isinstance(row.get(key), str):
                return _decode_base64(row[key])
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
