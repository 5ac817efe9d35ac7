"""./skin predict against a real stack: a folder of good, corrupt and non-image files becomes one complete CSV,
an interrupted run resumes without repeating a file, and --local answers what the service answers."""
from __future__ import annotations

import csv
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from stack.predict import COLUMNS
from stress.local_stack import LocalStack
from tests.conftest import interruptible_child

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path, sample_images) -> Path:
    """7 real lesions (one per class) in two levels, 24 more copies for a run long enough to interrupt, a
    truncated JPEG, a text file, an empty file and a hidden file that must be skipped."""
    root = tmp_path / "archive"
    (root / "clinic-b" / "2025").mkdir(parents=True)
    for i, img in enumerate(sample_images):
        shutil.copy(img, root / ("clinic-b/2025" if i % 2 else ".") / img.name)
    for i in range(24):
        shutil.copy(sample_images[i % len(sample_images)], root / "clinic-b" / f"copy-{i:02d}.jpg")
    (root / "truncated.jpg").write_bytes(sample_images[0].read_bytes()[:2000])
    (root / "notes.txt").write_text("follow-up in 6 months\n")
    (root / "empty.png").write_bytes(b"")
    (root / ".DS_Store").write_bytes(b"\0\1\2")
    return root


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def skin_predict(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "skin"), "predict", "--no-progress", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_predict_scores_a_folder_resumes_after_an_interruption_and_matches_local(tiny_release, tmp_path, folder):
    stack = LocalStack(tiny_release, tmp_path / "stack").start()
    try:
        out = tmp_path / "results.csv"
        # Interrupted as a user would (Ctrl-C) once some rows are written (conftest.interruptible_child).
        proc = subprocess.Popen([str(REPO / "skin"), "predict", "--no-progress", "--concurrency", "1", "--url",
                                 stack.page_url, "--out", str(out), str(folder)], cwd=REPO, env=stack.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible_child)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "rerun to resume" in err and "Traceback" not in err, err
        first = rows(out)
        assert 3 <= len(first) < 35, len(first)

        r = skin_predict("--url", stack.page_url, "--out", out, folder, env=stack.env)
        assert r.returncode == 0 and f"skipped (already in the CSV) {len(first)}" in r.stderr, r.stderr
        done = rows(out)
        paths = [d["path"] for d in done]
        files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.name != ".DS_Store")
        assert sorted(paths) == files, "every file exactly once, the hidden one skipped"
        by_name = {Path(d["path"]).name: d for d in done}
        assert by_name["truncated.jpg"]["error"] == "corrupt_image" and by_name["truncated.jpg"]["status"] == "422"
        assert by_name["notes.txt"]["error"] == "not_an_image" and by_name["empty.png"]["error"] == "empty_body"
        good = [d for d in done if d["status"] == "200"]
        assert len(good) == 31 and all(d["verdict"] and d["request_id"] and d["model_version"] for d in good)
        assert all(abs(sum(float(d[f"p_{c}"]) for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")) - 1)
                   < 1e-3 for d in good)
        for d in good:  # the answer's concern: the concerning classes together, flagged yes or no
            assert d["concern_flagged"] in ("yes", "no") and float(d["p_concern"]) >= 0, d
            assert abs(float(d["p_concern"]) - sum(float(d[f"p_{c}"]) for c in ("akiec", "bcc", "mel"))) < 1e-5
        assert all(d["concern_flagged"] == d["p_concern"] == "" for d in done if d["status"] != "200")

        local = tmp_path / "local.csv"
        r = skin_predict("--local", "--release", tiny_release, "--out", local, folder)
        assert r.returncode == 0, r.stderr
        here = {d["path"]: d for d in rows(local)}
        for d in done:  # the same handler code in-process: the same answer, file by file
            for key in ("sha256", "status", "verdict", "top", "concern_flagged", "error"):
                assert here[d["path"]][key] == d[key], (d["path"], key)
            for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"):  # other thread counts: last-digit noise
                assert abs(float(here[d["path"]][f"p_{c}"] or 0) - float(d[f"p_{c}"] or 0)) <= 2e-6, (d["path"], c)
    finally:
        stack.stop()


def test_predict_says_what_is_wrong_without_a_trace(tmp_path, folder):
    r = skin_predict("--url", "http://127.0.0.1:9", "--out", tmp_path / "x.csv", folder)
    assert r.returncode == 1 and "not reachable" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = skin_predict("--out", tmp_path / "x.csv", tmp_path / "nowhere")
    assert r.returncode == 1 and "no such file or folder" in r.stderr, r.stderr
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    r = skin_predict("--local", "--out", other, folder)
    assert r.returncode == 1 and "not a ./skin predict CSV" in r.stderr and other.read_text() == "a,b\n1,2\n"


class _Hostile:
    """A hostile --url: records what it receives, answers formulas and fields outside the service's patterns."""

    def __init__(self, answers):
        import http.server
        import json
        import threading

        self.bodies, self.answers = [], list(answers)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                body = json.dumps(outer.answers[(len(outer.bodies) - 1) % len(outer.answers)]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.fast
def test_predict_reads_only_images_inside_the_folder_and_writes_no_formulas(tmp_path):
    from stack.predict import RemoteScorer, predict

    jpeg = b"\xff\xd8\xff\xe0" + b"\0" * 200
    private = tmp_path / "private.txt"
    private.write_bytes(b"\xff\xd8\xff root:x:0:0 -- even with an image signature")
    outside_photo = tmp_path / "elsewhere.jpg"
    outside_photo.write_bytes(jpeg)
    root = tmp_path / "archive"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg)
    (root / "shadow.jpg").symlink_to(private)
    (root / "photo-link.jpg").symlink_to(outside_photo)
    (root / "linked-dir").symlink_to(tmp_path, target_is_directory=True)
    (root / "sub" / "inside-link.jpg").symlink_to(root / "a.jpg")
    (root / "notes.jpg").write_bytes(b"PK\3\4 a zip named .jpg")
    (root / "empty.png").write_bytes(b"")
    probs = [{"code": c, "probability": 1 / 7} for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")]
    good = {"predictions": probs, "top": {"code": "mel"}, "verdict": "ok", "model": {"version": "1.0"},
            "request_id": "abc-123", "reason": "=HYPERLINK(\"http://x\",\"click\")",
            "concern": {"flagged": True, "probability": 3 / 7, "classes": ["mel", "bcc", "akiec"]}}
    hostile = _Hostile([good, {**good, "top": {"code": "=cmd|' /C calc'!A0"}},
                        {**good, "model": {"version": "@SUM(1+1)"}}])
    out = tmp_path / "out.csv"
    predict([str(root)], out, RemoteScorer(hostile.url, "m"), concurrency=1, progress=False)
    got = {Path(r["path"]).name: r for r in rows(out)}
    assert set(got) == {"a.jpg", "shadow.jpg", "photo-link.jpg", "inside-link.jpg", "notes.jpg", "empty.png"}
    assert got["shadow.jpg"]["error"] == got["photo-link.jpg"]["error"] == "outside_folder"
    assert got["notes.jpg"]["error"] == "not_an_image" and got["empty.png"]["error"] == "empty_body"
    assert hostile.bodies == [jpeg, jpeg], "only the two images inside the folder were sent"
    assert not any(b"root:x" in b for b in hostile.bodies)
    sent = [got["a.jpg"], got["inside-link.jpg"]]
    assert sorted(r["error"] for r in sent) == ["", "bad_answer"]
    answered = next(r for r in sent if not r["error"])
    assert answered["concern_flagged"] == "yes" and float(answered["p_concern"]) == pytest.approx(3 / 7)
    for r in rows(out):
        assert not any(v.startswith(("=", "+", "-", "@", "\t", "\r")) for v in r.values()), r
    assert any(r["reason"].startswith("'=HYPERLINK") for r in sent)
    hostile.server.shutdown()


MEL_ONLY = {"flagged": True, "probability": round(1 / 7, 6), "classes": ["mel"]}


@pytest.mark.fast
@pytest.mark.parametrize("change", [{"concern": {**MEL_ONLY, "flagged": "yes"}},
                                    {"concern": {**MEL_ONLY, "probability": 1.5}},
                                    {"concern": {**MEL_ONLY, "probability": float("nan")}},
                                    {"concern": {**MEL_ONLY, "probability": 0.9}},  # not its classes' sum
                                    {"concern": {**MEL_ONLY, "classes": ["=1+1"]}},
                                    {"concern": {k: v for k, v in MEL_ONLY.items() if k != "classes"}},
                                    {"concern": "yes"}, {"verdict": "not_dermoscopy", "top": None},
                                    {"predictions": 5}])
def test_a_concern_outside_the_services_shape_is_a_bad_answer(change):
    from stack.predict import row_for

    probs = [{"code": c, "probability": round(1 / 7, 6)} for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")]
    answer = {"predictions": probs, "top": {"code": "nv"}, "verdict": "ok", "model": {"version": "2.2"}}
    assert row_for(Path("a.jpg"), b"x", 200, answer)["error"] == ""  # a service older than the field: no cells
    row = row_for(Path("a.jpg"), b"x", 200, {**answer, "concern": MEL_ONLY})
    assert row["error"] == "" and row["concern_flagged"] == "yes" and float(row["p_concern"]) == MEL_ONLY["probability"]
    row = row_for(Path("a.jpg"), b"x", 200, {**answer, "concern": MEL_ONLY, **change})
    assert row["error"] == "bad_answer" and row["concern_flagged"] == row["p_concern"] == ""


@pytest.mark.fast
def test_resuming_a_csv_of_the_former_columns_upgrades_it_and_keeps_its_answers(tmp_path):
    """A CSV written before the concern columns: its rows are kept (answers with empty concern cells, counted in
    the summary), and the file has today's columns afterwards."""
    from stack.predict import FORMER_COLUMNS, UPGRADED, done_paths, predict

    out = tmp_path / "old.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FORMER_COLUMNS)
        writer.writeheader()
        writer.writerow({"path": "/a.jpg", "status": 200, "verdict": "ok", "top": "nv", "p_nv": 0.9})
        writer.writerow({"path": "/b.jpg", "status": 415, "error": "not_an_image"})
        writer.writerow({"path": "/c.jpg", "status": 200, "verdict": "not_dermoscopy"})  # no concern anyway
    (tmp_path / "nothing-new").mkdir()
    counts = predict([str(tmp_path / "nothing-new")], out, scorer=None, progress=False)
    assert counts[UPGRADED] == 1, counts  # the summary says how many answers have no concern cells
    kept = rows(out)
    assert [r["path"] for r in kept] == ["/a.jpg", "/b.jpg", "/c.jpg"] and kept[0]["p_nv"] == "0.9"
    assert all(r["concern_flagged"] == r["p_concern"] == "" for r in kept)
    assert done_paths(out) == ({"/a.jpg", "/b.jpg", "/c.jpg"}, 0), "once upgraded, the file is today's CSV"


@pytest.mark.fast
def test_the_readmes_example_csv_has_the_columns_written():
    header = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("path,sha256,"))
    assert tuple(header.split(",")) == COLUMNS
