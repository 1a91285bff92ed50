"""After the README's commands (and the demo), `git status` in a clone shows nothing new."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import ROOT, SAMPLE

GIT = shutil.which("git")
pytestmark = pytest.mark.skipif(GIT is None, reason="needs git to read .gitignore the way git does")


def git(cwd, *args: str) -> str:
    return subprocess.run([GIT, *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_readme_commands_leave_git_status_clean(cli, tmp_path, monkeypatch):
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(ROOT / ".gitignore", clone / ".gitignore")
    shutil.copytree(SAMPLE, clone / "sample_corpus")
    git(clone, "init", "-q")
    git(clone, "add", "-A")
    assert git(clone, "status", "--porcelain", "--untracked-files=all").count("\n") >= 2  # the corpus is seen

    git(clone, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clean clone")
    monkeypatch.chdir(clone)
    corpus = "sample_corpus/passages.jsonl"
    assert cli("index", corpus, "-o", "sample.idx").exit_code == 0
    assert cli("index", corpus, "-o", "sample.idx", "--update").exit_code == 0
    assert cli("index", corpus, "-o", "other.idx").exit_code == 0
    assert cli("query", "sample.idx", "what causes the northern lights", "-k", "1").exit_code == 0
    assert cli("info", "sample.idx", "--verify").exit_code == 0
    assert cli("status", "sample.idx").exit_code == 0
    assert not list(clone.glob(".*.lock"))  # no lock file beside the index (it lives inside, while a run holds it)
    # What an interrupted run leaves for the next one, and the tools' caches.
    leftovers = [
        "sample.idx/.staging-1234/progress.json",
        "benchmarks/out/result.json",
        ".pytest_cache/v/x",
        ".ruff_cache/x",
        "src/dsearch/__pycache__/cli.pyc",
        ".venv/bin/python",
    ]
    for leftover in leftovers:
        (clone / leftover).parent.mkdir(parents=True, exist_ok=True)
        (clone / leftover).write_text("x")

    assert git(clone, "status", "--porcelain", "--untracked-files=all") == ""
