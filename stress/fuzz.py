"""Seeded generators of hostile uploads: random bytes, mutated and truncated real images, lying headers,
odd modes and formats, wrong content types, JSON / multipart / base64 variants, empty and oversize bodies."""
from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


@dataclass
class Case:
    kind: str
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    files: dict | None = None

    def send(self, session, url, timeout=60):
        if self.files is not None:
            return session.post(url, files=self.files, timeout=timeout)
        return session.post(url, data=self.body, headers=self.headers, timeout=timeout)


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression-bomb shaped lie)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def odd_image(rng: random.Random) -> bytes:
    w, h = rng.randint(1, 300), rng.randint(1, 300)
    arr = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 255, (h, w, 3), dtype=np.uint8)
    base = Image.fromarray(arr, "RGB")
    mode, fmt = rng.choice([("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "GIF"), ("RGBA", "PNG"),
                            ("CMYK", "TIFF"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"),
                            ("RGB", "BMP"), ("RGB", "WEBP"), ("YCbCr", "TIFF"), ("L", "JPEG")])
    if mode == "I;16":
        img = Image.fromarray((arr[..., 0].astype(np.uint16) * 257))
    elif mode in ("I", "F"):
        img = base.convert("L").convert(mode)
    else:
        img = base.convert(mode)
    return encode(img, fmt)


def fuzz_cases(seed: int, n: int, jpegs: list[bytes], oversize: bool = True) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    kinds = ["random_bytes", "mutated_jpeg", "truncated_jpeg", "truncated_png", "huge_declared", "odd_mode",
             "wrong_content_type", "json_base64", "json_broken", "multipart", "empty", "valid"]
    for i in range(n):
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        jpeg = rng.choice(jpegs)
        if kind == "random_bytes":
            cases.append(Case(kind, rng.randbytes(rng.randint(1, 5000))))
        elif kind == "mutated_jpeg":
            b = bytearray(jpeg)
            for _ in range(rng.randint(1, 60)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            cases.append(Case(kind, bytes(b)))
        elif kind == "truncated_jpeg":
            cases.append(Case(kind, jpeg[: rng.randint(1, len(jpeg) - 1)]))
        elif kind == "truncated_png":
            png = encode(Image.open(io.BytesIO(jpeg)), "PNG")
            cases.append(Case(kind, png[: rng.randint(8, len(png) - 1)]))
        elif kind == "huge_declared":
            cases.append(Case(kind, png_with_declared_size(rng.randint(7000, 2**31 - 1), rng.randint(7000, 2**31 - 1))))
        elif kind == "odd_mode":
            cases.append(Case(kind, odd_image(rng)))
        elif kind == "wrong_content_type":
            ctype = rng.choice(["text/plain", "application/json", "image/png", "application/x-www-form-urlencoded",
                                "multipart/form-data; boundary=xyz", "text/html; charset=utf-8"])
            cases.append(Case(kind, rng.choice([jpeg, rng.randbytes(200), b"{}", b"a=b"]), {"Content-Type": ctype}))
        elif kind == "json_base64":
            body = rng.choice([{"data": base64.b64encode(jpeg).decode()}, {"image": base64.b64encode(jpeg).decode()},
                               {"data": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()}])
            cases.append(Case(kind, json.dumps(body).encode(), {"Content-Type": "application/json"}))
        elif kind == "json_broken":
            body = rng.choice([b'{"data": "%%%not-base64"}', b"[1, 2, 3]", b'"just a string"', b"{}", b'{"data": 5}',
                               b'{"data": {"nested": true}}', b"{broken json", b"null", b'{"data": ""}'])
            cases.append(Case(kind, body, {"Content-Type": "application/json"}))
        elif kind == "multipart":
            field_name = rng.choice(["data", "file", "image", "upload"])
            payload = rng.choice([jpeg, b"", rng.randbytes(100), jpeg[: len(jpeg) // 2]])
            cases.append(Case(kind, files={field_name: ("x.jpg", payload, rng.choice(["image/jpeg", "text/plain"]))}))
        elif kind == "empty":
            cases.append(Case(kind, b""))
        else:
            cases.append(Case(kind, jpeg))
    if oversize:
        cases.append(Case("oversize", b"\xff\xd8" + b"\0" * (11 * 2**20)))
    return cases


def judge(response) -> str | None:
    """None if the answer is acceptable: 200 with 7 classes, or a 4xx with a JSON reason. Else what is wrong."""
    code = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if code == 200:
        if not body or len(body.get("predictions", [])) != 7:
            return f"200 without 7 predictions: {response.text[:120]}"
        return None
    if 400 <= code < 500:
        if not isinstance(body, dict) or not body.get("reason"):
            return f"{code} without a JSON reason: {response.text[:120]!r}"
        return None
    return f"{code}: {response.text[:160]!r}"
