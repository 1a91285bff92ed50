"""scripts/setup.sh picks torch's CPU build, falls back without hanging, and never settles for the CUDA build.

The script's functions are sourced into bash with a stand-in for pip, so nothing is installed or downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash to run scripts/setup.sh")


def bash(script: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a bash snippet with setup.sh's functions defined."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DSEARCH_TORCH")}
    full_env.update(env or {})
    return subprocess.run(
        [BASH, "-c", f"set -euo pipefail; source {SETUP}; {script}"],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# A pip stand-in: records each call in pip.calls; fails calls whose arguments match $FAIL_IF (a bash pattern).
FAKE_PIP = """
venv_pip() {
    echo "$*" >> pip.calls
    if [[ -n ${FAIL_IF:-} && "$*" == $FAIL_IF ]]; then echo "ERROR: no matching distribution"; return 1; fi
}
"""


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "pip.calls"
    return path.read_text().splitlines() if path.exists() else []


def test_linux_asks_for_the_cpu_build_and_macos_for_the_plain_version(tmp_path):
    result = bash("torch_requirement cpu Linux; torch_requirement cu128 Linux; torch_requirement cpu Darwin", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torch==2.13.0+cpu", "torch==2.13.0+cu128", "torch==2.13.0"]


def test_cpu_index_first_with_a_short_timeout_and_no_retries(tmp_path):
    result = bash(FAKE_PIP + "install_torch", tmp_path)
    assert result.returncode == 0, result.stderr
    [call] = calls(tmp_path)
    args = call.split()
    assert args[args.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert args[args.index("--timeout") + 1] == "15"
    assert args[args.index("--retries") + 1] == "0"
    assert args[-1] == "torch==2.13.0+cpu" if os.uname().sysname == "Linux" else "torch==2.13.0"
    assert "installing torch==2.13.0" in result.stderr


def test_unreachable_index_falls_back_to_pips_configuration_for_the_same_build(tmp_path):
    result = bash(FAKE_PIP + "install_torch", tmp_path, {"FAIL_IF": "*--index-url*"})
    assert result.returncode == 0, result.stderr
    first, second = calls(tmp_path)
    assert "--index-url" in first
    assert "--index-url" not in second
    assert second.split()[-1] == first.split()[-1]  # the same build, never an unsuffixed (CUDA) torch
    assert "trying pip's configured indexes" in result.stderr


def test_no_source_for_the_build_is_one_clear_error_not_a_cuda_install(tmp_path):
    result = bash(FAKE_PIP + "install_torch", tmp_path, {"FAIL_IF": "*"})
    assert result.returncode == 1
    assert len(calls(tmp_path)) == 2
    assert all(call.split()[-1].startswith("torch==2.13.0") for call in calls(tmp_path))
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("setup.sh: error: could not install torch==2.13.0")
    assert "DSEARCH_TORCH_INDEX" in last and "yourself" in last


def test_a_gpu_variant_uses_its_own_index(tmp_path):
    result = bash(FAKE_PIP + "install_torch", tmp_path, {"DSEARCH_TORCH": "cu128"})
    assert result.returncode == 0, result.stderr
    [call] = calls(tmp_path)
    assert "https://download.pytorch.org/whl/cu128" in call.split()


def test_a_mirror_replaces_the_index(tmp_path):
    result = bash(FAKE_PIP + "install_torch", tmp_path, {"DSEARCH_TORCH_INDEX": "https://mirror.example/torch-cpu"})
    assert result.returncode == 0, result.stderr
    assert "https://mirror.example/torch-cpu" in calls(tmp_path)[0].split()


@pytest.mark.parametrize("version", ["2.13.0+cpu", "2.13.0+cu128", "2.13.0"])
def test_a_torch_already_in_the_venv_is_kept(tmp_path, version):
    fake_python = tmp_path / ".venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text(f"#!/bin/sh\necho {version}\n")
    fake_python.chmod(0o755)
    result = bash(FAKE_PIP + "install_torch", tmp_path)
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == []
    assert f"keeping torch {version}" in result.stderr


def test_another_torch_version_in_the_venv_is_replaced(tmp_path):
    fake_python = tmp_path / ".venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text("#!/bin/sh\necho 2.9.1\n")
    fake_python.chmod(0o755)
    result = bash(FAKE_PIP + "install_torch", tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(calls(tmp_path)) == 1


def test_too_old_python_is_refused_before_anything_is_installed(tmp_path):
    old = tmp_path / "python3.9"
    old.write_text('#!/bin/sh\ncase "$2" in *exit*) exit 1;; *) echo 3.9;; esac\n')
    old.chmod(0o755)
    result = bash(f"check_python {old}", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"setup.sh: error: dsearch needs Python 3.11 or newer, and {old} is 3.9; set PYTHON to a newer one"
    )
    missing = bash("check_python /no/such/python", tmp_path)
    assert missing.returncode == 1
    assert "/no/such/python not found" in missing.stderr


def test_dry_run_prints_the_plan_and_changes_nothing(tmp_path):
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy(SETUP, clone / "scripts" / "setup.sh")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSEARCH_TORCH")}
    result = subprocess.run(
        [BASH, "scripts/setup.sh", "--dry-run", "[test]"], cwd=clone, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("-m venv .venv")
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[1]
    assert lines[2].endswith("install --quiet -e .[test]")
    assert not (clone / ".venv").exists()


def test_ci_and_test_scripts_go_through_setup(tmp_path):
    # CI runs `bash .ci/run` in a clean clone: it must reach setup.sh, which creates .venv itself.
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert 'scripts/setup.sh "[test,ray]"' in (ROOT / "scripts" / "test.sh").read_text()
    assert "scripts/setup.sh" in (ROOT / "scripts" / "demo.sh").read_text()
    for script in [SETUP, ROOT / "scripts" / "test.sh", ROOT / "scripts" / "demo.sh", ROOT / ".ci" / "run"]:
        syntax = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
        assert syntax.returncode == 0, f"{script}: {syntax.stderr}"


def test_an_explicit_build_replaces_another_build_in_the_venv(tmp_path):
    fake_python = tmp_path / ".venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text("#!/bin/sh\necho 2.13.0+cpu\n")
    fake_python.chmod(0o755)
    gpu = bash(FAKE_PIP + "install_torch", tmp_path, {"DSEARCH_TORCH": "cu128"})
    assert gpu.returncode == 0, gpu.stderr
    assert calls(tmp_path)[0].split()[-1] in ("torch==2.13.0+cu128", "torch==2.13.0")
    if os.uname().sysname == "Linux":
        same = bash(FAKE_PIP + "install_torch", tmp_path, {"DSEARCH_TORCH": "cpu"})
        assert "keeping torch 2.13.0+cpu" in same.stderr and len(calls(tmp_path)) == 1
