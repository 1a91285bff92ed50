"""Adversarial tests of the parts attacked least before: --where, hybrid/lexical search, the Python API, serve."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import one_error_line
from test_hybrid import TYPED, write_jsonl


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
