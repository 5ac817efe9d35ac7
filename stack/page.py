"""The page of a release, rendered by site/build.py's render() (loaded from its file: `site` is also the name
of a standard-library module, so site/ cannot be imported as a package)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from skinmodel.release import ReleaseMeta
from stack.settings import REPO


def render_page(release: Path, out: Path, api_base: str = "") -> Path:
    """out/index.html and the static files for the release (api_base "": the API is same-origin)."""
    spec = importlib.util.spec_from_file_location("site_build", REPO / "site" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    card = Path(release) / "model_card.md"
    build.render(ReleaseMeta.load(release), api_base, Path(out), card if card.exists() else None)
    return Path(out)
