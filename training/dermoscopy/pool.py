"""Pictures that are not dermoscopy, from the image files that Debian and PyPI packages ship, split by SOURCE.

Every source is one package (or one family of generated drawings) and belongs whole to one part:
- fit: what the dermoscopy check's head is fitted on;
- val: sources held out to choose the rejector, its strength and its thresholds;
- test: sources held out for the reported figure: the check never saw a file, a crop or a package of them.
Each file counts whole and as random crops of half and a quarter of its side (`pictures`). The Debian packages
are installed by `install()` (apt-get, as root) and read where dpkg put them; nothing is copied into the
repository. `manifest()` records every source with its package version, licence and file count
(release/dermoscopy_pool.json).

    python -m training.dermoscopy.pool --install --manifest release/dermoscopy_pool.json
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import struct
import subprocess
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
from PIL import Image

from skinmodel.preprocessing import MAX_ASPECT_RATIO
from training.dermoscopy.shifts import encode

PARTS = ("fit", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".pat")
MAX_FILES = 150  # files per source, a seeded draw: no source outweighs the rest by its size alone
CROP_SCALES = (0.5, 0.25)  # besides the whole picture: random crops of these shares of its side
LONG_SIDE = 512  # pictures are made at most this large (the model sees 96 px): decoding stays cheap


@dataclass(frozen=True)
class Source:
    name: str
    part: str
    package: str  # "deb:<name>", "pypi:<name>" or "generated"
    kind: str  # what the pictures are
    licence: str
    include: tuple[str, ...] = ("*",)  # shell patterns on the file's path
    exclude: tuple[str, ...] = ()
    min_side: int = 24
    one_per_folder: bool = False  # a wallpaper shipped at several resolutions counts once (its first file)

    @property
    def registry(self) -> str:
        return self.package.split(":")[0]

    @property
    def package_name(self) -> str:
        return self.package.split(":")[-1]


SOURCES = (
    # fitting pool
    Source("MATE backgrounds", "fit", "deb:mate-backgrounds", "photographs, abstract wallpapers", "GPL-2+, CC-BY-SA-4.0"),
    Source("UKUI wallpapers", "fit", "deb:ukui-wallpapers", "photographs, wallpapers", "GPL-2+ (see copyright)"),
    Source("GIMP data", "fit", "deb:gimp-data", "textures, patterns, splash, tool images", "GPL-3+/LGPL-3+",
           exclude=("*/icons/*", "*/themes/*")),
    Source("Oxygen icons", "fit", "deb:oxygen-icon-theme", "icons", "LGPL-3+", include=("*/256x256/*",)),
    Source("GIMP manual (English)", "fit", "deb:gimp-help-en", "screenshots, tutorial photographs", "GFDL-1.2+"),
    Source("Debian desktop-base", "fit", "deb:desktop-base", "wallpapers, boot screens, logos", "GPL-2+/CC-BY-SA-3.0"),
    Source("Frozen Bubble data", "fit", "deb:frozen-bubble-data", "game graphics", "GPL-2", min_side=32),
    Source("matplotlib and scikit-learn samples", "fit", "pypi:matplotlib+scikit-learn", "photographs",
           "matplotlib licence; scikit-learn sample images CC BY 2.0"),
    Source("drawn pictures", "fit", "generated", "noise, gradients, shapes, documents, skin tone", "this project"),
    # held out to choose the rejector (validation)
    Source("GNOME backgrounds", "val", "deb:gnome-backgrounds", "abstract wallpapers", "CC-BY-SA-3.0/2.0, CC-BY-2.0"),
    Source("Lomiri wallpapers", "val", "deb:lomiri-wallpapers-20.04+lomiri-wallpapers-16.04", "photographs, wallpapers",
           "CC-BY-SA (see copyright)"),
    Source("GIMP extra patterns", "val", "deb:gimp-data-extras", "textures", "GPL-2+"),
    Source("Pidgin data", "val", "deb:pidgin-data", "icons, emoticons", "GPL-2+", min_side=16),
    Source("Tux Paint data", "val", "deb:tuxpaint-data", "drawings, brushes, stamps", "GPL-2+, public domain"),
    # held out for the reported figure (test)
    Source("Plasma wallpapers", "test", "deb:plasma-workspace-wallpapers", "photographs, wallpapers", "GPL-2+, LGPL",
           include=("*/contents/images/*",), one_per_folder=True),
    Source("scikit-image photographs", "test", "pypi:scikit-image", "photographs, scans, microscopy",
           "BSD-3 / CC0 / public domain per image (skimage/data/README)"),
    Source("LFW faces (scikit-image)", "test", "pypi:scikit-image:lfw", "faces", "LFW (research use)"),
    Source("Marble data", "test", "deb:marble-data", "maps, planet textures", "LGPL-2.1+, CC0-1.0, CC-BY-3.0"),
    Source("Pingus data", "test", "deb:pingus-data", "game graphics", "GPL-2+"),
)


def sources(part: str | None = None) -> list[Source]:
    return [s for s in SOURCES if part is None or s.part == part]


def _deb_packages(source: Source) -> list[str]:
    return source.package_name.split("+")


def install(selected: list[Source] | None = None) -> None:
    """apt-get install the Debian packages of the sources that are missing (root only: said clearly otherwise)."""
    wanted = [p for s in (selected or SOURCES) if s.registry == "deb" for p in _deb_packages(s)]
    missing = [p for p in wanted if _deb_version(p) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise PermissionError("the dermoscopy check's pictures need these Debian packages; as root: "
                              f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run = lambda *cmd: subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)  # noqa: E731
    try:
        run("apt-get", "install", "-y", "--no-install-recommends", *missing)
    except subprocess.CalledProcessError:  # a fresh machine's package lists may be stale or absent
        run("apt-get", "update")
        run("apt-get", "install", "-y", "--no-install-recommends", *missing)


def _deb_version(package: str) -> str | None:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}|${Version}", package], capture_output=True, text=True)
    status, _, version = r.stdout.partition("|")
    return version if r.returncode == 0 and status.endswith(" installed") else None


def available(source: Source) -> bool:
    return source.registry != "deb" or all(_deb_version(p) for p in _deb_packages(source))


def _pypi_files(source: Source) -> list[Path]:
    import matplotlib
    import skimage

    if source.package == "pypi:scikit-image":
        return [f for f in sorted((Path(skimage.__file__).parent / "data").iterdir())
                if f.suffix.lower() in (".png", ".jpg", ".gif") and f.stat().st_size > 2000]
    import sklearn.datasets

    sample = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"
    return [sample / n for n in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")] + \
        sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))


def files(source: Source) -> list[Path]:
    """The image files of a source, a seeded draw of at most MAX_FILES (sorted, so the same on every machine)."""
    if source.registry == "pypi":
        found = _pypi_files(source) if source.package != "pypi:scikit-image:lfw" else []
    elif source.registry == "deb":
        listed = subprocess.run(["dpkg", "-L", *_deb_packages(source)], capture_output=True, text=True,
                                check=True).stdout.split("\n")
        found = sorted({Path(p) for p in listed if p.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(p)
                        and any(fnmatch(p, g) for g in source.include)
                        and not any(fnmatch(p, g) for g in source.exclude)})
    else:
        found = []
    if source.one_per_folder:
        found = sorted({p.parent: p for p in reversed(found)}.values())
    if len(found) > MAX_FILES:
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(source.name.encode()).digest()[:4], "big"))
        found = [found[i] for i in sorted(rng.choice(len(found), MAX_FILES, replace=False))]
    return found


def read_gimp_pattern(raw: bytes) -> Image.Image:
    """A GIMP pattern (.pat): a big-endian header (size, version, width, height, bytes per pixel, "GPAT", name)
    and the raw pixels."""
    header, _, width, height, depth, magic = struct.unpack(">5I4s", raw[:24])
    if magic != b"GPAT" or depth not in (1, 2, 3, 4):
        raise ValueError("not a GIMP pattern")
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[depth]
    return Image.frombytes(mode, (width, height), raw[header:header + width * height * depth])


def _open(path: Path) -> Image.Image | None:
    """The file as RGB (transparency over white, as a viewer shows an icon), or None if Pillow cannot read it."""
    raw = path.read_bytes()
    try:
        img = read_gimp_pattern(raw) if path.suffix.lower() == ".pat" else Image.open(io.BytesIO(raw))
        img.seek(0)
        img = img.convert("RGBA")
    except (OSError, ValueError, struct.error, EOFError):
        return None
    canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, img).convert("RGB")


def views(img: Image.Image, rng: np.random.Generator) -> list[Image.Image]:
    """The whole picture and random crops of CROP_SCALES of its side (each at least 24 px), at most LONG_SIDE."""
    w, h = img.size
    out = [img]
    for s in CROP_SCALES:
        cw, ch = int(w * s), int(h * s)
        if min(cw, ch) >= 24:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out.append(img.crop((left, top, left + cw, top + ch)))
    for i, v in enumerate(out):
        if max(v.size) > LONG_SIDE:
            f = LONG_SIDE / max(v.size)
            out[i] = v.resize((max(1, round(v.width * f)), max(1, round(v.height * f))), Image.BILINEAR)
    return out


def _special_images(source: Source, seed: int) -> list[Image.Image]:
    """Sources that are not files: scikit-image's LFW face crops and the drawn pictures."""
    if source.package == "pypi:scikit-image:lfw":
        import skimage

        faces = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")[:100]  # the first 100: faces
        return [Image.fromarray((f * 255).astype(np.uint8)).convert("RGB") for f in faces]
    from training.dermoscopy.nonskin import drawn

    rng = np.random.default_rng(seed)
    return [drawn(i % 10, rng) for i in range(MAX_FILES * 3)]


def pictures(source: Source, seed: int = 0) -> list[bytes]:
    """Every picture of a source as a PNG file: each of its files whole and cropped (drawn pictures as drawn)."""
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(source.name.encode()).digest()[:4], "big")])
    if source.package in ("generated", "pypi:scikit-image:lfw"):
        return [encode(img) for img in _special_images(source, seed + 1)]
    out = []
    for path in files(source):
        img = _open(path)
        if img is not None and min(img.size) >= source.min_side:
            # A view the service refuses before the model (beyond its aspect-ratio limit) is no picture the check
            # ever scores: it is left out, as the handler's 422 leaves it out of every answer.
            out += [encode(v) for v in views(img, rng) if max(v.size) <= MAX_ASPECT_RATIO * min(v.size)]
    return out


def drop_fitted(by_source: dict[str, list]) -> dict[str, list[int]]:
    """{source: indices of its pictures to keep}: a held-out (val, test) picture identical to a fitting one (a
    blank crop of one package is byte for byte a blank crop of another) is left out of the held-out figures.
    by_source: every source's pictures, or their sha256 digests."""
    digest = lambda b: b if len(b) == 32 else hashlib.sha256(b).digest()  # noqa: E731
    fitted = {digest(b) for s in sources("fit") for b in by_source.get(s.name, [])}
    return {name: [i for i, b in enumerate(blobs) if part(name) == "fit" or digest(b) not in fitted]
            for name, blobs in by_source.items()}


def part(name: str) -> str:
    return next(s.part for s in SOURCES if s.name == name)


def version(source: Source) -> str:
    if source.registry == "deb":
        return "+".join(_deb_version(p) or "missing" for p in _deb_packages(source))
    if source.registry == "pypi":
        from importlib.metadata import version as v

        names = ["scikit-image"] if "scikit-image" in source.package else source.package_name.split("+")
        return "+".join(v(n) for n in names)
    return "-"


def manifest(counts: dict[str, int] | None = None) -> list[dict]:
    """One row per source: part, package, version, licence, files used and pictures made."""
    return [{"source": s.name, "part": s.part, "package": s.package, "version": version(s), "kind": s.kind,
             "licence": s.licence, "files": len(files(s)) if s.registry != "generated" else 0,
             **({"pictures": counts[s.name]} if counts and s.name in counts else {})} for s in SOURCES]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Install the dermoscopy check's picture sources and write their manifest.")
    p.add_argument("--install", action="store_true", help="apt-get install the missing Debian packages (root)")
    p.add_argument("--manifest", type=Path, help="write the manifest JSON here")
    args = p.parse_args(argv)
    if args.install:
        install()
    counts = {s.name: len(pictures(s)) for s in SOURCES}
    rows = manifest(counts)
    for r in rows:
        print(f"{r['part']:5} {r['source']:40} {r['version']:22} files {r['files']:4} pictures {r['pictures']:4}")
    if args.manifest:
        args.manifest.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
