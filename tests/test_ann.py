"""ANN and compressed index types: choice, recall measurement, build/query/update/reindex, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, Runner
from fakes import HashingEncoder
from test_cli import one_error_line

from dsearch.manifest import read_manifest
from dsearch.store import FlatIndexFileWriter, FlatVectors, OpenIndex
from dsearch.vector_index import (
    FLAT,
    FlatIndex,
    exact_truth,
    measure_recall,
    parse_memory,
    plan_index,
    recall_at_k,
)

TYPES = ["hnsw", "ivf", "ivfpq", "IVF4,SQ8"]
QUERIES = ["what causes the northern lights", "how long is a marathon race", "bread dough yeast"]


# --- recall measurement, against known answers -------------------------------------------------------


def test_recall_at_k_counts_the_overlap_of_the_first_k():
    truth = [[1, 2, 3, 4], [5, 6, 7, 8]]
    found = [[4, 3, 9, 9], [5, 6, 7, 8]]  # 2 of 4, then 4 of 4
    assert recall_at_k(truth, found, k=4) == pytest.approx(0.75)
    assert recall_at_k([[1, 2, -1]], [[2, 1, 5]], k=3) == 1.0  # padding (-1) is not a true neighbour


def _raw_store(tmp_path: Path, vectors: np.ndarray) -> FlatVectors:
    writer = FlatIndexFileWriter(tmp_path / "raw.faiss", vectors.shape[1])
    writer.add(vectors)
    writer.close()
    return FlatVectors(tmp_path / "raw.faiss")


class _DropsTenth:
    """Exact search that loses each query's 10th-best other row: recall@10 is exactly 0.9."""

    def __init__(self, raw: FlatVectors) -> None:
        self.exact = FlatIndex(raw)

    def search(self, queries, k, params=None, allowed_rows=None):
        scores, rows = self.exact.search(queries, k)
        order = np.argsort(-scores, axis=1)
        scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        rows[:, 10] = -1  # position 0 is the query's own row, excluded from recall
        return scores, rows


def test_measured_recall_excludes_the_query_row_and_matches_a_known_answer(tmp_path):
    vectors = np.random.default_rng(3).standard_normal((500, 16)).astype(np.float32)
    raw = _raw_store(tmp_path, vectors)
    sample = np.arange(0, 500, 5)
    truth = exact_truth(raw, sample)
    assert not any(own in row for own, row in zip(sample, truth, strict=True))  # own row never counted
    assert measure_recall(FlatIndex(raw), raw, {}, sample, truth) == 1.0
    assert measure_recall(_DropsTenth(raw), raw, {}, sample, truth) == pytest.approx(0.9)


# --- choosing the type -------------------------------------------------------------------------------


def test_auto_is_flat_when_small_ivf_when_it_fits_and_pq_when_it_does_not():
    assert plan_index("auto", 50_000, 384, 8 << 30).index_type == FLAT
    ivf = plan_index("auto", 1_000_000, 384, 8 << 30)
    assert (ivf.index_type, ivf.factory) == ("ivf", "IVF4096,Flat")
    pq = plan_index("auto", 10_000_000, 768, 8 << 30)  # MS MARCO scale: 28.6 GiB of float32 vectors
    assert pq.index_type == "ivfpq" and pq.estimated_bytes <= 8 << 30 and pq.compressed
    with pytest.raises(ValueError, match="cannot hold"):
        plan_index("auto", 10_000_000, 768, 50 << 20)
    with pytest.raises(ValueError, match="more than the memory budget"):
        plan_index("hnsw", 1_000_000, 384, 1 << 30)


def test_parse_memory():
    assert parse_memory("2G") == 2 << 30 and parse_memory("512M") == 512 << 20 and parse_memory("1000") == 1000
    for bad in ("lots", "0", "-1G", ""):
        with pytest.raises(ValueError):
            parse_memory(bad)


# --- every type round-trips through the command line -------------------------------------------------


def _hits(cli, directory, *extra):
    result = cli("query", directory, *QUERIES, "-k", "5", "--format", "jsonl", *extra)
    assert result.exit_code == 0, result.stderr
    return [(h["qid"], h["id"], h["score"]) for h in map(json.loads, result.stdout.splitlines())]


def _same(hits, expected):
    """Same ids in the same order, scores equal up to float32 rounding (FAISS and numpy sum in other orders)."""
    assert [(q, i) for q, i, _ in hits] == [(q, i) for q, i, _ in expected]
    assert [s for _, _, s in hits] == pytest.approx([s for _, _, s in expected], abs=1e-5)


@pytest.fixture
def flat_index(cli, tmp_path) -> Path:
    target = tmp_path / "flat"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target).exit_code == 0
    return target


@pytest.mark.parametrize("index_type", TYPES)
def test_each_type_builds_queries_updates_and_reindexes(cli, tmp_path, flat_index, index_type):
    target = tmp_path / "ann"
    built = cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", index_type)
    assert built.exit_code == 0, built.stderr
    info = json.loads(cli("info", target, "--json").stdout)
    assert info["format_version"] == 2 and info["index_params"]["factory"]
    assert info["index_type"] == ("factory" if "," in index_type else index_type)
    assert 0.9 <= info["recall_at_10"] <= 1.0 and info["index_params"]["recall_sample"] == 200
    exact = _hits(cli, flat_index)
    # Probing everything makes the search exhaustive: the same hits and scores as the exact index.
    if index_type != "ivfpq":  # PQ's candidates are approximate even when exhaustive; checked below
        _same(_hits(cli, target, "--effort", "1000"), exact)
    # Printed scores are exact inner products, whatever the index type (compressed ones re-rank).
    exact_scores = {(q, i): s for q, i, s in _hits(cli, flat_index, "-k", "200")}
    assert all(exact_scores[(q, i)] == pytest.approx(s, abs=1e-5) for q, i, s in _hits(cli, target))
    # --update keeps the type and rebuilds the ANN file for the new rows.
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text((SAMPLE / "passages.jsonl").read_text() + '{"id": "new-1", "text": "aurora borealis"}\n')
    updated = cli("index", corpus, "-o", target, "--update", "--json")
    assert updated.exit_code == 0, updated.stderr
    assert json.loads(updated.stdout)["added"] == 1
    manifest = read_manifest(target)
    assert manifest.index_type == info["index_type"] and manifest.rows == 201
    found = cli("query", target, "aurora borealis", "-k", "1", "--format", "ids", "--effort", "1000")
    assert (found.exit_code, found.stdout) == (0, "new-1\n")
    # reindex changes the type from the stored vectors alone: no model is loaded.
    cli.loaded.clear()
    again = cli("reindex", target, "--index-type", "flat")
    assert again.exit_code == 0 and again.stdout == "" and "reindexed" in again.stderr
    assert cli.loaded == []
    assert read_manifest(target).index_type == FLAT
    assert not list(target.glob("seg-*/ann-*"))  # the old ANN file is gone
    assert cli("status", target).exit_code == 0


def test_reindex_rebuilds_a_corrupt_ann_file(cli, tmp_path, flat_index):
    target = tmp_path / "ann"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", "ivf").exit_code == 0
    (ann,) = target.glob("seg-*/ann-*.faiss")
    data = bytearray(ann.read_bytes())
    data[:8] = b"garbage!"  # same size, unreadable header
    ann.write_bytes(bytes(data))
    one_error_line(cli("query", target, "aurora"), 1, str(ann), "corrupt", "dsearch reindex")
    status = cli("status", target)
    assert status.exit_code == 6 and status.stdout.startswith("corrupt:")
    fixed = cli("reindex", target)
    assert fixed.exit_code == 0, fixed.stderr
    assert read_manifest(target).index_type == "ivf"  # the type it was asked for, kept
    assert not ann.exists()
    assert cli("status", target).exit_code == 0
    _same(_hits(cli, target, "--effort", "1000"), _hits(cli, flat_index))


def test_query_knobs_change_the_search(cli, tmp_path):
    target = tmp_path / "ann"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", "ivf").exit_code == 0
    # One list probed of several: fewer distinct candidates than probing them all.
    one = _hits(cli, target, "--nprobe", "1", "-k", "50")
    every = _hits(cli, target, "--nprobe", "1000", "-k", "50")
    assert len(one) < len(every) == 150


# --- bad input ---------------------------------------------------------------------------------------


def test_bad_index_type_is_a_usage_error(cli, tmp_path):
    one_error_line(cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "x", "--index-type", "fast"), 2, "fast")
    assert not (tmp_path / "x").exists()


def test_factory_string_faiss_rejects_is_a_usage_error(cli, tmp_path):
    result = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "x", "--index-type", "IVF4,PQ7")  # 64 % 7
    one_error_line(result, 2, "IVF4,PQ7")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("memory", "fragment"), [("lots", "not a size"), ("1K", "cannot hold")])
def test_impossible_memory_is_a_usage_error_and_nothing_is_written(cli, tmp_path, memory, fragment):
    target = tmp_path / "x"
    result = cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", "flat", "--memory", memory)
    one_error_line(result, 2, fragment)
    assert not target.exists() and not list(tmp_path.glob(".x.staging-*"))


def test_a_memory_budget_found_too_small_after_encoding_keeps_the_vectors(cli, tmp_path):
    """How many rows the vectors take (windows) is known once they are encoded: the rerun with more memory
    resumes from them."""
    target = tmp_path / "x"
    result = cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", "flat", "--memory", "20K")
    one_error_line(result, 2, "more than the memory budget", "the encoded vectors are kept")
    assert not (target / "manifest.json").exists()
    rerun = cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", "flat", "--json")
    assert rerun.exit_code == 0, rerun.stderr
    assert json.loads(rerun.stdout)["encoded"] == 0


def test_a_format_1_index_still_updates_and_reindexes(cli, tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(Path(__file__).parent / "golden" / "index-v1", copy)
    assert cli("reindex", copy, "--index-type", "hnsw").exit_code == 0
    manifest = read_manifest(copy)
    assert (manifest.format_version, manifest.index_type) == (2, "hnsw")
    assert cli("info", copy, "--verify").exit_code == 0
    hits = cli("query", copy, "volcano on mars", "-k", "1", "--format", "ids", "--effort", "1000")
    assert hits.exit_code == 0 and hits.stdout.strip()


def test_golden_format_2_ivf_index_loads_verifies_and_answers_like_a_fresh_build(cli, tmp_path):
    """tests/golden/index-v2-ivf: built from tests/golden/corpus.jsonl with the hashing encoder, --index-type ivf
    (``build_index([...], Path('golden/index-v2-ivf'), HashingEncoder(), index_type='ivf')`` in tests/)."""
    golden = Path(__file__).parent / "golden"
    copy = tmp_path / "golden"
    shutil.copytree(golden / "index-v2-ivf", copy)
    opened = OpenIndex(copy, verify=True)
    assert (opened.manifest.format_version, opened.manifest.index_type) == (2, "ivf")
    assert opened.segments[0].ann is not None and opened.rows == 30
    fresh = tmp_path / "fresh"
    assert cli("index", golden / "corpus.jsonl", "-o", fresh).exit_code == 0
    for text in ("volcano on mars", "gravity of black holes", "DNA base pairs"):
        _same(
            _hits_for(cli, copy, text),
            _hits_for(cli, fresh, text),
        )


def _hits_for(cli, directory, text):
    result = cli("query", directory, text, "-k", "5", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    return [(h["qid"], h["id"], h["score"]) for h in map(json.loads, result.stdout.splitlines())]


@pytest.mark.parametrize("index_type", ["ivf", "ivfpq"])
def test_a_tiny_corpus_trains_without_faiss_warnings_on_stderr(tmp_path, capfd, index_type):
    from fakes import HashingEncoder

    from dsearch.indexer import build_index

    corpus = Path(__file__).parent / "golden" / "corpus.jsonl"  # 30 passages: fewer than 39 a centroid
    build_index([str(corpus)], tmp_path / "idx", HashingEncoder(), index_type=index_type)
    assert capfd.readouterr().err == ""
    assert read_manifest(tmp_path / "idx").index_type == index_type


def test_allowed_rows_restrict_every_index_type(tmp_path):
    """The VectorIndex protocol's filter seam: only allowed rows come back, best first among them."""
    from dsearch.vector_index import build_ann, open_ann

    vectors = np.random.default_rng(5).standard_normal((2000, 16)).astype(np.float32)
    raw = _raw_store(tmp_path, vectors)
    allowed = np.arange(1, 2000, 7)
    queries = vectors[:5]
    best = np.argsort(-(queries @ vectors[allowed].T), axis=1)[:, :3]
    expected = [set(allowed[row]) for row in best]
    indexes = [FlatIndex(raw)]
    for kind in ("hnsw", "ivf"):
        name, params = build_ann(tmp_path, raw, plan_index(kind, 2000, 16, 1 << 30))
        indexes.append(open_ann(tmp_path / name, raw, params))
    for index in indexes:
        scores, rows = index.search(queries, 3, {"effort": 100}, allowed_rows=allowed)
        assert [set(r.tolist()) for r in rows] == expected


def test_default_nprobe_is_one_step_past_the_first_reaching_the_target(tmp_path):
    from dsearch.vector_index import NPROBE_STEPS, RECALL_TARGET, build_ann, open_ann, sample_rows, tune

    vectors = np.random.default_rng(9).standard_normal((4000, 16)).astype(np.float32)
    raw = _raw_store(tmp_path, vectors)
    name, params = build_ann(tmp_path, raw, plan_index("ivf", 4000, 16, 1 << 30))
    index = open_ann(tmp_path / name, raw, params)
    sample = sample_rows(4000, 300, 2)
    truth = exact_truth(raw, sample)
    knobs, recall = tune(index, raw, sample, truth)
    chosen = NPROBE_STEPS.index(knobs["nprobe"])
    assert chosen >= 1 and recall == measure_recall(index, raw, knobs, sample, truth)
    reached = measure_recall(index, raw, {"nprobe": NPROBE_STEPS[chosen - 1]}, sample, truth)
    assert reached >= RECALL_TARGET
    if chosen >= 2:
        assert measure_recall(index, raw, {"nprobe": NPROBE_STEPS[chosen - 2]}, sample, truth) < RECALL_TARGET


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_where_filters_an_ann_index_like_a_flat_one(cli, tmp_path, flat_index, index_type):
    target = tmp_path / "ann"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", index_type).exit_code == 0
    where = ("--where", "topic = 'astronomy'")
    filtered = _hits(cli, target, *where, "--effort", "1000")
    assert filtered and all(i.startswith("astronomy-") for _, i, _ in filtered)
    _same(filtered, _hits(cli, flat_index, *where))


# --- a killed reindex --------------------------------------------------------------------------------


def _seg_files(target: Path) -> list[str]:
    (segment,) = target.glob("seg-*")
    return sorted(p.name for p in segment.iterdir())


@pytest.mark.parametrize("next_run", ["reindex", "update", "index"])
def test_a_reindex_killed_before_the_manifest_swap_leaves_the_index_intact_and_its_file_is_collected(
    cli, tmp_path, next_run
):
    import signal

    from test_safety import _crash_at

    target = tmp_path / "ann"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", "ivf").exit_code == 0
    manifest_before = (target / "manifest.json").read_bytes()
    files_before = _seg_files(target)
    hits_before = _hits(cli, target)
    crashed = _crash_at("ann-written", ["reindex", str(target), "--index-type", "hnsw"])
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    # The published index is untouched: same manifest, same files, same answers; one new unlisted ANN file.
    assert (target / "manifest.json").read_bytes() == manifest_before
    (orphan,) = set(_seg_files(target)) - set(files_before)
    assert orphan.startswith("ann-") and orphan.endswith(".faiss")
    assert OpenIndex(target, verify=True).manifest.index_type == "ivf"
    assert _hits(cli, target) == hits_before
    status = cli("status", target)
    assert status.exit_code == 6 and status.stdout.startswith("incomplete: ") and orphan in status.stdout
    # The next run of any kind collects it.
    if next_run == "reindex":
        again = cli("reindex", target)
    elif next_run == "update":
        again = cli("index", SAMPLE / "passages.jsonl", "-o", target, "--update")  # nothing changed: tidies only
    else:
        again = cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", "ivf")
    assert again.exit_code == 0, again.stderr
    listed = set(read_manifest(target).segments[0].files)
    assert set(_seg_files(target)) == listed and orphan not in listed
    assert cli("status", target).exit_code == 0


def test_collecting_ann_leftovers_leaves_symlinks_and_other_names_alone(cli, tmp_path):
    target = tmp_path / "ann"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", "ivf").exit_code == 0
    (segment,) = target.glob("seg-*")
    outside = tmp_path / "precious.faiss"
    outside.write_bytes(b"keep me")
    (segment / "ann-0123456789ab.faiss").symlink_to(outside)  # our name form, but a symlink: never followed
    (segment / "ann-notours.faiss").write_bytes(b"x")  # not the exact name form dsearch writes
    assert cli("reindex", target).exit_code == 0
    assert outside.read_bytes() == b"keep me"
    assert (segment / "ann-0123456789ab.faiss").is_symlink() and (segment / "ann-notours.faiss").exists()


# --- --update reuses the trained structure -----------------------------------------------------------


def _centroids(path: Path) -> np.ndarray:
    import faiss

    index = faiss.read_index(str(path))
    ivf = faiss.extract_index_ivf(index)
    return faiss.downcast_index(ivf.quantizer).reconstruct_n(0, ivf.nlist)


def _changed_corpus(tmp_path: Path) -> Path:
    """The sample corpus with 10 passages gone, one rewritten and two new ones (one in the middle)."""
    lines = (SAMPLE / "passages.jsonl").read_text().splitlines()
    kept = lines[10:]
    first = json.loads(kept[0])
    kept[0] = json.dumps({**first, "text": first["text"] + " Rewritten with auroras and volcanoes."})
    kept.insert(50, json.dumps({"id": "new-mid", "text": "geysers erupt when groundwater boils"}))
    kept.append(json.dumps({"id": "new-end", "text": "aurora borealis over the arctic sky"}))
    corpus = tmp_path / "changed.jsonl"
    corpus.write_text("\n".join(kept) + "\n")
    return corpus


@pytest.mark.parametrize("index_type", ["ivf", "ivfpq"])
def test_update_reuses_the_trained_ivf_structure_and_answers_like_a_fresh_reindex(cli, tmp_path, index_type):
    target = tmp_path / "ann"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", index_type).exit_code == 0
    before = read_manifest(target)
    (old_ann,) = target.glob("seg-*/ann-*.faiss")
    old_centroids = _centroids(old_ann)
    corpus = _changed_corpus(tmp_path)
    updated = cli("index", corpus, "-o", target, "--update", "--json")
    assert updated.exit_code == 0, updated.stderr
    summary = json.loads(updated.stdout)
    assert (summary["added"], summary["updated"], summary["removed"]) == (2, 1, 10)
    after = read_manifest(target)
    params = after.index_params
    assert "reusing the centroids" in params["reused"] and params["trained_rows"] == 200
    assert params["factory"] == before.index_params["factory"] and after.rows == 192
    assert 0.9 <= params["recall_at_10"] <= 1.0 and params["recall_sample"] == 192  # measured again, recorded
    (new_ann,) = target.glob("seg-*/ann-*.faiss")
    np.testing.assert_array_equal(_centroids(new_ann), old_centroids)  # not retrained
    # The same rows, reindexed from scratch (retrained), and an exact index of the corpus: exhaustive search
    # (nprobe = nlist) of the updated index finds the same hits with the same exact scores.
    fresh = tmp_path / "fresh"
    shutil.copytree(target, fresh)
    assert cli("reindex", fresh, "--index-type", index_type).exit_code == 0
    assert read_manifest(fresh).index_params["reused"] is False
    flat = tmp_path / "flat"
    assert cli("index", corpus, "-o", flat).exit_code == 0
    if index_type == "ivf":
        _same(_hits(cli, target, "--effort", "1000"), _hits(cli, fresh, "--effort", "1000"))
        _same(_hits(cli, target, "--effort", "1000"), _hits(cli, flat))
    exact_scores = {(q, i): s for q, i, s in _hits(cli, flat, "-k", "200")}
    assert all(exact_scores[(q, i)] == pytest.approx(s, abs=1e-5) for q, i, s in _hits(cli, target))
    found = cli("query", target, "geysers erupt when groundwater boils", "-k", "1", "--format", "ids")
    assert (found.exit_code, found.stdout) == (0, "new-mid\n")
    assert cli("status", target).exit_code == 0


def test_update_grows_an_hnsw_graph_only_when_rows_were_appended(cli, tmp_path):
    target = tmp_path / "ann"
    lines = (SAMPLE / "passages.jsonl").read_text().splitlines()
    first = tmp_path / "first.jsonl"
    first.write_text("\n".join(lines[:150]) + "\n")
    assert cli("index", first, "-o", target, "--index-type", "hnsw").exit_code == 0
    appended = tmp_path / "appended.jsonl"
    appended.write_text("\n".join(lines) + "\n")
    assert cli("index", appended, "-o", target, "--update").exit_code == 0
    params = read_manifest(target).index_params
    assert "appended" in params["reused"] and params["recall_sample"] == 200
    flat = tmp_path / "flat"
    assert cli("index", appended, "-o", flat).exit_code == 0
    _same(_hits(cli, target, "--effort", "1000"), _hits(cli, flat))
    # A removed row renumbers the rest: the graph is built afresh.
    assert cli("index", _changed_corpus(tmp_path), "-o", target, "--update").exit_code == 0
    assert read_manifest(target).index_params["reused"] is False


def test_reuse_rule_retrains_past_four_times_the_trained_rows_and_on_other_codes(tmp_path):
    from dsearch.vector_index import Previous, reuse_plan

    def previous(factory: str, trained: int, kind: str = "ivf") -> Previous:
        params = {"factory": factory, "trained_rows": trained}
        return Previous(tmp_path / "x.faiss", kind, params, trained, np.arange(trained))

    plan = plan_index("ivf", 1_000_000, 384, 8 << 30)  # IVF4096,Flat
    assert reuse_plan(plan, previous("IVF4096,Flat", 1_000_000), 1_000_000) is not None
    assert reuse_plan(plan, previous("IVF2048,Flat", 400_000), 1_000_000) is not None  # 2.5x: lists still fit
    assert reuse_plan(plan, previous("IVF1024,Flat", 200_000), 1_000_000) is None  # 5x the trained rows
    assert reuse_plan(plan_index("ivf", 40_000, 384, 8 << 30), previous("IVF4096,Flat", 1_000_000), 40_000) is None
    assert reuse_plan(plan, previous("IVF4096,PQ48x4fs", 1_000_000, "ivfpq"), 1_000_000) is None  # another type
    assert reuse_plan(plan, None, 1_000_000) is None


# --- the re-rank reads candidates without faulting in the memory map --------------------------------


class _NoMap:
    """Stands in for FlatVectors' memory map: any read through it fails the test."""

    shape = (0, 0)

    def __getitem__(self, item):
        raise AssertionError("read through the memory map")


def test_few_rows_are_read_with_pread_and_match_the_memory_map(tmp_path):
    vectors = np.random.default_rng(4).standard_normal((5000, 24)).astype(np.float32)
    raw = _raw_store(tmp_path, vectors)
    rows = np.array([4999, 0, 17, 17, 2500])
    np.testing.assert_array_equal(raw.take(rows), vectors[rows])  # read with pread
    np.testing.assert_array_equal(raw.take(np.arange(5000)), vectors)  # many rows: through the map
    with pytest.raises(IndexError):
        raw.take(np.array([5000]))
    raw._data = _NoMap()
    np.testing.assert_array_equal(raw.take(rows), vectors[rows])  # never touched the map


def test_ivfpq_rerank_reads_its_candidates_without_the_memory_map(cli, tmp_path, flat_index):
    """A page fault in the map pulled the kernel's readahead (8 MB here) into the query process's RSS."""
    target = tmp_path / "ann"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", "ivfpq").exit_code == 0
    opened = OpenIndex(target)
    queries = opened.vectors_at([3, 150])
    expected = opened.search(queries, 10)
    opened.segments[0].vectors._data = _NoMap()  # the raw store of the segment: what the re-rank reads
    scores, rows = opened.search(queries, 10)
    np.testing.assert_array_equal(rows, expected[1])
    np.testing.assert_allclose(scores, expected[0], atol=1e-6)
    exact = OpenIndex(flat_index).search(queries, 10)
    np.testing.assert_array_equal(rows[:, :1], exact[1][:, :1])  # each query's own row first, exactly scored


@pytest.mark.parametrize(
    "factory", ["PCA32,Flat", "PCA32,HNSW16", "PCAR16,IVF4,Flat", "PCAW32,HNSW16", "IVF4,RQ4x4", "LSQ4x4"]
)
def test_an_index_that_reduces_the_dimension_still_prints_exact_scores(cli, tmp_path, flat_index, factory):
    """A lossy transform (PCA) or additive codes (RQ, LSQ) keep no exact vector: their scores are not cosines,
    so they re-rank like PQ does."""
    target = tmp_path / "reduced"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", factory, "-q").exit_code == 0
    exact_scores = {(q, i): s for q, i, s in _hits(cli, flat_index, "-k", "200")}
    hits = _hits(cli, target)
    assert len(hits) == 5 * len(QUERIES)
    assert all(exact_scores[(q, i)] == pytest.approx(s, abs=1e-5) for q, i, s in hits)
    # An index built before this rule (its manifest says no re-rank) is re-ranked all the same.
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["index_params"]["rerank"] is True
    manifest["index_params"]["rerank"] = False
    (target / "manifest.json").write_text(json.dumps(manifest))
    assert all(exact_scores[(q, i)] == pytest.approx(s, abs=1e-5) for q, i, s in _hits(cli, target))
    # --min-score reads the cosine, as on the exact index.
    kept = cli("query", target, QUERIES[0], "-k", "5", "--format", "ids", "--min-score", "0.3")
    assert kept.stdout.split() == [i for q, i, s in _hits(cli, target) if q == "1" and s >= 0.3]


@pytest.mark.parametrize("factory", ["HNSW16_PQ8", "OPQ8,IVF4,PQ8"])  # 256 PQ centroids: more than 200 passages
def test_a_factory_faiss_cannot_train_on_the_corpus_is_one_line_and_the_index_is_kept(cli, flat_index, factory):
    before = _hits(cli, flat_index)
    for args in (("reindex", flat_index, "--index-type", factory),
                 ("index", SAMPLE / "passages.jsonl", "-o", flat_index, "--index-type", factory)):
        result = cli(*args)
        one_error_line(result, 2, factory, "200 vectors", "Number of training points (200)", "--index-type")
        assert "unexpected" not in result.stderr and "report it" not in result.stderr
        assert read_manifest(flat_index).index_type == FLAT and _hits(cli, flat_index) == before
        status = cli("status", flat_index)
        if args[0] == "reindex":
            assert status.exit_code == 0  # nothing left behind
        else:  # the build keeps what it encoded, for the rerun with another --index-type
            assert (status.exit_code, "kept" in result.stderr) == (6, True)
            assert "failed run left a checkpoint" in status.stdout


@pytest.mark.parametrize("index_type", ["ivf", "ivfpq"])
def test_an_ann_file_whose_ids_point_past_the_segment_is_one_line_naming_reindex(cli, tmp_path, index_type):
    """Damaged ids in an IVF list (same file size) sent a re-rank out of the raw store: 'unexpected IndexError'."""
    import faiss

    target = tmp_path / "ann"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", index_type, "-q").exit_code == 0
    ann = next(target.glob("seg-*/ann-*.faiss"))
    index = faiss.read_index(str(ann))
    invlists = faiss.extract_index_ivf(index).invlists
    for list_no in range(invlists.nlist):
        size = invlists.list_size(list_no)
        if size:
            faiss.rev_swig_ptr(invlists.get_ids(list_no), size)[:] += 1_000_000
    before = ann.stat().st_size
    faiss.write_index(index, str(ann))
    assert ann.stat().st_size == before  # damage of the kind a size check does not see
    result = cli("query", target, *QUERIES, "-f", "ids", "--effort", "1000")
    one_error_line(result, 1, str(ann), "corrupt", f"dsearch reindex {target}")
    assert cli("reindex", target).exit_code == 0
    assert cli("query", target, *QUERIES, "-f", "ids").exit_code == 0


@pytest.mark.parametrize("factory", ["hnsw", "PCA32,HNSW16,RFlat"])
def test_an_ef_past_the_index_size_searches_everything_instead_of_overflowing(cli, tmp_path, factory):
    """--ef 3000000000 (or --effort 1e30) overflowed FAISS's int ('unexpected OverflowError'), and --ef 2000000000
    took 16 GB and 41 s on an 18k-row index: efSearch is capped at the rows there are, as nprobe is at nlist."""
    import faiss

    target = tmp_path / "ann"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", factory, "-q").exit_code == 0
    everything = _hits(cli, target, "--ef", "200")
    for knob in (("--ef", "3000000000"), ("--ef", "99999999999999999999"), ("--effort", "1e30")):
        assert _hits(cli, target, *knob) == everything
    ann = OpenIndex(target).segments[0].ann
    params = ann._params(faiss, {"efSearch": 2_000_000_000}, 1.0, None)
    while not hasattr(params, "efSearch"):  # down through the refine stage and the transform (as Python objects)
        params = params.referenced_objects[0]
    assert params.efSearch == 200


def test_a_reindex_interrupted_right_after_the_manifest_swap_keeps_the_files_it_published(cli, tmp_path, monkeypatch):
    """A failed reindex removes the ANN files it wrote, but an interrupt that lands just after the new manifest
    was renamed into place (a Ctrl-C between the rename and the next line) must not remove the files that manifest
    now lists: the index would be published without its ANN file."""
    import dsearch.store

    target = tmp_path / "ann"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target, "--index-type", "ivf").exit_code == 0
    real_write = dsearch.store._write_file

    def write_then_interrupt(path, data, atomic=False):
        real_write(path, data, atomic=atomic)
        if path.name == "manifest.json":
            raise KeyboardInterrupt

    monkeypatch.setattr(dsearch.store, "_write_file", write_then_interrupt)
    interrupted = cli("reindex", target, "--index-type", "hnsw")
    monkeypatch.undo()
    assert interrupted.exit_code == 3, interrupted.stderr
    manifest = read_manifest(target)
    assert manifest.index_type == "hnsw"  # the swap happened
    assert set(_seg_files(target)) >= set(manifest.segments[0].files)  # every listed file is there
    assert OpenIndex(target, verify=True).manifest.index_type == "hnsw"
    assert _hits(cli, target)
    # The old ANN file is left, unlisted, as a killed reindex leaves it: status names it, the next run collects it.
    status = cli("status", target)
    assert status.exit_code == 6 and status.stdout.startswith("incomplete: "), status.stdout
    assert cli("reindex", target).exit_code == 0
    assert cli("status", target).exit_code == 0


def test_a_factory_string_faiss_cannot_parse_is_refused_before_encoding(tmp_path, capsys):
    encoders: list[HashingEncoder] = []
    cli = Runner(capsys, lambda name, **kw: encoders.append(HashingEncoder(name)) or encoders[-1])
    result = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "x", "--index-type", "IVF4,PQ7")  # 64 % 7
    one_error_line(result, 2, "IVF4,PQ7")
    assert "kept" not in result.stderr
    assert [e.encoded_documents for e in encoders] == [0]  # the model loaded (for its dimension), nothing encoded
