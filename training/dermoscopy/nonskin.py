"""Drawn pictures that are not dermoscopy: noise, flat colour, gradients, checkerboards, documents, smooth noise,
shapes, stripes, black or white, and bare skin tone without a lesion; one source ("drawn pictures") of the check's
fitting pool (training/dermoscopy/pool.py), which holds every other source, all of them files that packages ship.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SIZE = (200, 150)  # HAM10000's size: nothing tells the pictures apart by shape


def drawn(kind: int, rng: np.random.Generator) -> Image.Image:
    """One picture of a kind (0-9), HAM10000's size."""
    w, h = SIZE
    colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    if kind == 0:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noise
    if kind == 1:
        return Image.new("RGB", SIZE, colour())  # flat colour
    if kind == 2:  # gradient
        g = np.linspace(rng.uniform(0, 128), rng.uniform(128, 255), w)
        return Image.fromarray(np.stack([np.tile(g, (h, 1)) * rng.uniform(0.3, 1) for _ in range(3)], -1).astype(np.uint8))
    if kind == 3:  # checkerboard
        board = ((np.indices((h, w)) // int(rng.integers(4, 40))).sum(0) % 2).astype(bool)
        return Image.fromarray(np.where(board[..., None], colour(), colour()).astype(np.uint8))
    if kind == 4:  # a document: strokes on paper
        arr = np.full((h, w, 3), int(rng.integers(200, 256)), np.uint8)
        for _ in range(int(rng.integers(10, 60))):
            y, x = rng.integers(0, h - 5), rng.integers(0, w - 40)
            arr[y:y + 3, x:x + int(rng.integers(10, 40))] = rng.integers(0, 80)
        return Image.fromarray(arr)
    if kind == 5:  # smooth noise: clouds, textures
        small = rng.integers(0, 256, (int(rng.integers(3, 20)), int(rng.integers(3, 20)), 3), dtype=np.uint8)
        return Image.fromarray(small).resize(SIZE, Image.BICUBIC)
    if kind == 6:  # shapes
        img = Image.new("RGB", SIZE, colour())
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 15))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = (x0, y0, x0 + int(rng.integers(5, 120)), y0 + int(rng.integers(5, 90)))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour())
        return img
    if kind == 7:  # stripes
        f, angle = rng.uniform(0.02, 0.3), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        on = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * f) > 0
        return Image.fromarray(np.where(on[..., None], colour(), colour()).astype(np.uint8))
    if kind == 8:  # black, white
        return Image.new("RGB", SIZE, (int(rng.choice([0, 5, 250, 255])),) * 3)
    base = np.array([rng.uniform(150, 240), rng.uniform(100, 190), rng.uniform(80, 160)])  # bare skin tone, no lesion
    return Image.fromarray((np.zeros((h, w, 3)) + base + rng.normal(0, 4, (h, w, 3))).clip(0, 255).astype(np.uint8))
