"""A committed index of format version 1 must keep loading and answering: format changes are deliberate.

tests/golden/index-v1 was built from tests/golden/corpus.jsonl with the hashing encoder (tests/fakes.py):
    python -c "from fakes import HashingEncoder; from dsearch.indexer import build_index; ..."  (in tests/)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fakes import HashingEncoder

from dsearch.indexer import build_index
from dsearch.manifest import read_manifest
from dsearch.search import Query, run_search
from dsearch.store import OpenIndex

GOLDEN = Path(__file__).parent / "golden"


def test_golden_index_loads_and_verifies(tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(GOLDEN / "index-v1", copy)
    opened = OpenIndex(copy, verify=True)
    assert opened.manifest.format_version == 1
    assert opened.rows == 30


def test_golden_index_answers_like_a_fresh_build(tmp_path):
    fresh = tmp_path / "fresh"
    build_index([str(GOLDEN / "corpus.jsonl")], fresh, HashingEncoder())
    queries = [Query("1", "volcano on mars"), Query("2", "gravity of black holes"), Query("3", "DNA base pairs")]
    golden_hits = list(run_search(OpenIndex(GOLDEN / "index-v1"), HashingEncoder(), queries, k=5))
    fresh_hits = list(run_search(OpenIndex(fresh), HashingEncoder(), queries, k=5))
    assert [[(h.id, round(h.score, 5)) for h in hits] for _, hits in golden_hits] == [
        [(h.id, round(h.score, 5)) for h in hits] for _, hits in fresh_hits
    ]
    assert read_manifest(GOLDEN / "index-v1").model.name == "hash-test"
