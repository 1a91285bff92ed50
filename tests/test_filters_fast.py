"""Issue 12: --where's fast path (numpy over fields.parquet, no DuckDB) gives DuckDB's rows, or hands over to it.

The differential tests run thousands of conditions — every operator on every type, NULLs and missing fields,
literals that need coercion, generated combinations under AND/OR/NOT — through both evaluators on the same
index and require identical row sets, and that the fast path really answered the ones in its subset.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from test_cli import one_error_line

from dsearch.errors import UsageError
from dsearch.filters import FIELDS_FILE, DuckDBFilter, allowed_rows, duckdb_allowed_rows, fast_allowed_rows
from dsearch.store import OpenIndex

MISSING = object()
VALUES = {
    "year": [None, MISSING, 1999, 2020, 2021, -5, 0, 2**40, 9007199254740993],
    "score": [None, MISSING, 0.5, -1.25, 2, 3.0, 1e10, 0.1, -0.0],
    "ok": [None, MISSING, True, False],
    "day": [None, MISSING, "2020-01-01", "2021-06-15", "1999-12-31", "2020-02-29"],
    "lang": [None, MISSING, "en", "fr", "EN", "", "é", "a%b", "a_b", "it's", "zz", "en\nx", "日本"],
    "title": [None, "Alpha", "beta", "Éclair", "", "O'Neil", "alpha"],
    "tags": [None, MISSING, [], ["en"], ["en", "fr"], ["fr", None], [None], ["é", "en", "en"], ["EN"]],
    "nums": [None, MISSING, [], [1], [1, 2], [2, None], [None], [-5, 2**40]],
    "days": [MISSING, [], ["2020-01-01"], ["2021-06-15", None], ["2020-01-01", "1999-12-31"]],
}
LITERALS = {
    "year": ["2020", "2021", "-5", "0", "1999", "2020.5", "2021.0", "-4.5", "2.02e3", "1099511627776",
             "9007199254740993", "9007199254740992.0", "0.1", "NULL", "99999999999999999999", "1e400"],
    "score": ["0.5", "2", "3", "1e10", "10000000000", "0.1", "-1.25", "1.0", "0", "-0.0", "0.10", "NULL",
              "0.30000000000000004", "1", "-1e400", "123456789012345678.5"],
    "ok": ["TRUE", "FALSE", "NULL", "true"],
    "day": ["'2020-01-01'", "DATE '2021-06-15'", "'2020-02-29'", "'1999-12-31'", "'2020-01-02'", "NULL",
            "DATE '2000-01-01'"],
    "lang": ["'en'", "'EN'", "''", "'é'", "'a%b'", "'it''s'", "'zz'", "'e'", "'fr'", "'日本'", "NULL"],
    "title": ["'Alpha'", "'alpha'", "''", "'Éclair'", "'O''Neil'", "NULL", "'B'"],
    "id": ["'d001'", "'d040'", "'d079'", "'x'", "'D001'"],
    "source": ["'x'", "''"],
}  # fmt: skip
PATTERNS = ["'e%'", "'%n'", "'_'", "'__'", "'%'", "''", "'a%b%'", "'%''%'", "'É%'", "'_n'", "'%\n%'", "'a_b'",
            "'%a'", "'d0%'", "'%.jsonl'", "'%1'", "'日%'", "NULL", "'EN'"]  # fmt: skip
COMPARISONS = ["=", "==", "!=", "<>", "<", "<=", ">", ">="]
LIST_ITEMS = {"tags": LITERALS["lang"], "nums": ["1", "2", "-5", "1099511627776", "3", "2.0", "2.5", "1e0", "NULL"],
              "days": ["'2020-01-01'", "DATE '2021-06-15'", "'1999-12-31'", "'2000-01-01'", "NULL"]}  # fmt: skip


@pytest.fixture(scope="module")
def typed(tmp_path_factory) -> tuple[OpenIndex, dict[str, str]]:
    """An index of 80 passages with every fast type, NULLs and missing fields, built by the real indexer."""
    import io

    from fakes import HashingEncoder

    from dsearch.cli import Deps, run

    rng = random.Random(12)
    rows = []
    for number in range(80):
        row = {"_id": f"d{number:03d}", "text": f"volcano number {number}"}
        for name, choices in VALUES.items():
            value = rng.choice(choices)
            if value is not MISSING:
                row[name] = value
        rows.append(row)
    tmp = tmp_path_factory.mktemp("fast")
    corpus = tmp / "typed.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    deps = Deps(load_encoder=lambda name, **kw: HashingEncoder(name), stdin=io.BytesIO(b""))
    assert run(["index", str(corpus), "-o", str(tmp / "idx"), "-q"], deps=deps) == 0
    index = OpenIndex(tmp / "idx")
    types = index.manifest.corpus["field_types"]
    assert types == {"day": "DATE", "days": "DATE[]", "lang": "VARCHAR", "nums": "BIGINT[]", "ok": "BOOLEAN",
                     "score": "DOUBLE", "tags": "VARCHAR[]", "year": "BIGINT"}  # fmt: skip
    return index, types


def atoms() -> list[str]:
    """Every operator on every column, with each literal of its pool."""
    out = []
    for column, literals in LITERALS.items():
        name = {"lang": '"Lang"', "year": "YEAR"}.get(column, column) if column in ("lang", "year") else column
        for lit in literals:
            out += [f"{column} {op} {lit}" for op in COMPARISONS]
            out.append(f"{lit} < {name}")  # the literal first, the name in another case
        out += [f"{column} IN ({', '.join(literals[:3])})", f"{column} NOT IN ({literals[0]}, {literals[-1]})",
                f"{column} IN ({literals[-1]})", f"{column} NOT IN ({', '.join(literals[1:4])})",
                f"{column} BETWEEN {literals[0]} AND {literals[1]}", f"{column} NOT BETWEEN {literals[1]} AND "
                f"{literals[0]}", f"{column} BETWEEN {literals[0]} AND NULL", f"{column} IS NULL",
                f"{column} IS NOT NULL", f"NOT {column} IS NULL"]  # fmt: skip
    for column in ("lang", "title", "id", "source"):
        out += [f"{column} LIKE {p}" for p in PATTERNS] + [f"{column} NOT LIKE {p}" for p in PATTERNS[:8]]
    for column, items in LIST_ITEMS.items():
        out += [f"list_contains({column}, {item})" for item in items]
        out += [f"NOT list_contains({column}, {items[0]})", f"{column} IS NULL", f"{column} IS NOT NULL"]
    out += ["ok", "NOT ok", "NOT NOT ok", "(ok)", "ok = TRUE AND year > 2000", "-5 = year", "year = - 5"]
    return out


def check(duckdb: DuckDBFilter, index: OpenIndex, types: dict[str, str], where: str, must_be_fast: bool = True) -> None:
    fast = fast_allowed_rows(index, where, types)
    duck = duckdb(where)
    if must_be_fast:
        assert fast is not None, f"{where!r} fell back to DuckDB"
    if fast is not None:
        assert fast.dtype == bool and fast.shape == duck.shape
        assert np.flatnonzero(fast).tolist() == np.flatnonzero(duck).tolist(), where


def test_every_operator_and_type_gives_duckdbs_rows(typed):
    index, types = typed
    cases = atoms()
    assert len(cases) > 500
    # A condition DuckDB refuses (a string against a number, ...) must not be answered by the fast path.
    refused = []
    with DuckDBFilter(index, types) as duckdb:
        for where in cases:
            try:
                duckdb(where)
            except UsageError:
                refused.append(where)
                assert fast_allowed_rows(index, where, types) is None, where
                continue
            check(duckdb, index, types, where, must_be_fast=False)
    answered = [w for w in cases if w not in refused and fast_allowed_rows(index, w, types) is not None]
    assert len(answered) > 0.8 * len(cases)  # the subset is most of what users write
    # Each kind of column and operator was answered by the fast path at least once.
    for fragment in ("year >", "score <=", "ok =", "day >=", "lang <>", "title =", "id <", "source LIKE",
                     "IN (", "NOT IN", "BETWEEN", "NOT LIKE", "IS NULL", "IS NOT NULL", "< YEAR",
                     "list_contains(tags", "list_contains(nums", "list_contains(days"):  # fmt: skip
        assert any(fragment in w for w in answered), fragment


def test_generated_combinations_give_duckdbs_rows(typed):
    index, types = typed
    base = [w for w in atoms() if fast_allowed_rows(index, w, types) is not None]
    rng = random.Random(2026)

    def combo(depth: int) -> str:
        if depth == 0 or rng.random() < 0.3:
            return rng.choice(base)
        op = rng.choice(["AND", "OR", "AND", "OR", "NOT"])
        if op == "NOT":
            return f"NOT ({combo(depth - 1)})"
        return f"({combo(depth - 1)}) {op} {combo(depth - 1)}"

    with DuckDBFilter(index, types) as duckdb:
        for _ in range(1000):
            check(duckdb, index, types, combo(3))
        # Without parentheses, precedence decides: NOT over AND over OR.
        for _ in range(300):
            parts = [rng.choice(base) for _ in range(4)]
            ops = [rng.choice(["AND", "OR", "AND NOT", "OR NOT"]) for _ in range(3)]
            check(duckdb, index, types, f"{parts[0]} {ops[0]} {parts[1]} {ops[1]} {parts[2]} {ops[2]} {parts[3]}")


@pytest.mark.parametrize(
    "where",
    [
        "year(day) = 2021",  # functions
        "len(tags) = 0",
        "list_contains(tags, lang)",
        "tags = ['en']",
        "list_contains(nums, '2')",  # DuckDB casts the string to a number
        "lang ILIKE 'E%'",
        "lang LIKE 'a\\%b'",  # escapes: DuckDB's rules
        "CAST(year AS VARCHAR) = '2020'",
        "year = score",  # two columns
        "year + 1 > 2020",
        "day < '2021-1-2'",  # a looser date DuckDB reads
        "lang = 5",
        "ok IS TRUE",
        "__row < 3",  # DuckDB's own row column
        "year > 2020 -- a comment",
        "lang LIKE 'e%' ESCAPE '!'",
        "day > TIMESTAMP '2020-01-01 10:00:00'",
        "year IN (SELECT 1)",
        "TRUE",
    ],
)
def test_outside_the_subset_goes_to_duckdb(typed, where):
    index, types = typed
    assert fast_allowed_rows(index, where, types) is None
    try:
        mask = allowed_rows(index, where)  # DuckDB answers it ...
    except UsageError:
        return  # ... or refuses it, with the one-line error of before
    assert mask.tolist() == duckdb_allowed_rows(index, where, types).tolist()


def test_fast_filter_imports_no_duckdb(typed):
    """The point of the fast path: a cold query with a simple --where does not import DuckDB."""
    index, _ = typed
    code = f"""
import sys
from dsearch.errors import UsageError
from dsearch.filters import allowed_rows
from dsearch.store import OpenIndex
index = OpenIndex(__import__('pathlib').Path({str(index.directory)!r}))
mask = allowed_rows(index, "year >= 2020 AND lang IN ('en', 'fr') AND day < '2021-01-01' OR NOT ok")
print(int(mask.sum()), 'duckdb' in sys.modules, 'pyarrow.compute' in sys.modules)
allowed_rows(index, "year(day) = 2021")
print('duckdb' in sys.modules)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    first, second = out.splitlines()
    assert first.split()[1:] == ["False", "False"] and int(first.split()[0]) > 0
    assert second == "True"


def test_fields_file_is_listed_with_its_checksum(typed, cli):
    index, _ = typed
    manifest = json.loads((index.directory / "manifest.json").read_text())
    assert FIELDS_FILE in manifest["segments"][0]["files"]
    path = index.directory / manifest["segments"][0]["path"] / FIELDS_FILE
    import pyarrow.parquet as pq

    schema = pq.ParquetFile(path).schema_arrow
    assert {n: str(schema.field(n).type) for n in schema.names} == {
        "day": "date32[day]", "lang": "string", "ok": "bool", "score": "double", "year": "int64",
        "tags": "list<element: string>", "nums": "list<element: int64>", "days": "list<element: date32[day]>",
    }  # fmt: skip
    assert cli("info", "--verify", index.directory).exit_code == 0


def test_a_field_that_would_not_read_back_exactly_is_left_to_duckdb(tmp_path, cli):
    """An impossible date is NULL to DuckDB's TRY_CAST; the field gets no column, and DuckDB answers for it."""
    corpus = tmp_path / "c.jsonl"
    rows = [
        {"_id": "a", "text": "volcano one", "day": "2021-02-30", "n": 1},
        {"_id": "b", "text": "volcano two", "day": "2021-03-01"},
    ]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("index", corpus, "-o", tmp_path / "idx").exit_code == 0
    index = OpenIndex(tmp_path / "idx")
    types = index.manifest.corpus["field_types"]
    assert fast_allowed_rows(index, "day IS NULL", types) is None
    assert fast_allowed_rows(index, "n = 1", types) is not None
    result = cli("query", tmp_path / "idx", "volcano", "--where", "day IS NULL", "-f", "ids")
    assert (result.exit_code, result.stdout.split(), result.stderr) == (0, ["a"], "")


def test_an_index_without_fields_file_falls_back_and_gets_it_on_update(tmp_path, cli):
    corpus = tmp_path / "c.jsonl"
    rows = [{"_id": f"p{i}", "text": "volcano", "year": 2000 + i} for i in range(5)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = tmp_path / "idx"
    assert cli("index", corpus, "-o", target).exit_code == 0
    # An index from before fields.parquet: the manifest does not list it (the file itself is gone).
    manifest = json.loads((target / "manifest.json").read_text())
    del manifest["segments"][0]["files"][FIELDS_FILE]
    (target / manifest["segments"][0]["path"] / FIELDS_FILE).unlink()
    (target / "manifest.json").write_text(json.dumps(manifest))
    index = OpenIndex(target)
    types = index.manifest.corpus["field_types"]
    assert fast_allowed_rows(index, "year >= 2003", types) is None
    assert fast_allowed_rows(index, "id = 'p1'", types) is not None  # id, title, source need no fields file
    result = cli("query", target, "volcano", "--where", "year >= 2003", "-f", "ids")
    assert (result.exit_code, set(result.stdout.split()), result.stderr) == (0, {"p3", "p4"}, "")
    update = cli("index", corpus, "-o", target, "--update", "--json")
    assert update.exit_code == 0 and json.loads(update.stdout)["published"] is True  # only the file was missing
    index = OpenIndex(target)
    assert FIELDS_FILE in index.manifest.segments[0].files
    assert np.flatnonzero(fast_allowed_rows(index, "year >= 2003", types)).tolist() == [3, 4]


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        ("yeer > 2020", "--where: unknown field 'yeer'"),
        ("YEER = 1 AND lang = 'en'", "unknown field"),
        ("year = 'abc'", "--where \"year = 'abc'\": Could not convert string 'abc'"),
        ("lang LIKE", "syntax error"),
        ("year BETWEEN 1", "syntax error"),
    ],
)
def test_errors_stay_one_line(typed, cli, where, fragment):
    index, _ = typed
    one_error_line(cli("query", index.directory, "volcano", "--where", where), 2, fragment)


def test_windows_of_a_split_passage_share_its_fields(tmp_path, cli):
    """Every row (window) of a passage is allowed or not together, on both paths."""
    text = " ".join(f"word{i}" for i in range(900))
    rows = [{"_id": "long", "text": text, "year": 2020}, {"_id": "short", "text": "volcano", "year": 2010}]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("index", corpus, "-o", tmp_path / "idx", "--split").exit_code == 0
    index = OpenIndex(tmp_path / "idx")
    assert index.rows > 2
    types = index.manifest.corpus["field_types"]
    fast = fast_allowed_rows(index, "year = 2020", types)
    assert fast.tolist() == duckdb_allowed_rows(index, "year = 2020", types).tolist() == [True] * (index.rows - 1) + [
        False
    ]


def test_the_filtered_passages_file_is_the_index(typed):
    """fields.parquet is row-aligned with passages.parquet: same row count, same segment."""
    index, _ = typed
    import pyarrow.parquet as pq

    seg = index.segments[0]
    fields = pq.ParquetFile(index.directory / seg.segment.path / FIELDS_FILE)
    assert fields.metadata.num_rows == seg.segment.rows == 80



def test_a_resumed_build_writes_the_same_fields_file(tmp_path, capsys, monkeypatch):
    from conftest import Runner
    from fakes import HashingEncoder

    rows = [{"_id": f"p{i}", "text": f"volcano {i}", "year": 2000 + i % 7, "lang": ["en", "fr", None][i % 3]}
            for i in range(300)]  # fmt: skip
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("DSEARCH_CHECKPOINT_SECONDS", "0")
    interrupted = Runner(capsys, lambda name, **kw: HashingEncoder(name, fail_after_batches=3))
    assert interrupted("index", corpus, "-o", tmp_path / "idx", "--batch-size", "4").exit_code == 3
    cli = Runner(capsys)
    resumed = cli("index", corpus, "-o", tmp_path / "idx", "--batch-size", "4", "--json")
    assert json.loads(resumed.stdout)["resumed_at"] > 0
    assert cli("index", corpus, "-o", tmp_path / "fresh").exit_code == 0
    a, b = OpenIndex(tmp_path / "idx"), OpenIndex(tmp_path / "fresh")
    assert a.manifest.segments[0].files[FIELDS_FILE] == b.manifest.segments[0].files[FIELDS_FILE]
    types = a.manifest.corpus["field_types"]
    assert fast_allowed_rows(a, "year > 2003 AND lang = 'en'", types).tolist() == [
        2000 + i % 7 > 2003 and i % 3 == 0 for i in range(300)
    ]


def test_a_manifest_type_that_disagrees_with_the_file_goes_to_duckdb(typed):
    """fields.parquet is checked against the manifest's types before its buffers are read as them."""
    index, types = typed
    assert fast_allowed_rows(index, "year > 2000", {**types, "year": "DOUBLE"}) is None
    assert fast_allowed_rows(index, "lang = 'en'", {**types, "lang": "DATE"}) is None
    assert fast_allowed_rows(index, "year > 2000", types) is not None


def test_an_empty_list_takes_the_type_of_the_fields_other_lists(tmp_path):
    """[] and [null] have no item type: they fit a list of numbers or dates (before, they made the field JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dsearch.filters import field_types

    values = {"nums": [[], [1, 2], [None], None], "days": [["2020-01-01"], [], None, [None]],
              "empty": [[], [None], None, []], "mixed": [[], [1], ["a"], None], "scalar": [[], 1, None, None]}
    rows = [json.dumps({name: column[i] for name, column in values.items()}) for i in range(4)]
    pq.write_table(pa.table({"fields": rows}), tmp_path / "p.parquet")
    assert field_types(tmp_path / "p.parquet") == {
        "days": "DATE[]", "empty": "VARCHAR[]", "mixed": "JSON", "nums": "BIGINT[]", "scalar": "JSON",
    }  # fmt: skip


def test_a_duckdb_keyword_is_no_field_name_on_the_fast_path_either():
    """A bare word that DuckDB refuses as a column (its reserved keywords: `order = 1` is a syntax error there) is
    not answered by the fast path, which hands it to DuckDB and its error; every such keyword is checked."""
    import duckdb

    from dsearch.filters import _Parser, _Unsupported

    keywords = sorted({k for (k,) in duckdb.sql("SELECT keyword_name FROM duckdb_keywords()").fetchall()})
    con = duckdb.connect(":memory:")
    con.execute("CREATE TABLE t (" + ", ".join(f'"{k}" BIGINT' for k in keywords) + ")")
    answered_by_fast_path_only = []
    for keyword in keywords:
        for where in (f"{keyword} = 1", f"{keyword} IS NULL", f"NOT {keyword} IN (1, 2)", keyword):
            try:
                con.execute(f"SELECT count(*) FROM t WHERE ({where}\n)").fetchall()
                continue
            except duckdb.Error:
                pass
            try:
                _Parser(where).parse()
                answered_by_fast_path_only.append(where)
            except _Unsupported:
                pass
    assert answered_by_fast_path_only == []


def test_a_field_named_like_a_keyword_gives_duckdbs_error_unquoted_and_rows_quoted(tmp_path, cli):
    rows = [{"_id": "a", "text": "volcano one", "order": 1}, {"_id": "b", "text": "volcano two", "order": 2}]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("index", corpus, "-o", tmp_path / "idx", "-q").exit_code == 0
    unquoted = cli("query", tmp_path / "idx", "volcano", "--where", "order = 1")
    one_error_line(unquoted, 2, 'syntax error at or near "order"')
    quoted = cli("query", tmp_path / "idx", "volcano", "--where", '"order" = 1', "-f", "ids")
    assert (quoted.exit_code, quoted.stdout, quoted.stderr) == (0, "a\n", "")


@pytest.mark.parametrize("where", ["", "   ", "\n"])
def test_an_empty_condition_is_a_usage_error_that_says_so(typed, cli, where):
    index, _ = typed
    one_error_line(cli("query", index.directory, "volcano", "--where", where), 2, "--where is empty; give a condition")


def test_field_names_fold_case_as_duckdb_does_ascii_letters_only(tmp_path, cli):
    """DuckDB binds a column whatever the case of its ASCII letters, but "été" does not name the field "ÉTÉ"; and
    a field whose name is not ASCII is read on both paths (DuckDB's once found no such key: always NULL)."""
    rows = [{"_id": "a", "text": "volcano", "ÉTÉ": 1}, {"_id": "b", "text": "volcano", "ÉTÉ": 3}]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("index", corpus, "-o", tmp_path / "idx", "-q").exit_code == 0
    index = OpenIndex(tmp_path / "idx")
    types = index.manifest.corpus["field_types"]
    for where in ('"ÉTÉ" = 1', '"ÉtÉ" = 1'):
        assert fast_allowed_rows(index, where, types).tolist() == [True, False]
        assert duckdb_allowed_rows(index, where, types).tolist() == [True, False]
    assert allowed_rows(index, '"ÉTÉ" + 0 = 1').tolist() == [True, False]  # outside the subset: DuckDB
    for where in ('"été" = 1', '"Été" = 1'):
        assert fast_allowed_rows(index, where, types) is None
        one_error_line(cli("query", tmp_path / "idx", "volcano", "--where", where), 2, "unknown field")


def test_fields_that_differ_only_in_case_are_reached_quoted_and_the_same_on_both_paths(tmp_path, cli):
    """Fields "Year" and "year", and "ID"/"Title" beside the passage's own id and title: a quoted name spelled
    exactly reaches its field on both paths; an unquoted one that could be either field is a one-line error that
    says to quote it; id, title and source unquoted stay the passage's own, in any case."""
    rows = [{"_id": "a", "text": "volcano one", "Year": 1, "year": 2, "ID": "x", "Title": "T1", "source": "s"},
            {"_id": "b", "text": "volcano two", "Year": 2, "year": 1, "ID": "a", "Title": "T2"},
            {"_id": "c", "text": "volcano three", "Year": 2, "year": 2, "title": "Three"}]  # fmt: skip
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("index", corpus, "-o", tmp_path / "idx", "-q").exit_code == 0
    index = OpenIndex(tmp_path / "idx")
    types = index.manifest.corpus["field_types"]
    expected = {
        '"Year" = 1': "a", '"year" = 1': "b", '"Year" = 2 AND "year" = 2': "c", '"year" BETWEEN 2 AND 3': "ac",
        '"Year" IN (2) OR "year" < 2': "bc", "NOT \"Year\" = 2": "a", '"ID" = \'a\'': "b", "ID = 'a'": "a",
        "Id = 'c' OR \"ID\" = 'x'": "ac", '"Title" LIKE \'T%\'': "ab", "TITLE = 'Three'": "c", '"id" = \'b\'': "b",
        "source LIKE '%c.jsonl'": "abc", '"Title" IS NULL': "c", "\"ID\" = 'x' AND \"Year\" + 0 = 1": "a",
        "\"ID\" || '' = 'a'": "b", "CAST(\"year\" AS VARCHAR) = '1' /* \"Year\" */": "b",
        "$$\"Year\"$$ = '\"Year\"' AND \"year\" = 2": "ac", "year(DATE '2021-01-01') = 2021 AND \"year\" = 1": "b",
    }  # fmt: skip
    with DuckDBFilter(index, types) as duckdb:
        for where, ids in expected.items():
            check(duckdb, index, types, where, must_be_fast=False)
            got = "".join(p for p, keep in zip("abc", allowed_rows(index, where), strict=True) if keep)
            assert got == ids, where
    for where in ('"Year" = 1', "ID = 'a'", '"ID" = \'a\' AND "Title" IS NOT NULL'):
        assert fast_allowed_rows(index, where, types) is not None, where  # the fast path answers these itself
    for where, name in (("year = 1", "year"), ("YEAR > 0 AND \"Year\" = 1", "YEAR"), ('"YEAR" = 1', "YEAR"),
                        ("year + 0 = 1", "year"), ('"Year" = 1 OR year(DATE \'2020-01-01\') = year', "year")):
        message = f"{name!r} could be the field 'Year' or 'year' (names that differ only in case); quote the one you"
        for evaluate in (lambda w: allowed_rows(index, w), lambda w: duckdb_allowed_rows(index, w, types)):
            with pytest.raises(UsageError, match="could be the field") as raised:
                evaluate(where)
            assert message in str(raised.value) and str(raised.value).startswith("where: ")
        try:  # the fast path says the same, or hands the condition over (outside its subset)
            assert fast_allowed_rows(index, where, types) is None, where
        except UsageError as exc:
            assert message in str(exc)
        one_error_line(cli("query", tmp_path / "idx", "volcano", "--where", where), 2, f"--where: {message}")
    unknown = cli("query", tmp_path / "idx", "volcano", "--where", "year_1 = 1")  # DuckDB's name for the second
    one_error_line(unknown, 2, "unknown field 'year_1'; the passages have id, title, source, ID, Title, Year, year ")


def test_a_field_named_like_the_views_row_column_is_the_field_on_duckdbs_path(tmp_path, cli):
    """DuckDB's view has its own __row column (each passage's row): a stored field named "__row" (or "__ROW") must
    still be the field in a condition, on DuckDB's path as on the fast one, not the row number."""
    for name in ("__row", "__ROW"):
        rows = [{"_id": "a", "text": "volcano one", name: 7}, {"_id": "b", "text": "volcano two", name: 0},
                {"_id": "c", "text": "volcano three"}]  # fmt: skip
        corpus = tmp_path / f"{name}.jsonl"
        corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert cli("index", corpus, "-o", tmp_path / name, "-q").exit_code == 0
        index = OpenIndex(tmp_path / name)
        types = index.manifest.corpus["field_types"]
        expected = {f'"{name}" = 7': "a", f'"{name}" + 0 = 7': "a", f'"{name}" = 0 OR "{name}" IS NULL': "bc",
                    f"COALESCE({name}, 1) * 1 = 1": "c", f'"{name}" < 2 AND {name} >= 0': "b"}  # fmt: skip
        with DuckDBFilter(index, types) as duckdb:
            for where, ids in expected.items():
                for mask in (duckdb(where), allowed_rows(index, where)):
                    assert "".join(p for p, keep in zip("abc", mask, strict=True) if keep) == ids, where
                check(duckdb, index, types, where, must_be_fast=False)
        result = cli("query", tmp_path / name, "volcano", "--where", f'"{name}" + 0 = 7', "--format", "jsonl")
        assert result.exit_code == 0 and result.stderr == ""
        assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["a"]


def test_date_part_words_are_not_taken_for_fields_that_differ_only_in_case(tmp_path, cli):
    """With fields "Year" and "year", `extract(year FROM day)` and `INTERVAL 1 YEAR` name a date part, not a field:
    DuckDB answers them as it did before such fields got private names, where the rename took them for an
    ambiguous field and refused the condition."""
    rows = [{"_id": "a", "text": "volcano one", "Year": 1, "year": 2, "day": "2020-03-01"},
            {"_id": "b", "text": "volcano two", "Year": 2, "year": 1, "day": "2021-03-01"}]  # fmt: skip
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("index", corpus, "-o", tmp_path / "idx", "-q").exit_code == 0
    index = OpenIndex(tmp_path / "idx")
    types = index.manifest.corpus["field_types"]
    expected = {"extract(year FROM day) = 2020": "a", 'EXTRACT(YEAR from "day") = 2021 AND "Year" = 2': "b",
                "day + INTERVAL 1 YEAR > DATE '2022-01-01'": "b", "day < DATE '2020-06-01' - INTERVAL '1' year": "",
                "day + INTERVAL (1) year < DATE '2022-01-01' AND \"year\" = 2": "a"}  # fmt: skip
    with DuckDBFilter(index, types) as duckdb:
        for where, ids in expected.items():
            for mask in (duckdb(where), allowed_rows(index, where)):
                assert "".join(p for p, keep in zip("ab", mask, strict=True) if keep) == ids, where
    result = cli("query", tmp_path / "idx", "volcano", "--where", "extract(year FROM day) = 2021", "--format", "jsonl")
    assert (result.exit_code, result.stderr) == (0, "")
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["b"]
    # a field still: the unquoted name that could be either is the same one-line error as before
    where = "extract(year FROM day) = 2021 AND year = 1"
    one_error_line(cli("query", tmp_path / "idx", "volcano", "--where", where), 2, "'year' could be the field")
