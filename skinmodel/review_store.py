"""Opt-in keeping of the uploads a clinician should look at (answered `uncertain` or `not_dermoscopy`), for a
fixed number of days, so the review queue (./skin logs review) can show the image itself.

Off unless SKIN_REVIEW_KEEP_DAYS > 0 (./skin up then sets SKIN_REVIEW_DIR). Files are named by the upload's
SHA-256 (the audit trail's key), created 0600 in a 0700 folder, and deleted once older than the retention by
whoever touches the folder: the handler when it keeps a file, the logger sidecar on every pass. Nothing here may
fail a prediction: errors are logged and counted.

What is kept is bounded, whatever clients send: not the upload itself but a re-encoding of it (JPEG, longer side
at most KEEP_SIDE px, so about 100 KB however large or odd the upload was), and the folder holds at most
SKIN_REVIEW_MAX_MB (default 1024) and SKIN_REVIEW_MAX_FILES (default 20000): once full, new uploads are not kept
(counted and logged) until retention frees room. The kept files keep the upload's SHA-256 as their name, the
audit trail's key. Uploads through the public entry carry the gate's opaque name for their client (a keyed hash
of its address, never the address): each client's files go to a subfolder of that name, which may hold at most
SKIN_REVIEW_CLIENT_SHARE (default 5 %) of either quota, so no one client can fill the folder for everyone else.
"""
from __future__ import annotations

import io
import logging
import os
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)
REVIEWED_VERDICTS = ("uncertain", "not_dermoscopy")
_NAME = re.compile(r"[0-9a-f]{64}\.[a-z0-9]{1,5}")  # what keep() writes; nothing else in the folder is touched
_PARTIAL = re.compile(r"\.[0-9a-f]{64}\.\d+\.tmp")  # a write cut short (crash, full disk): pruned like the rest
CLIENT_HEADER = "X-Skin-Client"  # set by the gate on what it forwards: its opaque name for the client
_CLIENT = re.compile(r"[0-9a-f]{16}")  # such a name: a subfolder
DEFAULT_CLIENT_SHARE = 0.05
PRUNE_EVERY_S = 600.0
KEEP_SIDE = 512            # longer side of a kept image, px
KEEP_QUALITY = 85
DEFAULT_MAX_MB = 1024
DEFAULT_MAX_FILES = 20_000
RECOUNT_EVERY_S = 60.0     # the folder's usage is counted again this often (other workers keep files too)


class ReviewStore:
    def __init__(self, directory: str | os.PathLike | None, keep_days: float = 0.0,
                 max_bytes: int = DEFAULT_MAX_MB * 2**20, max_files: int = DEFAULT_MAX_FILES,
                 client_share: float = DEFAULT_CLIENT_SHARE):
        self.folder = Path(directory) if directory else None  # where kept uploads are (found even when off)
        self.directory = self.folder if keep_days > 0 else None  # where new ones go: only when on
        self.keep_seconds = keep_days * 86400.0
        self.max_bytes, self.max_files = max_bytes, max_files
        self.client_share = client_share
        self.failures = 0
        self.full = 0  # uploads not kept because the folder was at its quota
        self._last_prune = 0.0
        self._usage: tuple[int, int] | None = None  # (bytes, files), counted at _counted_at
        self._counted_at = 0.0

    @classmethod
    def from_env(cls, environ=None) -> "ReviewStore":
        e = os.environ if environ is None else environ
        try:
            days = float(e.get("SKIN_REVIEW_KEEP_DAYS") or 0)
        except ValueError:
            log.error("SKIN_REVIEW_KEEP_DAYS=%r is not a number: keeping no uploads", e.get("SKIN_REVIEW_KEEP_DAYS"))
            days = 0.0
        try:
            max_mb = float(e.get("SKIN_REVIEW_MAX_MB") or DEFAULT_MAX_MB)
            max_files = int(e.get("SKIN_REVIEW_MAX_FILES") or DEFAULT_MAX_FILES)
            share = min(1.0, max(0.0, float(e.get("SKIN_REVIEW_CLIENT_SHARE") or DEFAULT_CLIENT_SHARE)))
        except ValueError:
            log.error("SKIN_REVIEW_MAX_MB / SKIN_REVIEW_MAX_FILES / SKIN_REVIEW_CLIENT_SHARE are not numbers: "
                      "using the defaults")
            max_mb, max_files, share = DEFAULT_MAX_MB, DEFAULT_MAX_FILES, DEFAULT_CLIENT_SHARE
        return cls(e.get("SKIN_REVIEW_DIR"), days, int(max_mb * 2**20), max_files, share)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def keep(self, sha256: str, data: bytes, image_format: str | None = None, client: str | None = None) -> Path | None:
        """Store a bounded re-encoding of one upload (once per content, within the quota and the client's share
        of it); never raises. `image_format` is the upload's (recorded in the audit trail); what is kept is always
        JPEG. `client`: the gate's name for the uploader (X-Skin-Client), None for the owner's direct requests."""
        if not self.enabled or not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
            return None
        client = client if client and _CLIENT.fullmatch(client) else None
        folder = self.directory / client if client else self.directory
        path = folder / f"{sha256}.jpg"
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
            if folder.is_symlink():  # not one keep() made: never followed
                raise OSError(f"{folder.name} is a symbolic link")
            if path.exists():
                os.utime(path)  # seen again: its retention starts over
                return path
            used, files = self.usage()
            if used >= self.max_bytes or files >= self.max_files:
                self.full += 1
                log.warning("review folder at its quota (%d MiB, %d files): an upload is not kept", used >> 20, files)
                return None
            if client and folder.is_dir():
                mine, my_files = _count(folder)
                if mine >= self.max_bytes * self.client_share or my_files >= self.max_files * self.client_share:
                    self.full += 1
                    log.warning("a client's share of the review folder is full: an upload is not kept")
                    return None
            folder.mkdir(mode=0o700, exist_ok=True)  # only once the upload fits
            small = reencode(data)
            if small is None:
                return None
            tmp = folder / f".{sha256}.{os.getpid()}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(small)
                os.replace(tmp, path)
            except OSError:
                tmp.unlink(missing_ok=True)  # no partial patient image left behind
                raise
            self._usage = (used + len(small), files + 1)
            self.prune_if_due()
            return path
        except OSError as err:
            self.failures += 1
            log.error("could not keep an upload for review in %s: %s", self.directory, err)
            return None

    def usage(self) -> tuple[int, int]:
        """(bytes, files) of kept uploads, counted again every RECOUNT_EVERY_S (other workers write too)."""
        if self._usage is None or time.monotonic() - self._counted_at > RECOUNT_EVERY_S:
            self._usage, self._counted_at = _count(self.directory, subfolders=True), time.monotonic()
        return self._usage

    def prune_if_due(self) -> int:
        if time.monotonic() - self._last_prune < PRUNE_EVERY_S and self._last_prune:
            return 0
        self._last_prune = time.monotonic()
        return self.prune()

    def prune(self, now: float | None = None) -> int:
        """Delete kept uploads older than the retention; -> how many."""
        if not self.enabled or not self.directory.is_dir():
            return 0
        cutoff, removed = (now or time.time()) - self.keep_seconds, 0
        for f in _kept_files(self.directory):
            try:
                if f.stat(follow_symlinks=False).st_mtime < cutoff:
                    f.unlink()
                    removed += 1
            except OSError as err:  # removed meanwhile by another process, or not ours to remove
                log.warning("review folder: %s: %s", f.name, err)
        _remove_empty_client_folders(self.directory)
        return removed

    def find(self, sha256: str | None) -> Path | None:
        """The kept file of an upload, if any and not past its retention."""
        if not self.folder or not re.fullmatch(r"[0-9a-f]{64}", sha256 or "") or not self.folder.is_dir():
            return None
        cutoff = time.time() - self.keep_seconds if self.keep_seconds else 0
        candidates = [*self.folder.glob(f"{sha256}.*"), *self.folder.glob(f"*/{sha256}.*")]
        return next((p for p in candidates if _NAME.fullmatch(p.name) and (p.parent == self.folder or _CLIENT.fullmatch(
            p.parent.name)) and p.stat().st_mtime >= cutoff), None)

    def purge(self) -> int:
        """Retention turned off: every kept upload goes (./skin up calls this when SKIN_REVIEW_KEEP_DAYS is 0)."""
        if not self.folder or not self.folder.is_dir():
            return 0
        removed = 0
        for f in _kept_files(self.folder):
            f.unlink(missing_ok=True)
            removed += 1
        _remove_empty_client_folders(self.folder)
        return removed


def _kept_files(directory: Path):
    """Every file keep() writes (or left half-written), in the folder and in its clients' subfolders."""
    for f in directory.iterdir():
        if _NAME.fullmatch(f.name) or _PARTIAL.fullmatch(f.name):
            yield f
        elif _CLIENT.fullmatch(f.name) and f.is_dir() and not f.is_symlink():
            yield from (g for g in f.iterdir() if _NAME.fullmatch(g.name) or _PARTIAL.fullmatch(g.name))


def _remove_empty_client_folders(directory: Path) -> None:
    for f in directory.iterdir():
        if _CLIENT.fullmatch(f.name) and f.is_dir() and not f.is_symlink():
            try:
                f.rmdir()
            except OSError:
                pass  # not empty


def _count(directory: Path, subfolders: bool = False) -> tuple[int, int]:
    """(bytes, files) kept in a folder (and its clients' subfolders)."""
    total = count = 0
    files = _kept_files(directory) if subfolders else (
        f for f in directory.iterdir() if _NAME.fullmatch(f.name) or _PARTIAL.fullmatch(f.name))
    for f in files:
        try:
            total += f.stat(follow_symlinks=False).st_size
            count += 1
        except OSError:
            continue
    return total, count


def reencode(data: bytes) -> bytes | None:
    """The upload as a JPEG of at most KEEP_SIDE px on its longer side; None (logged) if it cannot be decoded.
    Only uploads the handler has already decoded and answered come here, so the decoding budget holds."""
    from skinmodel.preprocessing import decode_image  # Pillow and torch: only where images are kept

    try:
        img = decode_image(data, min_side=KEEP_SIDE)
        img.thumbnail((KEEP_SIDE, KEEP_SIDE))
        out = io.BytesIO()
        img.convert("RGB").save(out, "JPEG", quality=KEEP_QUALITY)
        return out.getvalue()
    except Exception as err:  # noqa: BLE001 - keeping for review must never fail a prediction
        log.error("could not re-encode an upload for review: %s", err)
        return None
