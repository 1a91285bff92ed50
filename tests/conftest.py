"""Shared fixtures: an in-process CLI runner with an injected encoder, sample data, real-model indexes."""

from __future__ import annotations

import io
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests never reach for a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# ONNX exports go to a throwaway cache, not the user's ~/.cache/dsearch.
os.environ["DSEARCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsearch-test-cache-")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_corpus"
sys.path.insert(0, str(ROOT / "benchmarks"))  # seed_model.py builds the tiny seed-structured model

from fakes import HashingEncoder  # noqa: E402

from dsearch.cli import Deps, run  # noqa: E402


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


class Runner:
    """Runs ``dsearch`` in-process with a given encoder factory and stdin; stdout and stderr kept apart."""

    def __init__(self, capsys: pytest.CaptureFixture[str], encoder_factory=None) -> None:
        self.capsys = capsys
        self.encoder_factory = encoder_factory or (lambda name, **options: HashingEncoder(name))
        self.loaded: list[str | None] = []

    def __call__(self, *args: str, stdin: bytes | None = None) -> Result:
        def load(name, **options):
            self.loaded.append(name)
            return self.encoder_factory(name, **options)

        self.capsys.readouterr()
        deps = Deps(load_encoder=load, stdin=io.BytesIO(stdin) if stdin is not None else io.BytesIO(b""))
        code = run([str(a) for a in args], deps=deps)
        out, err = self.capsys.readouterr()
        return Result(code, out, err)


@pytest.fixture
def cli(capsys):
    return Runner(capsys)


@pytest.fixture
def sample_index(cli, tmp_path) -> Path:
    """The sample corpus indexed with the hashing encoder."""
    target = tmp_path / "sample-index"
    result = cli("index", SAMPLE / "passages.jsonl", "-o", target)
    assert result.exit_code == 0, result.stderr
    return target


@pytest.fixture(scope="session")
def tiny_seed_model(tmp_path_factory) -> Path:
    """A tiny randomly initialised DistilBERT with the seed encoder's structure (mean pooling, dot, 250)."""
    from seed_model import build_seed_like_model

    return build_seed_like_model(tmp_path_factory.mktemp("tiny-seed"), tiny=True)


@pytest.fixture(scope="session")
def bundled_encoder():
    from dsearch.encoder import SentenceTransformerEncoder

    return SentenceTransformerEncoder(None)
