"""./skin predict: score image files and folders into one CSV, one row per file, through the running service
(its public entry, so every answer is audited) or in-process with the same handler code (--local: no server, no
audit trail).

    ./skin predict ~/archive/lesions --out results.csv            # through the page's entry (./skin up)
    ./skin predict a.jpg b.png --local --release release --out results.csv

Folders are walked recursively. Only files inside the folder given are read: a symbolic link that leads out of
it is not followed (a row says so). Only files that start with an accepted image signature are sent; any
other file, and one that is corrupt or too large, becomes a row with the reason; the run goes on. Answers are
checked field by field (class codes, version and id patterns), and no CSV cell starts with = + - @ TAB or CR
(a hostile --url cannot plant spreadsheet formulas). An answered row carries the seven probabilities, the verdict
and whether the answer urges an examination (concern_flagged yes/no, p_concern: the concerning classes together).
Rows are written as answers come, so an interrupted run keeps its rows, and a rerun with the same --out skips every
file already in it (resumable); a CSV of an earlier version gets the concern columns, empty for its rows.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import math
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm

from skinmodel.answers import VERDICT_REASONS
from skinmodel.formats import ACCEPTED_LABEL, sniff
from skinmodel.release import ReleaseError
from stack.gate import GateLimits
from stack.settings import MODEL_NAME, current
from stack.torchserve_api import ClientRetry
from skinmodel.labels import CLASS_NAMES as CLASSES
# concern_flagged (yes / no) and p_concern: the answer's "concern" (whether it urges an examination).
COLUMNS = ("path", "sha256", "status", "verdict", "top", *(f"p_{c}" for c in CLASSES), "concern_flagged",
           "p_concern", "model_version", "request_id", "error", "reason")
# The columns of CSVs written before the concern columns: resuming one rewrites it with COLUMNS.
FORMER_COLUMNS = tuple(c for c in COLUMNS if c not in ("concern_flagged", "p_concern"))
UPGRADED = "answered before the concern columns (their cells are empty)"
MAX_BYTES = GateLimits().max_body  # the service's own limit: bigger files are not sent
# The page's entry answers 429 past 4 requests in flight per client and 503/507 when full or restarting:
# all three are retried after Retry-After (else 1 s, 2 s, 4 s ...).
RETRIED = (429, 503, 507)
# Rows a rerun scores again: no answer, or an answer that may differ next time (busy, restarting, server error).
TRANSIENT_ERRORS = ("timeout", "unreadable", "request_failed", "bad_answer")
# Refused here, before anything is sent; final (the file itself decides).
LOCAL_REFUSALS = ("too_large", "not_an_image", "empty_body", "outside_folder")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def user_path(raw: str | os.PathLike) -> Path:
    """A path as the user meant it: ./skin runs from the repository, so relative paths are taken from where the
    command was typed (SKIN_CALLER_DIR, set by ./skin), then made absolute (one spelling per file in the CSV)."""
    p = Path(raw).expanduser()
    return (p if p.is_absolute() else Path(os.environ.get("SKIN_CALLER_DIR", ".")) / p).absolute()


def is_final(row: dict) -> bool:
    """A row a rerun keeps: an answer (200) or a refusal that will not change (4xx but 408/429, too large)."""
    status = int(row.get("status") or 0)
    if row.get("error") in TRANSIENT_ERRORS:
        return False
    return status == 200 or (400 <= status < 500 and status not in (408, 429)) or row.get("error") in LOCAL_REFUSALS


class PredictError(RuntimeError):
    """A reason to stop the whole run (the service is unreachable, --out is not our CSV)."""


def find_files(paths: list[str]) -> list[tuple[Path, Path]]:
    """(file, the folder it must stay inside) for the files named (their own folder) and every file under the
    folders named (sorted, hidden ones skipped, links to folders not walked), each once."""
    out, seen = [], set()
    for raw in paths:
        p = user_path(raw)
        if p.is_dir() and not p.is_symlink():
            found = []
            for top, dirs, names in os.walk(p, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [(Path(top) / n, p) for n in sorted(names) if not n.startswith(".")]
            found.sort()
        elif p.exists() or p.is_symlink():
            found = [(p, p.parent)]
        else:
            raise PredictError(f"{raw}: no such file or folder")
        for f, root in found:
            if str(f) not in seen and (f.is_file() or f.is_symlink()):
                seen.add(str(f))
                out.append((f, root))
    return out


def done_paths(out: Path) -> tuple[set[str], int]:
    """(paths an earlier run's CSV settled: the resume point, how many of its answers predate the concern
    columns). Rows of transient failures are dropped from the file, so that a rerun scores those files again and
    the CSV keeps one row per file; a CSV with FORMER_COLUMNS gets today's columns, its answers empty concern
    cells. Either way the file is rewritten atomically."""
    if not out.exists() or out.stat().st_size == 0:
        return set(), 0
    with open(out, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        header = tuple(reader.fieldnames or ())
        if header not in (COLUMNS, FORMER_COLUMNS):
            raise PredictError(f"{out} exists and is not a ./skin predict CSV; choose another --out")
        rows = list(reader)
    final = {}
    for row in rows:  # the last settled row of each path
        if is_final(row):
            final[row["path"]] = {c: row.get(c, "") for c in COLUMNS}
    if len(final) != len(rows) or header != COLUMNS:
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(final.values())
        os.replace(tmp, out)
    upgraded = 0 if header == COLUMNS else sum(row["status"] == "200" and row["verdict"] != "not_dermoscopy"
                                               for row in final.values())
    return set(final), upgraded


def safe_cell(value):
    """A CSV cell no spreadsheet runs as a formula: text starting with = + - @ TAB or CR gets a leading '."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA) else value


def _probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def _concern_ok(answer: dict) -> bool:
    """No concern (a service older than the field) or none for a refused picture; else the service's concern
    object, whose probability is its classes' answered probabilities together (each rounded to 6 digits)."""
    concern = answer.get("concern")
    if concern is None:
        return True
    if answer.get("verdict") == "not_dermoscopy" or not (
            isinstance(concern, dict) and isinstance(concern.get("flagged"), bool)
            and _probability(concern.get("probability")) and isinstance(concern.get("classes"), list)
            and all(c in CLASSES for c in concern["classes"])):
        return False
    probs = {p["code"]: p["probability"] for p in answer.get("predictions") or []}  # checked by _checked first
    return all(c in probs for c in concern["classes"]) and \
        abs(min(sum(probs[c] for c in concern["classes"]), 1.0) - concern["probability"]) <= 1e-5


def _checked(answer: dict) -> dict | None:
    """The answer if every field is what the service sends (else None): class codes of this model,
    probabilities in [0, 1], a known verdict, a concern object of its shape, version, request id and error code
    of their patterns."""
    preds = answer.get("predictions") or []
    ok_preds = isinstance(preds, list) and all(
        isinstance(p, dict) and p.get("code") in CLASSES and _probability(p.get("probability")) for p in preds)
    top = answer.get("top")
    model = answer.get("model")
    version = model.get("version", "") if isinstance(model, dict) else ("" if model is None else None)
    fields = (ok_preds, top is None or (isinstance(top, dict) and top.get("code") in CLASSES),
              answer.get("verdict", "") in ("", *VERDICT_REASONS), ok_preds and _concern_ok(answer),
              version is not None and (version == "" or _VERSION.fullmatch(str(version))),
              answer.get("request_id") in (None, "") or _REQUEST_ID.fullmatch(str(answer["request_id"])),
              answer.get("error", "") == "" or _ERROR_CODE.fullmatch(str(answer["error"])),
              isinstance(answer.get("reason", ""), str))
    return answer if all(fields) else None


def row_for(path: Path, blob: bytes | None, status: int, answer: dict) -> dict:
    """One CSV row from an answer (a prediction or an error body) of the service or of the handler."""
    if _checked(answer) is None:
        answer = {"error": "bad_answer", "reason": "the service's answer has fields outside what it may send"}
    probs = {p["code"]: p["probability"] for p in answer.get("predictions") or []}
    concern = answer.get("concern") or {}
    row = {"path": str(path), "sha256": hashlib.sha256(blob).hexdigest() if blob is not None else "",
           "status": status, "verdict": answer.get("verdict", ""), "top": (answer.get("top") or {}).get("code", ""),
           **{f"p_{c}": probs.get(c, "") for c in CLASSES},
           "concern_flagged": {True: "yes", False: "no"}.get(concern.get("flagged"), ""),
           "p_concern": concern.get("probability", ""),
           "model_version": (answer.get("model") or {}).get("version", ""), "request_id": answer.get("request_id") or "",
           "error": answer.get("error", ""), "reason": " ".join(str(answer.get("reason", "")).split())[:300]}
    return {k: safe_cell(v) for k, v in row.items()}


def read_file(path: Path, root: Path | None = None) -> tuple[bytes | None, dict | None]:
    """(bytes, None), or (None, refusal) for a file that leads out of `root` (a link), is too large for the
    service, is not an accepted image by its first bytes, or cannot be read."""
    try:
        real = path.resolve(strict=True)
        if root is not None and not real.is_relative_to(root.resolve()):
            return None, {"error": "outside_folder", "reason": "a link to a file outside the folder given: not read"}
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_BYTES:
                return None, {"error": "too_large", "reason": f"the file is {size} bytes; the limit is {MAX_BYTES}"}
            head = f.read(16)
            if not head:
                return None, {"error": "empty_body", "reason": "the file is empty"}
            if not sniff(head):
                return None, {"error": "not_an_image", "reason": f"not an image file ({ACCEPTED_LABEL}) by its "
                                                                 "first bytes: not sent"}
            return head + f.read(MAX_BYTES), None
    except OSError as err:
        return None, {"error": "unreadable", "reason": err.strerror or str(err)}


class RemoteScorer:
    """POSTs each file to <url>/predictions/<model>, as the page does."""

    def __init__(self, url: str, model: str, timeout: float = 60.0):
        if not url.startswith(("http://", "https://")):
            raise PredictError(f"--url {url!r}: give the page's address with its scheme, e.g. {current().page_url}")
        self.endpoint = f"{url.rstrip('/')}/predictions/{model}"
        self.timeout = timeout
        retry = ClientRetry(total=5, connect=0, read=0, status_forcelist=RETRIED, allowed_methods=None,
                            backoff_factor=1, respect_retry_after_header=True, raise_on_status=False)
        self.local = threading.local()
        self.adapter = HTTPAdapter(max_retries=retry, pool_maxsize=16)

    def _session(self) -> requests.Session:  # one per thread: requests' sessions are not thread-safe
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
            self.local.session.mount("http://", self.adapter)
            self.local.session.mount("https://", self.adapter)
        return self.local.session

    def score(self, path: Path, root: Path | None = None) -> dict:
        blob, refused = read_file(path, root)
        if refused:
            return row_for(path, blob, 0, refused)
        try:
            r = self._session().post(self.endpoint, data=blob, timeout=self.timeout,
                                     headers={"Content-Type": "application/octet-stream"})
        except requests.Timeout:
            return row_for(path, blob, 0, {"error": "timeout", "reason": f"no answer within {self.timeout:.0f} s"})
        except requests.ConnectionError as err:
            raise PredictError(f"the service at {self.endpoint} is not reachable ({err.__class__.__name__}); "
                               "is ./skin up running? Rows written so far are kept: rerun to resume") from None
        except requests.RequestException as err:  # a broken answer: this file again on the next run
            return row_for(path, blob, 0, {"error": "request_failed", "reason": err.__class__.__name__})
        try:
            answer = r.json()
        except ValueError:
            answer = {"error": "bad_answer", "reason": f"HTTP {r.status_code} without a JSON body"}
        return row_for(path, blob, r.status_code, answer if isinstance(answer, dict) else {"error": "bad_answer"})


class LocalScorer:
    """The serving handler in this process: same decoding, preprocessing, temperature and verdicts."""

    def __init__(self, release: Path):
        import logging

        logging.getLogger("ts").setLevel(logging.ERROR)  # TorchServe's import-time notes (OpenVINO, TensorRT ...)
        from handler.skin_handler import SkinLesionHandler

        self.handler = SkinLesionHandler.in_process(release)
        self.lock = threading.Lock()  # one image at a time through the model; threads only read files

    def score(self, path: Path, root: Path | None = None) -> dict:
        blob, refused = read_file(path, root)
        if refused:
            return row_for(path, blob, 0, refused)
        with self.lock:
            answer = self.handler.answer([blob])[0]
        return row_for(path, blob, answer.get("status", 200), answer)


def predict(paths: list[str], out: Path, scorer, concurrency: int = 4, progress: bool = True) -> dict[str, int]:
    """Score what is not in `out` yet, appending rows as answers come; -> counts per verdict or error."""
    files = find_files(paths)
    done, upgraded = done_paths(out)
    todo = [(f, root) for f, root in files if str(f) not in done]
    counts: dict[str, int] = {"skipped (already in the CSV)": len(files) - len(todo), UPGRADED: upgraded}
    new = not out.exists() or out.stat().st_size == 0
    out.parent.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(max(1, concurrency))
    # UTF-8 with undecodable file-name bytes kept as they are: one odd name must not end the run.
    with open(out, "a", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        jobs = [pool.submit(scorer.score, p, root) for p, root in todo]
        try:
            for job in tqdm(as_completed(jobs), total=len(jobs), unit="img", disable=not progress):
                row = job.result()
                writer.writerow(row)
                f.flush()  # an interrupted run keeps every row it wrote
                key = row["verdict"] or row["error"] or "no answer"
                counts[key] = counts.get(key, 0) + 1
        except BaseException:
            # Queued files are dropped and running requests are not waited for: Ctrl-C stops at once (main()
            # exits without joining the threads); their files are scored by the next run.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    pool.shutdown()
    return counts


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    s = current()
    p = argparse.ArgumentParser(prog="./skin predict", description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="image files and/or folders (walked recursively)")
    p.add_argument("--out", default="predictions.csv", help="the CSV to write or resume (default: predictions.csv)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default=s.page_url, help=f"the service's public entry (default: {s.page_url})")
    where.add_argument("--local", action="store_true", help="no server: run the serving handler in this process")
    p.add_argument("--release", default=str(s.release_dir), help="with --local: the release folder (meta.json + weights)")
    p.add_argument("--model", default=MODEL_NAME, help="model name in the URL (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=GateLimits().per_client,
                   help="requests in flight (default %(default)s: what the page's entry allows one client)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        scorer = LocalScorer(user_path(args.release)) if args.local else RemoteScorer(args.url, args.model)
        counts = predict(args.paths, user_path(args.out), scorer, args.concurrency, progress=not args.no_progress)
    except (PredictError, ReleaseError) as err:
        print(f"predict: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"predict: interrupted; rows written so far are in {args.out}: rerun to resume", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)  # the CSV is closed; requests still running in worker threads are abandoned, not awaited
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
