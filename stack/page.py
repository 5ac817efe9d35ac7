"""The page of a release: site/templates/*.j2 + site/static/ -> a folder of plain static files (no CDN, no server
code). site/ holds only the templates and static files; the code that renders them lives here.

    .venv/bin/python -m stack.page [--meta release/meta.json] [--api-base ""] [--out site/dist]

Class codes, names, descriptions and which classes are concerning, and the model's name and version, come from
meta.json (ReleaseMeta); the API base comes from the flag or SKIN_API_BASE ("" = same origin, through the page's
gate). `./skin up` calls render_page().
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from skinmodel.release import ReleaseError, ReleaseMeta
from stack.settings import REPO, current

SITE = REPO / "site"


def render_page(release: Path, out: Path, api_base: str = "", review_keep_days: float = 0.0) -> Path:
    """out/index.html and the static files for the release (api_base "": the API is same-origin). The page says
    whether uploads are kept for review (review_keep_days > 0), as this deployment does."""
    card = Path(release) / "model_card.md"
    render(ReleaseMeta.load(release), api_base, Path(out), card if card.exists() else None, review_keep_days)
    return Path(out)


def render(meta: ReleaseMeta, api_base: str, out: Path, card: Path | None = None, review_keep_days: float = 0.0) -> Path:
    env = Environment(loader=FileSystemLoader(SITE / "templates"), undefined=StrictUndefined,
                      autoescape=select_autoescape(["html", "j2"]))
    classes = [{"code": c, "name": n, "description": d, "concerning": c in meta.concerning}
               for c, n, d in zip(meta.class_names, meta.class_full_names, meta.class_descriptions)]
    config = {"apiBase": api_base.rstrip("/"), "model": meta.name, "version": meta.version,
              "classes": classes}
    metrics = (meta.metrics or {}).get("test") or {}
    html = env.get_template("index.html.j2").render(meta=meta, classes=classes, config_json=json.dumps(config).replace("</", "<\\/"),
                                                    metrics=metrics, has_card=card is not None,
                                                    review_keep_days=review_keep_days)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").write_text(html)
    for f in (SITE / "static").iterdir():
        shutil.copyfile(f, out / f.name)  # not copy(): the mode comes from the umask, not the source
    if card:
        shutil.copyfile(card, out / "model_card.md")
    return out / "index.html"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meta", default=str(current().release_dir / "meta.json"), help="the release's meta.json "
                                                                                    "(default: SKIN_RELEASE_DIR's)")
    p.add_argument("--api-base", default=os.environ.get("SKIN_API_BASE", ""),
                   help="where the browser sends predictions ('' = same origin via the site proxy)")
    p.add_argument("--out", default=str(SITE / "dist"))
    p.add_argument("--review-keep-days", type=float, default=current().review_keep_days,
                   help="what the page says of review retention (default: SKIN_REVIEW_KEEP_DAYS, 0 = none)")
    args = p.parse_args(argv)
    meta_path = Path(args.meta)
    if not meta_path.exists():
        print(f"error: {meta_path} does not exist (export a model or pass --meta)", file=sys.stderr)
        return 1
    try:
        meta = ReleaseMeta.load(meta_path)
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    card = meta_path.parent / "model_card.md"
    index = render(meta, args.api_base, Path(args.out), card if card.exists() else None, args.review_keep_days)
    print(f"rendered {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
