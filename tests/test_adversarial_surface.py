"""Adversarial tests of the parts attacked least before: --where, hybrid/lexical search, the Python API, serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import HashingEncoder
from test_cli import one_error_line
from test_hybrid import TYPED, write_jsonl

import dsearch


@pytest.fixture
def typed_index(tmp_path, cli) -> Path:
    corpus = write_jsonl(tmp_path / "typed.jsonl", TYPED)
    assert cli("index", corpus, "-o", tmp_path / "typed.idx").exit_code == 0
    return tmp_path / "typed.idx"


# --- --where: a condition, nothing more ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    [
        # Closing the WHERE's parenthesis and adding rows of its own: a row number past the index crashed
        # (IndexError), one inside it was silently added to the matches.
        "false) UNION ALL SELECT 100000 FROM range(1) WHERE (true",
        "false) UNION ALL SELECT 0 FROM range(1) WHERE (true",
        # Clauses after the WHERE: LIMIT/OFFSET, GROUP BY/HAVING changed which rows matched.
        "true) LIMIT 1 OFFSET (0",
        "true) GROUP BY __row HAVING (count(*) > 0",
        # Subqueries run a query of their own: over table functions, DuckDB's catalog, or a huge range.
        "id IN (SELECT 'p1')",
        "id IN (FROM (VALUES ('p1')))",
        "EXISTS (SELECT 1 FROM duckdb_settings())",
        "(SELECT count(*) FROM range(10)) > 0",
        "year > (SELECT 1)",
    ],
)
@pytest.mark.parametrize("mode", ["dense", "lexical"])
def test_where_that_is_not_one_condition_is_refused(typed_index, cli, where, mode):
    result = cli("query", typed_index, "volcano", "--where", where, "--mode", mode, "-f", "ids")
    one_error_line(result, 2, "--where", "one condition")


def test_where_subquery_refused_through_the_api(typed_index):
    import dsearch

    with dsearch.Searcher(typed_index) as searcher, pytest.raises(dsearch.UsageError, match="one condition"):
        searcher.search("volcano", where="false) UNION ALL SELECT 0 FROM range(1) WHERE (true", mode="lexical")


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        # What DuckDB's path takes that looks like the refused forms but is one condition on the fields.
        ("len(list_filter(tags, lambda t: t LIKE 'g%')) > 0", {"p1", "p4"}),
        ("[t FOR t IN tags IF t = 'bio'] = ['bio']", {"p2"}),
        ("extract(year FROM day) = 2021", {"p3"}),
        ("lang = 'select' OR year = 2019 -- a comment\n", {"p1"}),
        ("(year) IN ((2019), (2020))", {"p1", "p2"}),
        ("CASE WHEN ok THEN year ELSE 0 END > 2020", {"p3"}),
    ],
)
def test_where_conditions_duckdb_answers_still_work(typed_index, cli, where, expected):
    result = cli("query", typed_index, "volcano", "--where", where, "-k", "10", "-f", "ids", "--mode", "lexical")
    assert (result.exit_code, result.stderr) == (0, "")
    assert set(result.stdout.split()) == expected


def _nested(depth: int) -> str:
    return "(" * depth + "year > 2020" + ")" * depth


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        # A program's filter: thousands of terms in one chain. Each term was one level of recursion on the fast
        # path (RecursionError: 'unexpected ... report it', exit 1).
        (" OR ".join(f"year = {year}" for year in range(3000)), {"p1", "p2", "p3", "p4"}),
        (" OR ".join(f"id = 'p{i}'" for i in range(2, 3000)), {"p2", "p3", "p4"}),
        (" AND ".join(f"year != {year}" for year in range(2020, 5000)), {"p1"}),
        ("NOT " * 3001 + "ok", {"p2", "p4"}),
        ("NOT " * 3000 + "ok", {"p1", "p3"}),
        # Parentheses a few hundred deep: the fast path's own recursion failed at about 250.
        (_nested(300), {"p3", "p4"}),
        (_nested(900), {"p3", "p4"}),
    ],
)
@pytest.mark.parametrize("mode", ["dense", "lexical"])
def test_long_and_deep_where(typed_index, cli, where, expected, mode):
    result = cli("query", typed_index, "volcano", "--where", where, "-k", "10", "-f", "ids", "--mode", mode)
    assert (result.exit_code, result.stderr) == (0, "")
    assert set(result.stdout.split()) == expected


def test_where_nested_past_duckdbs_limit_is_a_usage_error(typed_index, cli):
    result = cli("query", typed_index, "volcano", "--where", _nested(3000))
    one_error_line(result, 2, "nested too deeply", "fewer parentheses")
    assert "SET max_expression_depth" not in result.stderr


def test_long_chains_stay_on_the_fast_path_and_agree_with_duckdb(typed_index):
    """The chains above are answered without DuckDB, with DuckDB's rows (the nesting past 50 goes to DuckDB)."""
    from dsearch.filters import duckdb_allowed_rows, fast_allowed_rows
    from dsearch.store import OpenIndex

    index = OpenIndex(typed_index)
    types = index.manifest.corpus["field_types"]
    for where in (
        " OR ".join(f"year = {year}" for year in range(2020, 3000)),
        " AND ".join(f"year != {year}" for year in range(2020, 3000)),
        "NOT " * 301 + "(ok OR lang IS NULL)",
        _nested(40),
    ):
        fast = fast_allowed_rows(index, where, types)
        assert fast is not None, where[:40]
        assert fast.tolist() == duckdb_allowed_rows(index, where, types).tolist()
    assert fast_allowed_rows(index, _nested(60), types) is None


# --- --where that is not UTF-8 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    [
        b"lang = '\xff'",  # the fast path: it matched nothing, exit 0
        b"lang = '\xff' OR year(day) = 2020",  # DuckDB's path: 'unexpected TypeError ... report it', exit 1
    ],
)
def test_where_with_bytes_that_are_not_utf8_is_a_usage_error(typed_index, tmp_path, where):
    """As a query argument that is not UTF-8 is an error, so is a condition (the shell passes bytes; Python
    holds the bad ones as lone surrogates)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
           "DSEARCH_TEST_ENCODER": "fakes:hashing_encoder"}  # fmt: skip
    for mode in (b"dense", b"lexical"):
        done = subprocess.run(
            [sys.executable.encode(), b"-m", b"dsearch", b"query", os.fsencode(typed_index), b"volcano",
             b"--mode", mode, b"--where", where],
            capture_output=True, env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stdout == b""
        lines = done.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dsearch: error: --where ") and "UTF-8" in lines[0], lines


def test_where_with_a_lone_surrogate_is_a_usage_error_in_the_api(typed_index):
    import dsearch

    with dsearch.Searcher(typed_index) as searcher:
        for where in ("lang = '\ud800'", "lang = '\udcff' OR year(day) = 2020"):
            with pytest.raises(dsearch.UsageError, match="UTF-8"):
                searcher.search("volcano", where=where, mode="lexical")


# --- serve: what a client can send ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def typed_server(tmp_path_factory):
    from conftest import Runner
    from test_serve import serving

    class _Capsys:  # Runner only reads what it captured; a module-scoped fixture has no capsys
        def readouterr(self):
            return "", ""

    target = tmp_path_factory.mktemp("typed") / "typed.idx"
    corpus = write_jsonl(target.parent / "typed.jsonl", TYPED)
    assert Runner(_Capsys())("index", corpus, "-o", target, "-q").exit_code == 0
    with serving(target) as served:
        yield served


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        # Integers past a double's range: math.isfinite raised OverflowError (500).
        (b'{"query": "volcano", "k": 1' + b"0" * 400 + b"}", "k=1000"),
        (b'{"query": "volcano", "alpha": 1' + b"0" * 400 + b"}", "'alpha'"),
        (b'{"query": "volcano", "min_score": -1' + b"0" * 400 + b"}", "'min_score'"),
        # A number of more digits than Python converts (ValueError, not JSONDecodeError: 500).
        (b'{"query": "volcano", "k": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        # Arrays nested 100,000 deep inside the size limit (RecursionError: 500).
        (b'{"query": "volcano", "k": ' + b"[" * 100000 + b"]" * 100000 + b"}", "not valid JSON"),
        # A lone surrogate (JSON's \ud800) where text is passed on: the qid, the condition (500).
        (b'{"queries": [{"qid": "\\ud800", "text": "volcano"}]}', "queries[0].qid"),
        (b'{"query": "volcano", "where": "lang = \'\\ud800\'"}', "UTF-8"),
        (b'{"query": "volcano", "where": "lang = \'\\udcff\' OR year(day) = 2020"}', "UTF-8"),
    ],
)
def test_serve_answers_odd_json_with_a_400(typed_server, body, fragment):
    status, _, answer = typed_server.request("/search", raw=body, method="POST")
    assert status == 400, answer
    assert set(answer) == {"error"} and fragment in answer["error"] and "\n" not in answer["error"]
    assert "Traceback" not in typed_server.stderr and "unexpected" not in typed_server.stderr
    status, _, answer = typed_server.request("/search", {"query": "volcano", "k": 2})
    assert status == 200 and len(answer["results"][0]["hits"]) == 2  # and the server goes on


# --- the Python API: wrong argument types are UsageErrors, not AttributeError/TypeError from deep inside ----------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.search("volcano", where=123), "where must be a text"),
        (lambda s: s.search("volcano", where=b"year > 2020"), "where must be a text"),
        (lambda s: s.search("volcano", where={"year": 2020}), "where must be a text"),  # TypeError: unhashable
        (lambda s: s.search("volcano", alpha="0.5"), "alpha must be a number"),
        (lambda s: s.like(1), "passage id must be a text"),
        (lambda s: s.like(None), "passage id must be a text"),
        (lambda s: s.search("volcano", vectors="abc"), "vectors"),
        # Query objects skipped the checks texts get: None/int text was an AttributeError in the stemmer or the
        # encoder, and an empty text was searched (texts: 'query 1 is empty').
        (lambda s: s.search([_query("q1", None)], mode="lexical"), "query 1 is a NoneType, not a text"),
        (lambda s: s.search([_query("q1", 5)]), "query 1 is a int, not a text"),
        (lambda s: s.search([_query("q1", "volcano"), _query("q2", "  ")]), "query 2 is empty"),
        (lambda s: list(s.iter_search([_query("q1", "")], mode="lexical")), "query 1 is empty"),
        (lambda s: s.search([_query(7, "volcano")]), "qid"),
    ],
)
def test_api_wrong_argument_types_are_usage_errors(typed_index, call, message):
    from fakes import HashingEncoder

    import dsearch

    with dsearch.Searcher(typed_index, encoder=HashingEncoder()) as searcher:
        with pytest.raises(dsearch.UsageError) as raised:
            call(searcher)
        assert message in str(raised.value) and "\n" not in str(raised.value)
        assert searcher.search("volcano", k=1, where="year > 2020")[0]  # and it goes on answering


def _query(qid, text):
    import dsearch

    return dsearch.Query(qid, text)


def test_encode_queries_takes_one_text_as_search_does(typed_index):
    """encode_queries("text") encoded each character as a query (a str is a sequence of texts of one letter)."""
    from fakes import HashingEncoder

    import dsearch

    with dsearch.Searcher(typed_index, encoder=HashingEncoder()) as searcher:
        one = searcher.encode_queries("alpha volcano")
        assert one.shape == (1, searcher.info()["dim"])
        assert (one == searcher.encode_queries(["alpha volcano"])).all()
        by_vector = searcher.search("alpha volcano", k=2, vectors=one)
        assert [h.to_dict() for h in by_vector[0]] == [h.to_dict() for h in searcher.search("alpha volcano", k=2)[0]]


def test_serve_a_client_gone_mid_body_is_no_internal_error(typed_server):
    """A client that hangs up while sending its body (a timeout, a killed curl) was logged as 'unexpected
    ClientDisconnect ... report it' with a traceback: nothing is wrong with the server, and it goes on."""
    import socket
    import time
    import urllib.parse

    parts = urllib.parse.urlsplit(typed_server.url)
    before = len(typed_server.lines)
    for _ in range(3):
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(b'POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"query": "volc')
    status, _, answer = typed_server.request("/search", {"query": "volcano", "k": 2})
    assert status == 200 and len(answer["results"][0]["hits"]) == 2
    time.sleep(0.5)  # the disconnects are noticed as the server reads on
    logged = "".join(typed_server.lines[before:])
    assert "unexpected" not in logged and "Traceback" not in logged and "ERROR" not in logged, logged


# --- --where on approximate indexes: k hits whenever k passages match ---------------------------------------------

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


@pytest.fixture(scope="module")
def ann_indexes(tmp_path_factory):
    """3,000 passages of random words, each in one of 100 groups, as a flat index and as ivf and ivfpq."""
    import random

    from conftest import Runner

    class _Capsys:
        def readouterr(self):
            return "", ""

    run = Runner(_Capsys())
    base = tmp_path_factory.mktemp("ann")
    rng = random.Random(7)
    rows = [{"_id": f"p{i}", "text": " ".join(rng.choice(WORDS) for _ in range(8)), "grp": i % 100}
            for i in range(3000)]  # fmt: skip
    corpus = write_jsonl(base / "c.jsonl", rows)
    indexes = {}
    for kind in ("flat", "ivf", "ivfpq"):
        indexes[kind] = base / f"{kind}.idx"
        assert run("index", corpus, "-o", indexes[kind], "--index-type", kind, "-q").exit_code == 0
    return indexes


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_where_on_an_ann_index_returns_k_hits_when_k_match(ann_indexes, cli, kind, mode):
    """30 passages match; -k 50 must give all 30, as the exact index does. IVF probing one list missed those in
    the others, and ivfpq's 4-bit fast scan drops candidates that score 0 or less even probing every list: 20."""
    def ids(index, *extra):
        result = cli("query", index, "alpha beta", "--where", "grp = 7", "-k", "50", "-f", "ids", "--mode", mode,
                     *extra)  # fmt: skip
        assert (result.exit_code, result.stderr) == (0, "")
        return result.stdout.split()

    exact = ids(ann_indexes["flat"])
    assert len(exact) == 30
    assert sorted(ids(ann_indexes[kind])) == sorted(exact)
    assert sorted(ids(ann_indexes[kind], "--nprobe", "1")) == sorted(exact)
    # k below the matches: the exact top k (its scores are exact: ivfpq re-ranks, ivf's are FAISS's own)
    few = cli("query", ann_indexes[kind], "alpha beta", "--where", "grp < 20", "-k", "5", "-f", "ids", "--mode", mode)
    top = cli("query", ann_indexes["flat"], "alpha beta", "--where", "grp < 20", "-k", "5", "-f", "ids", "--mode", mode)
    assert few.exit_code == 0 and len(few.stdout.split()) == 5
    assert len(top.stdout.split()) == 5


# --- lexical: a long query of repeated words ---------------------------------------------------------------------


def test_a_repeated_query_word_costs_no_memory_per_repeat(ann_indexes):
    """Each repeat of a word concatenated its whole posting list again: 'alpha ' * 150,000 (900 KB, under the
    server's --max-body) took 7 GB on 3,000 passages. Repeats still count (as bm25s counts them), by weight."""
    import tracemalloc

    import numpy as np

    from dsearch.hybrid import Lexical
    from dsearch.store import OpenIndex

    lex = Lexical(OpenIndex(ann_indexes["flat"]))
    once, beta = lex.scores("alpha"), lex.scores("beta")
    assert (once > 0).sum() > 500  # a word in hundreds of passages
    tracemalloc.start()
    try:
        repeated = lex.scores("alpha " * 20000 + "beta beta")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB"
    expected = (once.astype(np.float64) * 20000 + beta.astype(np.float64) * 2).astype(np.float32)
    np.testing.assert_allclose(repeated, expected, rtol=1e-6)
    assert (lex.scores("alpha alpha beta") == (once.astype(np.float64) * 2 + beta).astype(np.float32)).all()


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("bm25-rows.npy", lambda a: a.__setitem__(-1, 10**9)),  # was 'unexpected IndexError: 1000000000'
        ("bm25-rows.npy", lambda a: a.__setitem__(-1, a[-2])),  # two passages on one row: a hit printed twice
        ("bm25-indices.npy", lambda a: a.__setitem__(slice(None), 10**6)),  # 'unexpected IndexError'
    ],
)
@pytest.mark.parametrize("mode", ["lexical", "hybrid"])
def test_damaged_lexical_arrays_are_one_line_naming_status(typed_index, cli, name, damage, mode):
    """Damage that keeps a BM25 array's size is found by status's checksums, not by a query's size checks; the
    query must still fail with the index's error (exit 1), not a crash or a passage printed twice."""
    import numpy as np

    path = next(typed_index.glob(f"seg-*/{name}"))
    array = np.load(path)
    damage(array)
    size = path.stat().st_size
    np.save(path, array)
    assert path.stat().st_size == size
    one_error_line(cli("query", typed_index, "volcano alpha", "--mode", mode), 1, "lexical index is corrupt",
                   f"dsearch status {typed_index}")  # fmt: skip
    assert cli("status", typed_index).exit_code == 6
    assert cli("query", typed_index, "volcano", "-f", "ids").exit_code == 0  # dense needs no BM25


# --- the API: a Searcher whose version was replaced -------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"where": "kind = 'a'"},  # fast path: 'cannot read the stored fields (...); rebuild the index'
        {"where": "kind || '' = 'a'"},  # DuckDB's path: duckdb.IOException escaped, no DsearchError at all
        {"mode": "lexical"},  # 'cannot read the lexical index (...); rebuild the index': nothing to rebuild
        {"mode": "hybrid", "where": "kind = 'a'"},
    ],
)
def test_searcher_whose_version_was_replaced_says_to_open_a_new_one(tmp_path, options):
    """A Searcher keeps answering from the version it opened; what needs files it had not opened yet after a new
    publish removed them is an IndexDirError that says a new version replaced it, not a raw DuckDB error or
    advice to rebuild an index that is fine."""
    encoder = HashingEncoder()
    rows = [{"_id": f"p{i}", "text": f"volcano number {i}", "kind": "ab"[i % 2]} for i in range(10)]
    target = tmp_path / "idx"
    dsearch.build_index(target, rows, encoder=encoder)
    with dsearch.Searcher(target, encoder=encoder) as old:
        assert old.search("volcano", k=2)[0]
        dsearch.build_index(target, [{**r, "_id": "n" + r["_id"]} for r in rows], encoder=encoder,
                            max_remove="100%")  # fmt: skip
        now = dsearch.index_version(target)
        assert now != old.version
        with pytest.raises(dsearch.IndexDirError) as raised:
            old.search("volcano", k=2, **options)
        message = str(raised.value)
        assert "open a new Searcher" in message and now in message and "\n" not in message, message
        assert old.search("volcano", k=1)[0][0].id.startswith("p")  # its own version still answers dense
    with dsearch.Searcher(target, encoder=encoder) as new:
        assert all(h.id.startswith("n") for h in new.search("volcano", k=3, **options)[0])


def test_a_field_named_by_the_empty_string_breaks_no_other_condition(tmp_path, cli):
    """JSON allows the key "": its column in DuckDB's view was a zero-length identifier, a parse error for every
    condition DuckDB evaluates on that index ('unexpected ParserException'). It gets a private name in the view,
    read with the JSON Pointer '/' ($."" is a path error), so '"" = 1' reaches it too."""
    rows = [{"_id": "a", "text": "alpha one", "": 1, "n": 5, "ünï": 6},
            {"_id": "b", "text": "beta two", "": 2, "n": 6, "ünï": 7}]  # fmt: skip
    target = tmp_path / "idx"
    assert cli("index", write_jsonl(tmp_path / "c.jsonl", rows), "-o", target).exit_code == 0
    for where, expected in (("n + 0 = 5", "a"), ("ünï = 7", "b"), ("n = 6", "b"), ('"ünï" + 1 = 7', "a")):
        result = cli("query", target, "alpha", "--where", where, "-f", "ids")
        assert (result.exit_code, result.stdout, result.stderr) == (0, expected + "\n", ""), where
    for where, expected in (('"" = 2', "b"), ('"" + 0 = 1 AND n = 5', "a")):
        result = cli("query", target, "alpha", "--where", where, "-f", "ids")
        assert (result.exit_code, result.stdout, result.stderr) == (0, expected + "\n", ""), where


def test_field_names_with_control_characters_read_alike_on_both_paths(typed_index):
    """DuckDB's path looked such fields up with $."nul\\u0000x", which finds no key (DuckDB reads no \\u escapes
    in a path): always NULL there, so a condition DuckDB evaluates matched nothing; the fast path read them."""
    rows = [{"_id": "a", "text": "alpha", "nul\x00x": 3, "tab\tx": "t", "a/b~c": 1},
            {"_id": "b", "text": "beta", "nul\x00x": 4, "tab\tx": "u", "a/b~c": 2}]  # fmt: skip
    target = typed_index.parent / "ctrl.idx"
    encoder = HashingEncoder()
    dsearch.build_index(target, rows, encoder=encoder)
    with dsearch.Searcher(target, encoder=encoder) as searcher:
        for where, expected in (
            ('"nul\x00x" = 4', ["b"]),  # fast path
            ('"nul\x00x" + 0 = 3', ["a"]),  # DuckDB
            ('"tab\tx" = \'t\'', ["a"]),
            ('"tab\tx" || \'\' = \'u\'', ["b"]),
            ('"a/b~c" + 0 = 2', ["b"]),
        ):
            assert [h.id for h in searcher.search("alpha", where=where, k=5)[0]] == expected, where


@pytest.mark.parametrize("batch_size", [0, -3, "2", 1.5, True])
def test_build_index_refuses_a_batch_size_that_is_no_positive_whole_number(tmp_path, batch_size):
    """batch_size=0 published an index of no passages from two (published=True, indexed=0): a new index of
    nothing is an error, and the CLI's --batch-size 0 is refused. "2" was a ValueError from islice."""
    target = tmp_path / "idx"
    with pytest.raises(dsearch.UsageError, match="batch_size must be a whole number of at least 1"):
        dsearch.build_index(target, [{"_id": "a", "text": "x"}, {"_id": "b", "text": "y"}], encoder=HashingEncoder(),
                            batch_size=batch_size)  # fmt: skip
    assert not target.exists()
    with pytest.raises(dsearch.UsageError, match="batch_size must be a whole number of at least 1"):
        dsearch.Searcher(tmp_path, batch_size=batch_size)


def test_an_explicit_null_is_null_in_a_json_field_too(tmp_path, cli):
    """A field whose values mix types is JSON; its explicit nulls were the JSON value null, not SQL's NULL, so
    'IS NULL' missed them (and 'IS NOT NULL' kept them), where a field of one type treats null as NULL."""
    rows = [{"_id": "a", "text": "alpha", "mixed": None, "plain": None},
            {"_id": "b", "text": "alpha", "mixed": 1.5, "plain": "x"},
            {"_id": "c", "text": "alpha", "mixed": "str", "plain": "y"},
            {"_id": "d", "text": "alpha"},
            {"_id": "e", "text": "alpha", "mixed": "null", "plain": "null"}]  # fmt: skip
    target = tmp_path / "idx"
    assert cli("index", write_jsonl(tmp_path / "c.jsonl", rows), "-o", target).exit_code == 0
    assert json.loads(cli("info", target, "--json").stdout)["fields"] == {"mixed": "JSON", "plain": "VARCHAR"}

    def ids(where: str) -> set[str]:
        result = cli("query", target, "alpha", "--where", where, "-k", "10", "-f", "ids")
        assert (result.exit_code, result.stderr) == (0, ""), where
        return set(result.stdout.split())

    assert ids("plain IS NULL") == {"a", "d"}
    assert ids("mixed IS NULL") == {"a", "d"}
    assert ids("mixed IS NOT NULL") == {"b", "c", "e"}
    assert ids("mixed->>'$' = 'null'") == {"e"}  # the string "null" is no null
