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
