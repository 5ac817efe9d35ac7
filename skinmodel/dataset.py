"""Where HAM10000 is on this machine: HAM10000_DIR, else ../shared/data/ham10000 beside the repository (or
beside the working folder). Training, the stack's tools, benchmarks and tests all ask here. Standard library only."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ham10000_dir() -> Path | None:
    """HAM10000_DIR, else ../shared/data/ham10000 beside the repository (or the working folder) if it exists."""
    if os.environ.get("HAM10000_DIR"):
        return Path(os.environ["HAM10000_DIR"])
    for candidate in (REPO.parent / "shared/data/ham10000", Path.cwd().parent / "shared/data/ham10000"):
        if candidate.is_dir():
            return candidate
    return None
