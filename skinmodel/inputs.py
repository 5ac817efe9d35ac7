"""The light half of preprocessing: its parameters (PreprocessConfig, as they travel in meta.json and in
checkpoints) and its refusals (InputError). No numpy, torch or Pillow here, so ReleaseMeta and the page
build can use them without the heavy half (skinmodel/preprocessing.py re-exports both), and the per-image
CPU budget the worker decodes under (cpu_budget, standard library only).
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass

# Colour constancy applied to the resized image before the crop, identically in training and serving:
# "none", or Shades of Gray with Minkowski norm p = 6 (Finlayson & Trezzi 2004; the norm used by ISIC
# challenge winners), which maps the image's estimated illuminant to grey.
COLOUR_CONSTANCIES = ("none", "shades_of_gray_p6")

# Far above any dermoscopy photo (a 24 MP camera is 24e6), far below a decompression bomb.
DEFAULT_MAX_PIXELS = 40_000_000


class InputError(ValueError):
    """A request the service must refuse: carries an HTTP status and a reason meant for people."""

    def __init__(self, status: int, code: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


# CPU seconds one image may cost a worker from bytes to tensor. The legitimate worst cases (40 MP PNG, WebP,
# progressive JPEG, float TIFF: bench/decode_worst_case.py) take under 1 s on a 2-core VM; a batch of 4 at
# this budget still ends far inside TorchServe's 30 s response timeout.
DECODE_CPU_BUDGET_S = 3.0


class _Overrun(BaseException):
    """Raised by cpu_budget's timer inside the block; a BaseException so that no `except Exception` in Pillow or
    in the decoder swallows it. cpu_budget turns it into an InputError; it never escapes."""


class cpu_budget:  # noqa: N801 - used as a context manager, like a function
    """`with cpu_budget(s):` -- the block is interrupted once it has used s seconds of process CPU time, and
    the with statement raises InputError(422, "decode_budget"). The last line behind the decoder's own limits.

    A SIGPROF interval timer (ITIMER_PROF): its handler raises between two Python steps, so a single call into
    a C decoder finishes first (each is bounded by the limits before it); the timer keeps firing every 50 ms
    until the block is left, so an interruption swallowed somewhere is raised again. On leaving, the timer is
    disarmed and the previous handler restored, whatever happened. Outside the main thread (where signals
    cannot be handled) the block runs without a timer. Not reentrant."""

    def __init__(self, seconds: float):
        self.seconds, self.active, self.armed, self.previous = seconds, False, False, None

    def _on_timer(self, signum, frame):
        if self.active:
            raise _Overrun()

    def __enter__(self) -> "cpu_budget":
        self.armed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
        self.started = time.process_time()
        if self.armed:
            self.previous = signal.signal(signal.SIGPROF, self._on_timer)
            self.active = True
            signal.setitimer(signal.ITIMER_PROF, self.seconds, 0.05)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.active = False  # first: a tick arriving from here on is ignored
        if self.armed:
            signal.setitimer(signal.ITIMER_PROF, 0, 0)
            signal.signal(signal.SIGPROF, self.previous)
        if exc_type is _Overrun:
            used = time.process_time() - self.started
            raise InputError(422, "decode_budget", f"decoding the image took more than {self.seconds:g} s of CPU "
                             f"(stopped after {used:.1f} s); re-save it as a plain JPEG or PNG") from None
        return False


@dataclass(frozen=True)
class PreprocessConfig:
    """The parameters that travel in meta.json; nothing else decides how pixels become a tensor."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_pixels: int = DEFAULT_MAX_PIXELS
    colour_constancy: str = "none"  # one of COLOUR_CONSTANCIES

    def __post_init__(self):
        if self.colour_constancy not in COLOUR_CONSTANCIES:
            raise ValueError(f"unknown colour constancy {self.colour_constancy!r}; "
                             f"this code knows {', '.join(COLOUR_CONSTANCIES)}")

    @classmethod
    def from_dict(cls, p: dict) -> "PreprocessConfig":
        """From its one serialised form (meta.json's "preprocessing", a checkpoint's "preprocessing")."""
        return cls(int(p["resize_size"]), int(p["crop_size"]), tuple(float(v) for v in p["mean"]),
                   tuple(float(v) for v in p["std"]), int(p.get("max_pixels", DEFAULT_MAX_PIXELS)),
                   str(p.get("colour_constancy", "none")))

    def to_dict(self) -> dict:
        return {"resize_size": self.resize_size, "crop_size": self.crop_size, "mean": list(self.mean),
                "std": list(self.std), "max_pixels": self.max_pixels, "interpolation": "bilinear",
                "colour_constancy": self.colour_constancy}
