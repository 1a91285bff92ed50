"""Every ``$ command`` in the README's console blocks runs, with the exit code and output the README shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def readme_examples() -> list[tuple[str, int, list[str]]]:
    """(command, expected exit code, expected output lines) in README order."""
    text = (ROOT / "README.md").read_text()
    examples: list[tuple[str, int, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                command = line[2:]
                match = re.search(r"\s+# exit (\d+)$", command)
                code = int(match.group(1)) if match else 0
                examples.append((command[: match.start()] if match else command, code, []))
            elif examples:
                examples[-1][2].append(line)
    return examples


def test_readme_has_examples():
    examples = readme_examples()
    for word in ("dsearch index", "dsearch query", "dsearch info"):
        assert any(word in command for command, _, _ in examples), word
    assert {1, 2} <= {code for _, code, _ in examples}  # the error examples are run too


def test_readme_examples_run_as_shown(tmp_path):
    (tmp_path / "sample_corpus").symlink_to(ROOT / "sample_corpus")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "NO_COLOR": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for command, code, shown in readme_examples():
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == code, f"{command}\n{result.stderr}"
        if shown:
            actual = result.stdout or result.stderr  # errors are on stderr; `status` reports on stdout
            assert actual.splitlines() == shown, command


def readme_python_sessions() -> list[str]:
    """The README's ```pycon blocks: Python sessions, checked by doctest as shown."""
    return re.findall(r"```pycon\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_python_examples_run_as_shown(tmp_path):
    """The Python API example runs, in a fresh process with the real bundled model, printing what it shows."""
    sessions = readme_python_sessions()
    assert sessions and sum(s.count(">>> ") for s in sessions) >= 8
    script = tmp_path / "readme-python.txt"
    script.write_text("\n".join(sessions))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "doctest", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "notes.idx" / "manifest.json").is_file()  # it really built the index it searched
