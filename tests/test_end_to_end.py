"""End to end with real sentence-transformers models and the installed ``dsearch`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, Runner

from dsearch.encoder import SentenceTransformerEncoder
from dsearch.indexer import build_index
from dsearch.search import Query, run_search
from dsearch.store import OpenIndex

DSEARCH = str(Path(sys.executable).with_name("dsearch"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}

pytestmark = pytest.mark.slow


def sh(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, env=env or ENV, timeout=300)


@pytest.fixture(scope="module")
def bundled_sample_index(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("bundled") / "idx"
    result = sh(DSEARCH, "index", str(SAMPLE / "passages.jsonl"), "-o", str(target), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["indexed"] == 200 and summary["model"] == "bundled:all-MiniLM-L6-v2"
    *before, summary_line = result.stderr.splitlines()
    assert summary_line.startswith("indexed 200 passages")
    # The session's export cache starts empty: the first run says it is exporting the model, and nothing else.
    assert before in ([], ["dsearch: preparing the model for fast inference, once per model"])
    return target


def test_bundled_model_finds_the_expected_passages(bundled_sample_index):
    result = sh(
        DSEARCH,
        "query",
        str(bundled_sample_index),
        "--queries",
        str(SAMPLE / "queries.tsv"),
        "--format",
        "trec",
        "-k",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    hits: dict[str, list[tuple[str, float]]] = {}
    for line in result.stdout.splitlines():
        qid, _q0, doc, _rank, score, _tag = line.split()
        hits.setdefault(qid, []).append((doc, float(score)))
    expected = dict(line.split()[0::2][:2] for line in (SAMPLE / "qrels.txt").read_text().splitlines())
    assert set(hits) == set(expected)
    for qid, doc in expected.items():
        # The expected passage is first, or second to a near-tie: at the default precision (int8 on a VNNI CPU)
        # q2's two volcano passages, 0.005 apart at fp32, may swap.
        scores = dict(hits[qid])
        assert doc in scores and scores[doc] >= hits[qid][0][1] - 0.01, (qid, hits[qid])
    assert sum(hits[qid][0][0] == doc for qid, doc in expected.items()) >= len(expected) - 1


def test_info_of_a_real_index(bundled_sample_index):
    result = sh(DSEARCH, "info", str(bundled_sample_index), "--json")
    data = json.loads(result.stdout)
    assert (data["model"], data["dim"], data["similarity"], data["passages"]) == (
        "bundled:all-MiniLM-L6-v2",
        384,
        "cosine",
        200,
    )


def test_closed_pipe_ends_quietly(bundled_sample_index):
    script = (
        f"'{DSEARCH}' query '{bundled_sample_index}' --queries '{SAMPLE / 'queries.tsv'}' -k 200 | head -1; "
        'echo "status=${PIPESTATUS[0]}" >&2'
    )
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert len(result.stdout.splitlines()) == 1
    assert json.loads(result.stdout)["rank"] == 1
    assert result.stderr.strip() == "status=0"


def test_help_imports_no_heavy_library():
    code = (
        "import sys; from dsearch.cli import run; rc = run(['--help']); "
        "heavy = [m for m in ('torch', 'sentence_transformers', 'faiss', 'transformers') if m in sys.modules]; "
        "print(rc, heavy)"
    )
    result = sh(sys.executable, "-c", code)
    assert result.stdout.strip().splitlines()[-1] == "0 []"


def test_python_dash_m(bundled_sample_index):
    result = sh(sys.executable, "-m", "dsearch", "info", str(bundled_sample_index), "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["passages"] == 200


def test_missing_local_model_is_one_line_error(tmp_path):
    result = sh(
        DSEARCH,
        "index",
        str(SAMPLE / "passages.jsonl"),
        "-o",
        str(tmp_path / "i"),
        "--model",
        str(tmp_path / "no-model"),
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no such directory" in result.stderr
    assert not (tmp_path / "i").exists()


def test_unreachable_hub_model_says_so(tmp_path):
    env = {**ENV, "HF_HOME": str(tmp_path / "hf-home")}  # an empty cache
    result = sh(
        DSEARCH,
        "index",
        str(SAMPLE / "passages.jsonl"),
        "-o",
        str(tmp_path / "i"),
        "--model",
        "some-org/not-a-cached-model",
        env=env,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "the model hub cannot be reached" in result.stderr and "--model PATH" in result.stderr


def test_dot_product_model_is_indexed_raw(tiny_seed_model, tmp_path, capsys):
    """A model that declares dot similarity keeps raw vectors, and hits rank by raw inner product."""
    encoder = SentenceTransformerEncoder(str(tiny_seed_model))
    assert (encoder.similarity, encoder.max_seq_length) == ("dot", 250)
    target = tmp_path / "dot"
    build_index([str(SAMPLE / "passages.jsonl")], target, encoder)
    opened = OpenIndex(target)
    assert opened.manifest.model.similarity == "dot"
    stored = opened.vectors(0, opened.rows)
    rows = [json.loads(line) for line in (SAMPLE / "passages.jsonl").read_text().splitlines()]
    texts = [f"{r['title']} {r['text']}" for r in rows]
    direct = encoder.model.encode_document(texts, convert_to_numpy=True)
    np.testing.assert_allclose(stored, direct, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-3)  # not normalised

    query = "which raising agent makes cakes rise"
    [(_, hits)] = list(run_search(opened, encoder, [Query("q", query)], k=5))
    raw_scores = direct @ encoder.model.encode_query([query], convert_to_numpy=True)[0]
    # Random weights make many scores nearly equal, so compare scores rather than the order of near-ties.
    position = {r["_id"]: i for i, r in enumerate(rows)}
    hit_scores = np.array([h.score for h in hits])
    np.testing.assert_allclose(hit_scores, raw_scores[[position[h.id] for h in hits]], rtol=1e-4)
    assert np.all(np.diff(hit_scores) <= 0)
    np.testing.assert_allclose(hit_scores, np.sort(raw_scores)[::-1][:5], rtol=1e-4)

    # And through the command line, with the model recorded in the manifest:
    runner = Runner(capsys, lambda name, **options: SentenceTransformerEncoder(name))
    result = runner("query", target, query, "-k", "1", "--format", "ids")
    assert result.exit_code == 0 and result.stdout.strip() == hits[0].id
