"""The model side's housekeeping: stale ONNX staging folders, cache paths from manifests, unreachable hubs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SAMPLE, Runner
from test_cli import one_error_line

from dsearch import lean
from dsearch.errors import ModelError

HEX = "0123456789abcdef" * 2


def _staging(root: Path, name: str, owner: str | None, age_s: float) -> Path:
    folder = root / "onnx" / name
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"half an export")
    if owner is not None:
        (folder / lean.OWNER_FILE).write_text(owner)
    past = time.time() - age_s
    for path in (*folder.iterdir(), folder):
        os.utime(path, (past, past))
    return folder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_export_folders_are_collected_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setenv("DSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    root, host = tmp_path / "cache", socket.gethostname()
    dead = _staging(root, f".{HEX}-int8.abcd_123", f"{host} {_dead_pid()}", 5)  # its process is gone
    old = _staging(root, f".{HEX}-fp32.zz9y8x7w", None, 2 * 3600)  # no owner, untouched for two hours
    elsewhere = _staging(root, f".{HEX}-fp32.qqqqqqqq", f"other-host {os.getpid()}", 2 * 3600)
    live = _staging(root, f".{HEX}-int8.livelive", f"{host} {os.getpid()}", 2 * 3600)  # still exporting
    fresh = _staging(root, f".{HEX}-fp32.fresh123", None, 60)  # perhaps another host's export in progress
    export = _staging(root, f"{HEX}-int8", None, 30 * 86400)  # a finished export, however old
    foreign = [_staging(root, name, None, 30 * 86400) for name in (".mystuff", f".{HEX}-int8.x", "notes.tmp")]
    (root / "onnx" / f".{HEX}-int8.linklink").symlink_to(export)

    assert sorted(lean.collect_stale_exports()) == sorted([dead, old, elsewhere])
    assert not dead.exists() and not old.exists() and not elsewhere.exists()
    assert all(p.exists() for p in (live, fresh, export, *foreign)) and (export / "model.onnx").exists()
    assert lean.collect_stale_exports(now=time.time() + 2 * 86400) == sorted([fresh, live])  # a day later
    assert lean.collect_stale_exports() == []


@pytest.mark.slow
def test_the_next_run_collects_what_a_killed_export_left(tmp_path, monkeypatch, capsys, tiny_seed_model):
    """A real export killed with SIGKILL leaves its staging folder; the next `dsearch index` removes it."""
    monkeypatch.setenv("DSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    code = (
        "import os, signal, onnxruntime.quantization as q\n"
        "def die(*a, **k): os.kill(os.getpid(), signal.SIGKILL)\n"
        "q.quantize_dynamic = die\n"  # the export dies half-way, after the fp32 graph is written
        "from dsearch.encoder import load_encoder\n"
        f"load_encoder({str(tiny_seed_model)!r}, 'int8')\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], env=os.environ.copy(), capture_output=True, timeout=300)
    assert killed.returncode == -9
    left = [p for p in (tmp_path / "cache" / "onnx").iterdir() if lean.STAGING_NAME.fullmatch(p.name)]
    assert len(left) == 1 and (left[0] / "model.onnx").exists()

    from dsearch.encoder import load_encoder

    result = Runner(capsys, load_encoder)(
        "index",
        SAMPLE / "passages.jsonl",
        "-o",
        tmp_path / "idx",
        "-q",
        "--model",
        str(tiny_seed_model),
        "--precision",
        "int8",
    )
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")
    assert not left[0].exists()
    assert [p.name for p in (tmp_path / "cache" / "onnx").iterdir()] == [left[0].name.split(".")[1]]


@pytest.mark.parametrize(
    ("field", "value"),
    [("fingerprint", "../../x"), ("fingerprint", "/tmp/model"), ("fingerprint", ""), ("precision", "../../int8")],
)
def test_a_manifest_value_never_becomes_a_path_outside_the_cache(tmp_path, cli, capsys, field, value):
    index = tmp_path / "idx"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    manifest = index / "manifest.json"
    data = json.loads(manifest.read_text())
    data["model"][field] = value
    manifest.write_text(json.dumps(data))

    def no_model(name, **options):
        raise AssertionError("a model was loaded from a damaged manifest")

    result = Runner(capsys, no_model)("query", index, "stars")
    one_error_line(result, 1, str(manifest), f"model.{field}", "rebuild the index")
    status = Runner(capsys, no_model)("status", index)
    assert status.exit_code == 6 and status.stdout.startswith("corrupt: ") and status.stderr == ""


def test_the_onnx_cache_takes_only_hex_fingerprints_and_known_precisions():
    assert lean.lean_directory(HEX, "int8") == lean.cache_root() / "onnx" / f"{HEX}-int8"
    for fingerprint, variant in (("../../x", "int8"), ("hashing-64-cosine", "fp32"), (HEX, "../int8"), (HEX, "bf16")):
        with pytest.raises(ModelError, match="not a model fingerprint"):
            lean.lean_directory(fingerprint, variant)
        assert lean.find_lean(fingerprint, variant) is None


def _index_with_unknown_model(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    environ.update(HF_HOME=str(tmp_path / "hf-home"), **env)  # an empty hub cache: the model is not local
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsearch",
            "index",
            str(SAMPLE / "passages.jsonl"),
            "-o",
            str(tmp_path / "idx"),
            "-q",
            "--model",
            "sentence-transformers/all-mpnet-base-v2",
        ],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )
    return result, time.perf_counter() - started


@pytest.mark.parametrize(
    "env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["offline", "unreachable-endpoint"]
)
def test_a_model_that_is_neither_local_nor_reachable_fails_fast_in_one_line(tmp_path, env):
    result, seconds = _index_with_unknown_model(tmp_path, **env)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # under -q: no hub retries, warnings or tracebacks
    assert lines[0].startswith("dsearch: error: cannot load model 'sentence-transformers/all-mpnet-base-v2'")
    assert ("HF_HUB_OFFLINE" if "HF_HUB_OFFLINE" in env else "http://127.0.0.1:9") in lines[0]
    assert "the model hub cannot be reached" in lines[0] and "--model PATH" in lines[0]
    assert seconds < 20
    assert not (tmp_path / "idx").exists()
