"""Issue 12: the lexical (BM25) index, --mode dense|lexical|hybrid with RRF or weighted fusion, --where filters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE, Runner
from fakes import HashingEncoder
from test_cli import one_error_line

from dsearch.fusion import rrf, weighted
from dsearch.hybrid import Lexical, lexical_ranking
from dsearch.lexical import LEXICAL_FILES
from dsearch.store import OpenIndex


def jsonl(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- fusion, by hand ------------------------------------------------------------------------------------


def test_rrf_matches_a_hand_computed_fusion():
    fused = rrf({"dense": ["a", "b", "c"], "lexical": ["c", "a", "d"]})
    expected = {"a": 1 / 61 + 1 / 62, "c": 1 / 63 + 1 / 61, "b": 1 / 62, "d": 1 / 63}
    assert [key for key, _ in fused] == ["a", "c", "b", "d"]
    assert dict(fused) == pytest.approx(expected, abs=1e-12)


def test_rrf_breaks_ties_by_key():
    assert [key for key, _ in rrf({"dense": ["b"], "lexical": ["a"]})] == ["a", "b"]


def test_weighted_fusion_matches_a_hand_computed_one():
    # dense min 0.2, max 0.8; lexical min 1, max 5.
    fused = weighted(
        {"dense": [("a", 0.8), ("b", 0.5), ("c", 0.2)], "lexical": [("c", 5.0), ("d", 3.0), ("a", 1.0)]},
        {"dense": 0.3, "lexical": 0.7},
    )
    expected = {"a": 0.3 * 1 + 0.7 * 0, "b": 0.3 * 0.5, "c": 0.3 * 0 + 0.7 * 1, "d": 0.7 * 0.5}
    assert dict(fused) == pytest.approx(expected)
    assert [key for key, _ in fused] == ["c", "d", "a", "b"]


# --- the lexical index -----------------------------------------------------------------------------------


def test_lexical_scores_equal_bm25s_own(sample_index):
    """Our numpy query side gives bm25s's scores: same tokenizer, stemmer, stopwords and precomputed matrix."""
    import bm25s
    import Stemmer

    rows = [json.loads(line) for line in (SAMPLE / "passages.jsonl").read_text().splitlines()]
    stemmer = Stemmer.Stemmer("english")
    corpus = [f"{r['title']} {r['text']}" for r in rows]
    reference = bm25s.BM25()
    reference.index(bm25s.tokenize(corpus, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    opened = OpenIndex(sample_index)
    lex = Lexical(opened)
    ids = [r["id"] for r in opened.iter_rows(("id",))]
    for text in ("what causes the northern lights", "bread yeast dough rising", "Venus sulfuric acid clouds"):
        ours = lexical_ranking(lex, text, len(rows))
        tokens = bm25s.tokenize([text], stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
        docs, scores = reference.retrieve(tokens, k=len(rows), show_progress=False)
        theirs = [(rows[d]["_id"], float(s)) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]
        assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], rel=1e-5)
        # Ties may be ordered differently (we break them by row): compare each score's set of passages.
        ours_by_score = {(round(s, 4), ids[int(lex.starts[d])]) for d, s in ours}
        assert ours_by_score == {(round(s, 4), i) for i, s in theirs}


def test_lexical_files_are_in_the_manifest_with_checksums(sample_index, cli):
    manifest = json.loads((sample_index / "manifest.json").read_text())
    files = manifest["segments"][0]["files"]
    assert set(LEXICAL_FILES) <= set(files)
    assert manifest["corpus"]["lexical"] is True
    assert cli("info", "--verify", sample_index).exit_code == 0
    assert cli("status", sample_index).exit_code == 0
    # A damaged BM25 file is caught like any other.
    path = sample_index / manifest["segments"][0]["path"] / "bm25-data.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cli("status", sample_index).exit_code == 6
    one_error_line(cli("info", "--verify", sample_index), 1, "bm25-data.npy")


# --- modes on sample_corpus, known answers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "query", "expected"),
    [
        # Known answers for the hashing test encoder (a bag of hashed words) and BM25 on sample_corpus.
        ("lexical", "sulfuric acid clouds", "astronomy-03"),  # Venus: the only passage with all three words
        ("hybrid", "sulfuric acid clouds", "astronomy-03"),
        ("dense", "tallest volcano Olympus Mons", "astronomy-04"),  # Mars
        ("lexical", "olympus mons volcano mars", "astronomy-04"),
        ("hybrid", "olympus mons volcano mars", "astronomy-04"),
        ("lexical", "how long is a marathon race", "sports-01"),
        ("hybrid", "marathon", "sports-01"),  # the only passage with the word: first although dense ranks it low
    ],
)
def test_each_mode_finds_the_known_answer(sample_index, cli, mode, query, expected):
    result = cli("query", sample_index, query, "--mode", mode, "-k", "3", "-f", "jsonl")
    assert result.exit_code == 0 and result.stderr == ""
    hits = jsonl(result)
    assert len(hits) == 3 and hits[0]["id"] == expected
    for hit in hits:
        if mode == "dense":
            assert "retrievers" not in hit
        elif mode == "lexical":
            assert hit["retrievers"] == {"lexical": hit["rank"]} and hit["window"] is None
        else:
            assert set(hit["retrievers"]) == {"dense", "lexical"}


def test_lexical_mode_ranks_passages_holding_the_words(sample_index, cli):
    hits = jsonl(cli("query", sample_index, "sourdough bread yeast", "--mode", "lexical", "-k", "50"))
    assert hits and all(
        any(word in (h["title"] + " " + h["text"]).lower() for word in ("sourdough", "bread", "yeast")) for h in hits
    )
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_hybrid_is_the_rrf_of_the_two_modes_own_rankings(sample_index, cli):
    """Hybrid's order and scores equal an RRF computed by hand from --mode dense and --mode lexical."""
    for query in ("what causes the northern lights", "bread yeast", "volcano eruption lava"):
        dense = [h["id"] for h in jsonl(cli("query", sample_index, query, "--mode", "dense", "-k", "200"))]
        lexical = [h["id"] for h in jsonl(cli("query", sample_index, query, "--mode", "lexical", "-k", "200"))]
        hand: dict[str, float] = {}
        for ranking in (dense, lexical):
            for rank, pid in enumerate(ranking, 1):
                hand[pid] = hand.get(pid, 0.0) + 1 / (60 + rank)
        hits = jsonl(cli("query", sample_index, query, "--mode", "hybrid", "-k", "10"))
        assert len(hits) == 10
        for hit in hits:
            assert hit["score"] == pytest.approx(hand[hit["id"]], abs=1e-6)
            ranks = hit["retrievers"]
            assert ranks["dense"] == (dense.index(hit["id"]) + 1 if hit["id"] in dense else None)
            assert ranks["lexical"] == (lexical.index(hit["id"]) + 1 if hit["id"] in lexical else None)
        best = sorted(hand.items(), key=lambda item: (-item[1], item[0]))[:10]
        assert [round(s, 6) for _, s in best] == [h["score"] for h in hits]


def test_alpha_fuses_normalised_scores(sample_index, cli):
    """--alpha W: W x min-max-normalised dense + (1 - W) x normalised BM25, computed here by hand."""
    query = "the sun and the planets of the solar system"
    dense = jsonl(cli("query", sample_index, query, "--mode", "dense", "-k", "200"))
    lexical = jsonl(cli("query", sample_index, query, "--mode", "lexical", "-k", "200"))
    assert len(lexical) > 10
    hand: dict[str, float] = {}
    for weight, hits in ((0.3, dense), (0.7, lexical)):
        low, high = min(h["score"] for h in hits), max(h["score"] for h in hits)
        for h in hits:
            hand[h["id"]] = hand.get(h["id"], 0.0) + weight * (h["score"] - low) / (high - low)
    fused = jsonl(cli("query", sample_index, query, "--alpha", "0.3", "-k", "10"))
    best = sorted(hand.items(), key=lambda item: -item[1])[:10]
    assert [h["score"] for h in fused] == pytest.approx([s for _, s in best], abs=2e-5)
    assert [h["id"] for h in fused][:3] == [i for i, _ in best][:3]
    only_dense = jsonl(cli("query", sample_index, query, "--alpha", "1", "-k", "5"))
    assert [h["id"] for h in only_dense] == [h["id"] for h in dense[:5]]  # all the weight on the dense side
    assert only_dense[0]["score"] == pytest.approx(1.0)


def test_default_mode_is_dense_and_alpha_alone_means_hybrid(sample_index, cli):
    query = ("query", sample_index, "the sun and the planets", "-k", "5", "-f", "jsonl")
    assert cli(*query).stdout == cli(*query, "--mode", "dense").stdout
    assert "retrievers" not in jsonl(cli(*query))[0]
    assert cli(*query, "--alpha", "0.5").stdout == cli(*query, "--mode", "hybrid", "--alpha", "0.5").stdout


def test_tsv_has_a_rank_column_per_retriever(sample_index, cli):
    out = cli("query", sample_index, "bread yeast", "--mode", "hybrid", "-k", "3", "-f", "tsv").stdout.splitlines()
    assert out[0].split("\t") == ["qid", "query", "rank", "score", "id", "title", "text", "dense_rank", "lexical_rank"]
    assert all(len(line.split("\t")) == 9 for line in out[1:])
    dense = cli("query", sample_index, "bread yeast", "--mode", "dense", "-k", "3", "-f", "tsv").stdout.splitlines()
    assert dense[0].split("\t") == ["qid", "query", "rank", "score", "id", "title", "text"]


def test_split_passages_are_one_lexical_document(tmp_path, cli):
    long_text = " ".join(f"sentence {i} about glaciers and ice." for i in range(60)) + " The word zephyrine ends it."
    corpus = write_jsonl(
        tmp_path / "c.jsonl",
        [{"_id": "long", "text": long_text}, {"_id": "short", "text": "Glaciers are rivers of ice."}],
    )
    assert cli("index", corpus, "-o", tmp_path / "idx").exit_code == 0
    opened = OpenIndex(tmp_path / "idx")
    assert opened.rows > 2  # the long passage was split into windows
    hits = jsonl(cli("query", tmp_path / "idx", "zephyrine", "--mode", "lexical"))
    assert [h["id"] for h in hits] == ["long"] and hits[0]["window"] is None
    hybrid = jsonl(cli("query", tmp_path / "idx", "glaciers ice zephyrine", "--mode", "hybrid", "-k", "5"))
    assert sorted(h["id"] for h in hybrid) == ["long", "short"]  # each passage once


def test_no_lexical_index(tmp_path, cli):
    target = tmp_path / "idx"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target, "--no-lexical").exit_code == 0
    manifest = json.loads((target / "manifest.json").read_text())
    assert not set(LEXICAL_FILES) & set(manifest["segments"][0]["files"])
    result = cli("query", target, "bread", "--mode", "lexical")
    one_error_line(result, 1, "no lexical (BM25) index")
    default = cli("query", target, "bread", "-f", "jsonl", "-k", "2")
    assert default.exit_code == 0 and all("retrievers" not in h for h in jsonl(default))  # dense by default
    # --update keeps the index's choice; --lexical adds it.
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target, "--update").exit_code == 0
    assert not (json.loads((target / "manifest.json").read_text())["corpus"]["lexical"])
    assert cli("index", SAMPLE / "passages.jsonl", "-o", target, "--update", "--lexical").exit_code == 0
    assert cli("query", target, "bread", "--mode", "lexical", "-f", "ids").exit_code == 0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--mode", "sparse"), "unknown --mode 'sparse'; choose one of dense, lexical, hybrid"),
        (("--alpha", "1.5"), "--alpha 1.5 is not a weight between 0 and 1"),
        (("--mode", "lexical", "--alpha", "0.5"), "it does not go with --mode lexical"),
    ],
)
def test_bad_mode_options_are_usage_errors(sample_index, cli, args, fragment):
    one_error_line(cli("query", sample_index, "bread", *args), 2, fragment)


def test_eval_takes_mode(sample_index, cli, tmp_path):
    queries = tmp_path / "q.tsv"
    queries.write_text("q1\tsulfuric acid clouds\nq2\thow long is a marathon race\n")
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("q1\t0\tastronomy-03\t1\nq2\t0\tsports-01\t1\n")
    for mode in ("dense", "lexical", "hybrid"):
        result = cli("eval", sample_index, "--queries", queries, "--qrels", qrels, "--mode", mode, "--json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["metrics"]["R@100"] == 1.0


def test_dense_and_hybrid_queries_import_no_bm25s_or_duckdb(tmp_path):
    """A fresh process: index with the hashing encoder, then query in each mode and list what was imported."""
    target = tmp_path / "idx"
    code = f"""
import sys, io
sys.path.insert(0, {str(ROOT / 'tests')!r})
from fakes import HashingEncoder
from dsearch.cli import Deps, run
deps = Deps(load_encoder=lambda name, **kw: HashingEncoder(name), stdin=io.BytesIO(b""))
assert run(["index", {str(SAMPLE / 'passages.jsonl')!r}, "-o", {str(target)!r}, "-q"], deps=deps) == 0
for name in list(sys.modules):
    if name.startswith(("bm25s", "duckdb", "scipy")):
        del sys.modules[name]
for mode in ("dense", "hybrid", "lexical"):
    assert run(["query", {str(target)!r}, "bread", "--mode", mode, "-f", "ids", "-k", "1"], deps=deps) == 0
    print(mode, sorted({{n.split(".")[0] for n in sys.modules if n.startswith(("bm25s", "duckdb", "scipy"))}}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "dense []" in out and "hybrid []" in out and "lexical []" in out


# --- filters ---------------------------------------------------------------------------------------------

TYPED = [
    {"_id": "p1", "text": "alpha volcano", "year": 2019, "score": 0.5, "ok": True, "day": "2019-03-01",
     "tags": ["geo", "red"], "lang": "en", "meta": {"a": 1}},
    {"_id": "p2", "text": "beta volcano", "year": 2020, "score": 1.5, "ok": False, "day": "2020-07-15",
     "tags": ["bio"], "lang": "fr"},
    {"_id": "p3", "text": "gamma volcano", "year": 2021, "score": 2, "ok": True, "day": "2021-01-09",
     "tags": [], "lang": "en"},
    {"_id": "p4", "text": "delta volcano", "year": 2022, "score": -1.0, "ok": False, "day": "2022-12-31",
     "tags": ["geo"], "lang": None},
]


@pytest.fixture
def typed_index(tmp_path, cli) -> Path:
    corpus = write_jsonl(tmp_path / "typed.jsonl", TYPED)
    assert cli("index", corpus, "-o", tmp_path / "typed.idx").exit_code == 0
    return tmp_path / "typed.idx"


def test_info_lists_fields_and_types(typed_index, cli):
    data = json.loads(cli("info", typed_index, "--json").stdout)
    assert data["fields"] == {
        "day": "DATE",
        "lang": "VARCHAR",
        "meta": "JSON",
        "ok": "BOOLEAN",
        "score": "DOUBLE",
        "tags": "VARCHAR[]",
        "year": "BIGINT",
    }
    assert data["lexical"] is True
    table = cli("info", typed_index)
    assert "year BIGINT" in table.stdout and "day DATE" in table.stdout


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("year = 2020", {"p2"}),
        ("year != 2020", {"p1", "p3", "p4"}),
        ("year > 2020", {"p3", "p4"}),
        ("year >= 2021 AND year < 2022", {"p3"}),
        ("year <= 2019 OR year BETWEEN 2022 AND 2030", {"p1", "p4"}),
        ("score > 1", {"p2", "p3"}),
        ("score < 0", {"p4"}),
        ("ok", {"p1", "p3"}),
        ("NOT ok", {"p2", "p4"}),
        ("ok = false", {"p2", "p4"}),
        ("day >= DATE '2020-07-15'", {"p2", "p3", "p4"}),
        ("day < '2021-01-01'", {"p1", "p2"}),
        ("year(day) = 2021", {"p3"}),
        ("list_contains(tags, 'geo')", {"p1", "p4"}),
        ("len(tags) = 0", {"p3"}),
        ("lang = 'en'", {"p1", "p3"}),
        ("lang IN ('fr', 'de')", {"p2"}),
        ("lang IS NULL", {"p4"}),
        ("lang LIKE 'e%'", {"p1", "p3"}),
        ("meta.a = 1", {"p1"}),
        ("id IN ('p1', 'p4')", {"p1", "p4"}),
        ("id LIKE 'p%' AND source LIKE '%typed.jsonl'", {"p1", "p2", "p3", "p4"}),
        ("title IS NULL AND year = 2019", {"p1"}),
        ("year > 3000", set()),
        # NULL is neither equal nor unequal (p4 has no lang): SQL's three-valued logic, on every path.
        ("lang <> 'en'", {"p2"}),
        ("NOT (lang = 'en')", {"p2"}),
        ("lang NOT IN ('en')", {"p2"}),
        ("lang NOT LIKE 'e%'", {"p2"}),
        ("lang IS NOT NULL", {"p1", "p2", "p3"}),
        ("year NOT BETWEEN 2020 AND 2021", {"p1", "p4"}),
        ("score <= 0.5", {"p1", "p4"}),
        ("score >= 2 OR ok = false", {"p2", "p3", "p4"}),
        ("day BETWEEN '2020-01-01' AND '2021-12-31'", {"p2", "p3"}),
        ("day <> DATE '2019-03-01' AND NOT ok", {"p2", "p4"}),
        ("2020 < year AND (lang = 'en' OR lang IS NULL)", {"p3", "p4"}),
        ("id < 'p3' AND title IS NULL", {"p1", "p2"}),
    ],
)
@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_where_every_type_and_operator(typed_index, cli, where, expected, mode):
    result = cli("query", typed_index, "volcano", "--where", where, "--mode", mode, "-k", "10", "-f", "ids")
    assert result.exit_code == 0, result.stderr
    assert set(result.stdout.split()) == expected
    assert result.stderr == ""


def test_filter_applies_before_top_k(tmp_path, cli):
    """Fifty passages match the query far better than the five the filter keeps: k of those five come back."""
    rows = [{"_id": f"hot-{i}", "text": "volcano lava eruption magma " * 3, "kind": "hot"} for i in range(50)]
    rows += [{"_id": f"cold-{i}", "text": f"glacier number {i} near a volcano", "kind": "cold"} for i in range(5)]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    assert cli("index", corpus, "-o", tmp_path / "idx").exit_code == 0
    for mode in ("dense", "lexical", "hybrid"):
        plain = jsonl(cli("query", tmp_path / "idx", "volcano lava eruption", "--mode", mode, "-k", "3"))
        assert all(h["id"].startswith("hot-") for h in plain)  # the cold ones rank far below
        result = cli("query", tmp_path / "idx", "volcano lava eruption", "--mode", mode, "-k", "3",
                     "--where", "kind = 'cold'")
        hits = jsonl(result)
        assert len(hits) == 3 and all(h["id"].startswith("cold-") for h in hits), mode
        more = jsonl(cli("query", tmp_path / "idx", "volcano", "--mode", mode, "-k", "9", "--where", "kind = 'cold'"))
        assert sorted(h["id"] for h in more) == [f"cold-{i}" for i in range(5)]  # all there are


def test_where_with_like_and_eval(typed_index, cli, tmp_path):
    hits = jsonl(cli("query", typed_index, "--like", "p1", "--where", "lang = 'en'", "-k", "5"))
    assert [h["id"] for h in hits] == ["p3"]
    queries = tmp_path / "q.tsv"
    queries.write_text("q1\tvolcano\n")
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("q1\t0\tp2\t1\n")
    run = tmp_path / "run.trec"
    result = cli("eval", typed_index, "--queries", queries, "--qrels", qrels, "--where", "year >= 2021",
                 "--run", run, "--json")
    assert result.exit_code == 0
    assert {line.split()[2] for line in run.read_text().splitlines()} == {"p3", "p4"}
    assert json.loads(result.stdout)["metrics"]["R@100"] == 0.0


def test_filter_matching_nothing_is_no_hits_and_exit_0(typed_index, cli):
    result = cli("query", typed_index, "volcano", "--where", "year > 3000", "-f", "jsonl")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")
    verbose = cli("query", typed_index, "volcano", "--where", "year > 3000", "-f", "jsonl", "-v")
    assert verbose.exit_code == 0 and "--where matched no passage" in verbose.stderr


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        ("yeer > 2020", "--where: unknown field 'yeer'; the passages have id, title, source, day, lang"),
        ("year >", "--where 'year >': syntax error"),
        ("year > 2020; DROP TABLE passages", "syntax error"),
        ("(SELECT count(*) FROM read_text('/etc/hostname')) > 0", "--where"),
        ("lang > 3 +", "syntax error"),
    ],
)
def test_bad_where_is_a_one_line_usage_error(typed_index, cli, where, fragment):
    one_error_line(cli("query", typed_index, "volcano", "--where", where), 2, fragment)


def test_filter_follows_an_update(tmp_path, cli):
    """A passage whose field changes moves into and out of the filter's results with --update."""
    rows = [dict(r) for r in TYPED]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    target = tmp_path / "idx"
    assert cli("index", corpus, "-o", target).exit_code == 0

    def matching() -> set[str]:
        result = cli("query", target, "volcano", "--where", "year >= 2022", "-k", "10", "-f", "ids")
        assert result.exit_code == 0, result.stderr
        return set(result.stdout.split())

    assert matching() == {"p4"}
    rows[0]["year"] = 2023  # metadata only: the vector is reused, the field is new
    rows[3]["year"] = 2000
    write_jsonl(corpus, rows)
    result = cli("index", corpus, "-o", target, "--update", "--json")
    assert json.loads(result.stdout)["metadata_only"] == 2
    assert matching() == {"p1"}
    rows[0]["year"] = "unknown"  # now a string: the field's type becomes text
    write_jsonl(corpus, rows)
    assert cli("index", corpus, "-o", target, "--update").exit_code == 0
    assert json.loads(cli("info", target, "--json").stdout)["fields"]["year"] == "JSON"


def test_resumed_build_has_the_same_lexical_index(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DSEARCH_CHECKPOINT_SECONDS", "0")
    interrupted = Runner(capsys, lambda name, **kw: HashingEncoder(name, fail_after_batches=3))
    assert interrupted("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--batch-size", "4").exit_code == 3
    cli = Runner(capsys)
    resumed = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--batch-size", "4", "--json")
    assert json.loads(resumed.stdout)["resumed_at"] > 0
    assert cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "fresh").exit_code == 0
    for query in ("bread yeast", "northern lights", "volcano"):
        a = cli("query", tmp_path / "idx", query, "--mode", "hybrid", "-f", "jsonl").stdout
        b = cli("query", tmp_path / "fresh", query, "--mode", "hybrid", "-f", "jsonl").stdout
        assert a == b and a


def test_parquet_fields_keep_their_types(tmp_path, cli):
    """Dates, timestamps, numbers, booleans and lists from a Parquet corpus can be compared as such."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "text": ["volcano one", "volcano two", "volcano three"],
            "day": [dt.date(2020, 1, 5), dt.date(2021, 6, 1), None],
            "seen": [dt.datetime(2020, 1, 5, 10, 0), dt.datetime(2022, 2, 2, 8, 30), dt.datetime(2023, 3, 3)],
            "count": pa.array([3, 10, 7], pa.int32()),
            "ratio": [0.5, 1.5, 2.5],
            "flag": [True, False, True],
            "tags": [["x", "y"], [], ["y"]],
        }
    )
    pq.write_table(table, tmp_path / "c.parquet")
    assert cli("index", tmp_path / "c.parquet", "-o", tmp_path / "idx").exit_code == 0
    fields = json.loads(cli("info", tmp_path / "idx", "--json").stdout)["fields"]
    assert fields == {
        "count": "BIGINT",
        "day": "DATE",
        "flag": "BOOLEAN",
        "ratio": "DOUBLE",
        "seen": "TIMESTAMP",
        "tags": "VARCHAR[]",
    }
    for where, expected in (
        ("day < DATE '2021-01-01'", {"a"}),
        ("seen >= TIMESTAMP '2022-01-01 00:00:00'", {"b", "c"}),
        ("count > 5 AND flag", {"c"}),
        ("ratio BETWEEN 1 AND 2", {"b"}),
        ("list_contains(tags, 'y')", {"a", "c"}),
        ("day IS NULL", {"c"}),
    ):
        result = cli("query", tmp_path / "idx", "volcano", "--where", where, "-f", "ids")
        assert result.exit_code == 0, result.stderr
        assert set(result.stdout.split()) == expected, where


def test_an_index_from_before_field_types_gets_them_on_update(tmp_path, cli):
    import shutil

    golden = ROOT / "tests" / "golden"
    target = tmp_path / "old.idx"
    shutil.copytree(golden / "index-v1", target)
    one_error_line(cli("query", target, "volcano", "--where", "id = 'x'"), 2, "before dsearch recorded field types")
    result = cli("index", golden / "corpus.jsonl", "-o", target, "--update", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["published"] is True  # nothing changed but the field types were missing
    assert cli("query", target, "volcano", "--where", "id = 'x'", "-f", "ids").exit_code == 0
    assert cli("query", target, "volcano", "--mode", "lexical").exit_code == 1  # the old index's choice is kept
