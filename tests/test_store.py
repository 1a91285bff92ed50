"""The index directory: the streamed FAISS file, atomic publish, validation of what is on disk."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from fakes import HashingEncoder

from dsearch.corpus import Passage
from dsearch.errors import IndexDirError
from dsearch.indexer import build_index
from dsearch.manifest import FORMAT_VERSION, read_manifest
from dsearch.store import FlatIndexFileWriter, FlatVectors, OpenIndex


def passages(n: int, prefix: str = "p") -> list[Passage]:
    return [Passage(f"{prefix}{i}", f"passage number {i} about topic {i % 7}") for i in range(n)]


def corpus_file(tmp_path, n: int, name: str = "c.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"id": p.id, "text": p.text}) + "\n" for p in passages(n)))
    return str(path)


def test_streamed_faiss_file_is_byte_identical_to_faiss_own(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((37, 16)).astype(np.float32)
    writer = FlatIndexFileWriter(tmp_path / "x.faiss", 16)
    writer.add(vectors[:20])
    writer.add(vectors[20:])
    writer.close()
    reference = faiss.IndexFlatIP(16)
    reference.add(vectors)
    assert (tmp_path / "x.faiss").read_bytes() == faiss.serialize_index(reference).tobytes()


def test_numpy_search_over_the_mapped_file_matches_faiss(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((70_000, 16)).astype(np.float32)  # more than one search block
    writer = FlatIndexFileWriter(tmp_path / "x.faiss", 16)
    writer.add(vectors)
    writer.close()
    queries = rng.standard_normal((5, 16)).astype(np.float32)
    ours_scores, ours_rows = FlatVectors(tmp_path / "x.faiss").search(queries, 10)
    order = np.argsort(-ours_scores, axis=1)
    faiss_scores, faiss_rows = faiss.read_index(str(tmp_path / "x.faiss")).search(queries, 10)
    assert (np.take_along_axis(ours_rows, order, 1) == faiss_rows).all()
    np.testing.assert_allclose(np.take_along_axis(ours_scores, order, 1), faiss_scores, rtol=1e-4, atol=1e-4)


def test_a_file_that_is_not_a_flat_index_is_refused(tmp_path):
    (tmp_path / "bad.faiss").write_bytes(b"IxHNsomething else entirely" * 3)
    with pytest.raises(IndexDirError, match="not a FAISS IndexFlat file"):
        FlatVectors(tmp_path / "bad.faiss")


def test_empty_faiss_file_matches_too(tmp_path):
    writer = FlatIndexFileWriter(tmp_path / "e.faiss", 8)
    writer.close()
    assert (tmp_path / "e.faiss").read_bytes() == faiss.serialize_index(faiss.IndexFlatIP(8)).tobytes()


def test_build_then_open_and_lookup_across_row_groups(tmp_path):
    target = tmp_path / "idx"
    summary = build_index([corpus_file(tmp_path, 2500)], target, HashingEncoder())
    assert summary.indexed == 2500
    opened = OpenIndex(target, verify=True)
    assert opened.rows == 2500
    assert len(opened.segments[0].group_starts) >= 3  # the lookup below crosses row groups
    found = opened.lookup([0, 999, 1000, 2499])
    assert [found[r]["id"] for r in (0, 999, 1000, 2499)] == ["p0", "p999", "p1000", "p2499"]
    manifest = read_manifest(target)
    assert manifest.format_version == FORMAT_VERSION and manifest.model.dim == 64


def test_vectors_are_normalised_for_cosine_and_raw_for_dot(tmp_path):
    for similarity in ("cosine", "dot"):
        target = tmp_path / similarity
        build_index([corpus_file(tmp_path, 10)], target, HashingEncoder(similarity=similarity))
        norms = np.linalg.norm(OpenIndex(target).vectors(0, 10), axis=1)
        if similarity == "cosine":
            np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
        else:
            assert norms.max() > 1.5


def test_ties_break_by_row(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": "same words"}) + "\n" for i in range(12)))
    build_index([str(path)], tmp_path / "idx", HashingEncoder())
    opened = OpenIndex(tmp_path / "idx")
    scores, rows = opened.search(HashingEncoder().encode_queries(["same words"]), 5)
    assert rows[0].tolist() == [0, 1, 2, 3, 4]
    assert len(set(scores[0].tolist())) == 1


def test_failed_build_leaves_previous_index_and_no_debris(tmp_path):
    target = tmp_path / "idx"
    build_index([corpus_file(tmp_path, 50)], target, HashingEncoder())
    before = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    failing = HashingEncoder(fail_after_batches=1)
    with pytest.raises(KeyboardInterrupt):
        build_index([corpus_file(tmp_path, 600, "big.jsonl")], target, failing, batch_size=8)
    after = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []
    assert OpenIndex(target).rows == 50


def test_rebuild_replaces_old_segment(tmp_path):
    target = tmp_path / "idx"
    build_index([corpus_file(tmp_path, 5)], target, HashingEncoder())
    old_segment = read_manifest(target).segments[0].path
    build_index([corpus_file(tmp_path, 8, "more.jsonl")], target, HashingEncoder())
    manifest = read_manifest(target)
    assert manifest.rows == 8 and not (target / old_segment).exists()
    assert sorted(p.name for p in target.iterdir()) == sorted(["manifest.json", manifest.segments[0].path])


def test_refuses_to_overwrite_a_directory_that_is_not_an_index(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    with pytest.raises(IndexDirError, match="not a dsearch index; refusing to overwrite"):
        build_index([corpus_file(tmp_path, 3)], target, HashingEncoder())
    assert (target / "thesis.tex").read_text() == "years of work"


def test_empty_directory_may_be_filled(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    build_index([corpus_file(tmp_path, 3)], target, HashingEncoder())
    assert OpenIndex(target).rows == 3


def test_missing_manifest(tmp_path):
    with pytest.raises(IndexDirError, match="not a dsearch index"):
        OpenIndex(tmp_path)


def test_truncated_file_is_detected(tmp_path):
    target = tmp_path / "idx"
    build_index([corpus_file(tmp_path, 20)], target, HashingEncoder())
    faiss_file = next(target.rglob("index.faiss"))
    faiss_file.write_bytes(faiss_file.read_bytes()[:-10])
    with pytest.raises(IndexDirError, match="does not match the manifest"):
        OpenIndex(target)


def test_flipped_byte_is_caught_by_verify(tmp_path):
    target = tmp_path / "idx"
    build_index([corpus_file(tmp_path, 20)], target, HashingEncoder())
    faiss_file = next(target.rglob("index.faiss"))
    data = bytearray(faiss_file.read_bytes())
    data[-1] ^= 0xFF
    faiss_file.write_bytes(bytes(data))
    OpenIndex(target)  # sizes match: a plain open stays cheap
    with pytest.raises(IndexDirError, match="corrupt"):
        OpenIndex(target, verify=True)


@pytest.mark.parametrize(
    "mangle,match",
    [
        (lambda m: "{not json", "not valid JSON"),
        (lambda m: json.dumps({**json.loads(m), "format_version": FORMAT_VERSION + 1}), "newer than this dsearch"),
        (lambda m: json.dumps({k: v for k, v in json.loads(m).items() if k != "model"}), "missing or has a malformed"),
        (lambda m: json.dumps({**json.loads(m), "format": "something-else"}), "not a dsearch manifest"),
    ],
)
def test_bad_manifest(tmp_path, mangle, match):
    target = tmp_path / "idx"
    build_index([corpus_file(tmp_path, 3)], target, HashingEncoder())
    manifest = target / "manifest.json"
    manifest.write_text(mangle(manifest.read_text()))
    with pytest.raises(IndexDirError, match=match):
        OpenIndex(target)
