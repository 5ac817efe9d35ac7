"""The codebase's shape, checked: stack and training do not import each other, clients do not load torch, every
folder of training/ holds one job of a few modules, and no committed file names a folder of one machine."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

fast = pytest.mark.fast


def _imports(folder: str) -> set[tuple[str, str]]:
    """(file, top-level package) for every import statement under folder, at any depth of the code."""
    found = set()
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(str(path.relative_to(REPO)), a.name.split(".")[0]) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add((str(path.relative_to(REPO)), node.module.split(".")[0]))
    return found


@fast
def test_stack_and_training_do_not_import_each_other():
    assert not [f for f, top in _imports("stack") if top == "training"]
    assert not [f for f, top in _imports("training") if top == "stack"]
    assert not [f for f, top in _imports("skinmodel") if top in ("training", "stack", "handler", "logger", "ops")]


@fast
def test_the_batch_client_does_not_load_torch():
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import stack.predict"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    modules = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert "stack.predict" in modules and "torch" not in modules, sorted(m for m in modules if "torch" in m)[:5]


@fast
def test_training_is_grouped_by_job():
    folders = [p for p in (REPO / "training").rglob("*") if p.is_dir() and p.name != "__pycache__"]
    assert len(folders) >= 4
    for folder in [REPO / "training", *folders]:
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 10, f"{folder} holds {len(modules)} modules"
        if folder != REPO / "training":
            doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
            assert doc and len(doc) > 40, f"{folder}/__init__.py does not say what it holds"


def _tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        path = REPO / name
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if b"\0" not in data[:4096]:
                yield name, data.decode("utf-8", "replace")


@fast
def test_no_committed_file_names_a_folder_of_this_or_another_machine():
    """The checkout's own parent, temporary folders and the home and work folders of the machines this project has
    run on. (Illustrative paths in examples, such as /home/me/archive, are not a machine's.)"""
    machine = re.compile(r"(?:/work/|/root/|/tmp/tmp|/tmp/pytest-of-|" + re.escape(str(REPO.parent) + "/") + ")")
    hits = [f"{name}: {m.group(0)}" for name, text in _tracked_text_files() if name != "tests/test_layout.py"
            for m in [machine.search(text)] if m]
    assert not hits, hits[:10]


@fast
def test_help_of_test_and_logs_says_what_they_take():
    def helped(*args):
        r = subprocess.run([sys.executable, "-m", "stack", *args, "--help"], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-1000:]
        return r.stdout

    assert "--fast" in helped("test")
    assert all(command in helped("logs") for command in ("show", "stats", "status", "review"))
