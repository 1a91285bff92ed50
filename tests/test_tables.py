"""Issue 10: terminal tables that fit 80 and 160 columns without cutting words; get, --min-score, --like, -v."""

from __future__ import annotations

import io
import json
import re

import pytest
from conftest import SAMPLE
from test_cli import one_error_line

PASSAGES = [json.loads(line) for line in (SAMPLE / "passages.jsonl").read_text().splitlines()]
BOX = re.compile(r"[─│┃━┏┓┗┛┡┩└┘┌┐├┤┬┴┼╇]+")
QUERY = "what causes the northern lights and how far south can they be seen in winter"


def words_of(*texts: str) -> set[str]:
    return {word for text in texts for word in text.split()}


KNOWN = words_of(*(f"{p['_id']} {p.get('title', '')} {p['text']}" for p in PASSAGES), "rank score id title text")


def assert_reads_well(output: str, width: int, known: set[str]) -> None:
    """No line wider than the terminal; every word whole, or whole and followed by "…"."""
    assert output.strip()
    for line in output.splitlines():
        assert len(line) <= width, f"{len(line)} > {width}: {line!r}"
        for token in BOX.sub(" ", line).split():
            cut = token.endswith("…")
            word = token[:-1] if cut else token
            if word and not re.fullmatch(r"[\d.]+", word):
                # Before "…" a word may have lost its trailing comma, semicolon or colon, nothing else.
                whole = word in known or (cut and any(word + p in known for p in ",;:"))
                assert whole, f"{token!r} is cut mid-word in {line!r}"


@pytest.mark.parametrize("width", [80, 160])
def test_query_table_fits_and_cuts_at_words(cli, sample_index, monkeypatch, width):
    monkeypatch.setenv("COLUMNS", str(width))
    result = cli("query", sample_index, QUERY, "-k", "10", "-f", "table")
    assert result.exit_code == 0 and result.stderr == ""
    assert_reads_well(result.stdout, width, KNOWN | words_of(f"[1] {QUERY}"))
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) <= 3 + 10 * 2  # heading, header, rule, then at most 2 lines a hit
    if width == 80:
        assert sum(line.rstrip().endswith("…") for line in lines) >= 5  # snippets are cut, visibly
    if width == 160:
        assert "Migration of birds" in result.stdout or "Auroras" in result.stdout  # titles on one line


@pytest.mark.parametrize("width", [80, 160])
def test_info_table_fits(cli, sample_index, monkeypatch, width):
    monkeypatch.setenv("COLUMNS", str(width))
    result = cli("info", sample_index)
    assert result.exit_code == 0
    first, *rest = result.stdout.splitlines()
    assert first == str(sample_index)
    for line in rest:
        assert len(line) <= width
    assert any(line.split()[:2] == ["size", "on"] for line in rest)


@pytest.mark.parametrize("width", [80, 160])
def test_eval_table_title_stays_whole(width):
    from dsearch.output import render_mapping

    title = "dsearch/sample.idx (12 queries, k=100)"
    stream = io.StringIO()
    render_mapping(title, {"nDCG@10": "0.6451", "R@100": "0.9300", "queries": "12"}, stream, width=width)
    lines = stream.getvalue().splitlines()
    assert lines[0] == title
    assert_reads_well(stream.getvalue(), width, words_of(title, "nDCG@10 0.6451 R@100 0.9300 queries 12"))


def test_long_values_wrap_at_spaces_in_mapping_tables():
    from dsearch.output import render_mapping

    value = " ".join(f"word{i}" for i in range(60))
    stream = io.StringIO()
    render_mapping("t", {"key": value}, stream, width=80)
    assert_reads_well(stream.getvalue(), 80, words_of(value, "t key"))
    assert stream.getvalue().count("word") == 60


def test_snippet_lines_and_full(cli, sample_index, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    one = cli("query", sample_index, QUERY, "-k", "5", "-f", "table", "--snippet", "1").stdout.split("\n")
    one = [line for line in one if line.strip()]
    assert len(one) == 3 + 5
    full = cli("query", sample_index, QUERY, "-k", "1", "-f", "table", "--full").stdout
    top = json.loads(cli("query", sample_index, QUERY, "-k", "1").stdout)
    start = full.splitlines()[1].index("text")  # the text column, from the header
    text_column = " ".join(line[start:].strip() for line in full.splitlines()[3:])
    assert "…" not in text_column
    assert " ".join(text_column.split()) == " ".join(top["text"].split())


def test_ellipsize_and_snippets_cut_after_whole_words():
    from dsearch.output import ellipsize, snippet_lines

    assert ellipsize("Migration of birds", 14) == "Migration of…"
    assert ellipsize("Migration of birds", 18) == "Migration of birds"
    assert ellipsize("Supercalifragilistic", 8) == "Superca…"  # one word: nothing whole to keep
    lines = snippet_lines("alpha beta gamma delta epsilon zeta", 11, 2)
    assert lines == ["alpha beta", "gamma…"]
    assert all(len(line) <= 11 for line in lines)


# --- dsearch get --------------------------------------------------------------------------------------


def test_get_in_every_format(cli, sample_index, monkeypatch):
    first, second = PASSAGES[0], PASSAGES[5]
    ids = (first["_id"], second["_id"])
    records = [json.loads(line) for line in cli("get", sample_index, *ids).stdout.splitlines()]
    assert [(r["id"], r["title"], r["text"]) for r in records] == [
        (p["_id"], p.get("title"), p["text"]) for p in (first, second)
    ]
    assert records[0]["fields"] == {"topic": first["topic"]}
    assert cli("get", sample_index, *ids, "-f", "ids").stdout.splitlines() == list(ids)
    tsv = cli("get", sample_index, *ids, "-f", "tsv").stdout.splitlines()
    assert tsv[0] == "id\ttitle\ttext\tsource" and [row.split("\t")[0] for row in tsv[1:]] == list(ids)
    monkeypatch.setenv("COLUMNS", "80")
    table = cli("get", sample_index, *ids, "-f", "table")
    assert table.exit_code == 0
    assert_reads_well(table.stdout, 80, KNOWN)
    assert " ".join(first["text"].split()[-3:]) in " ".join(table.stdout.split())  # whole passages
    one_error_line(cli("get", sample_index, first["_id"], "-f", "trec"), 2, "trec")


def test_get_unknown_id_prints_the_rest_then_fails(cli, sample_index):
    result = cli("get", sample_index, "nope", PASSAGES[0]["_id"], "nada", "-f", "ids")
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [PASSAGES[0]["_id"]]
    assert result.stderr.strip().splitlines() == [
        f"dsearch: error: {sample_index}: no passage with id 'nope' (and 1 other id); check the ids"
    ]


def test_get_reads_ids_from_query_output(cli, sample_index):
    ids = cli("query", sample_index, QUERY, "-k", "3", "-f", "ids").stdout
    result = cli("get", sample_index, "-", "-f", "ids", stdin=ids.encode())
    assert result.exit_code == 0 and result.stdout == ids


# --- --min-score, --like, -v ---------------------------------------------------------------------------


def test_min_score(cli, sample_index):
    everything = [json.loads(line) for line in cli("query", sample_index, QUERY, "-k", "20").stdout.splitlines()]
    bar = everything[4]["score"]
    kept = [
        json.loads(line)
        for line in cli("query", sample_index, QUERY, "-k", "20", "--min-score", str(bar)).stdout.splitlines()
    ]
    assert kept == [h for h in everything if h["score"] >= bar] and 5 <= len(kept) < 20
    one_error_line(cli("query", sample_index, QUERY, "--min-score", "nan"), 2, "--min-score")


def test_like_ranks_by_the_stored_vector_without_the_passage(cli, sample_index):
    passage = next(p for p in PASSAGES if p["_id"] == "astronomy-17")
    cli.loaded.clear()
    like = [
        json.loads(line) for line in cli("query", sample_index, "--like", "astronomy-17", "-k", "5").stdout.splitlines()
    ]
    assert cli.loaded == []  # no model loaded
    assert "astronomy-17" not in [h["id"] for h in like] and len(like) == 5
    # The hashing encoder encodes documents and queries alike: the same ranking as querying with the passage.
    same = cli("query", sample_index, f"{passage['title']} {passage['text']}", "-k", "6").stdout.splitlines()
    expected = [json.loads(line) for line in same if json.loads(line)["id"] != "astronomy-17"][:5]
    assert [(h["id"], h["score"]) for h in like] == [(h["id"], h["score"]) for h in expected]
    assert like[0]["qid"] == "astronomy-17" and like[0]["query"] == "like:astronomy-17"
    one_error_line(cli("query", sample_index, "--like", "nope"), 1, "nope", "no passage")
    one_error_line(cli("query", sample_index, "x", "--like", "astronomy-17"), 2, "--like")


def test_verbose_times_each_stage(cli, sample_index):
    result = cli("query", sample_index, QUERY, "-k", "1", "-v")
    assert result.exit_code == 0
    log = result.stderr
    for stage in ("load index:", "load model: hash-test, precision fp32", "encode", "search", "metadata lookup"):
        assert stage in log, stage
    assert re.search(r"searched 1 query: encode [\d.]+ s, search [\d.]+ s, metadata lookup [\d.]+ s", log)
    assert log.rstrip().endswith("wrote 1 hit")
    assert cli("query", sample_index, QUERY, "-k", "2", "-v").stderr.rstrip().endswith("wrote 2 hits")


def test_tables_never_send_control_characters(cli, tmp_path, monkeypatch):
    corpus = tmp_path / "odd.jsonl"
    corpus.write_text(
        json.dumps({"id": "e\x1bvil", "title": "bell\x07", "text": "volcano \x1b[2J\x1b[31mred\x00"}) + "\n"
    )
    assert cli("index", corpus, "-o", tmp_path / "odd.idx").exit_code == 0
    monkeypatch.setenv("COLUMNS", "80")
    for args in (("query", tmp_path / "odd.idx", "volcano\x1b"), ("get", tmp_path / "odd.idx", "e\x1bvil")):
        result = cli(*args, "-f", "table")
        assert result.exit_code == 0, result.stderr
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", result.stdout)
        assert "\\x1b[31mred\\x00" in result.stdout and "e\\x1bvil" in result.stdout


def test_wide_characters_are_measured_in_terminal_columns():
    from rich.cells import cell_len

    from dsearch.output import render_passages
    from dsearch.search import Hit

    text = " ".join(["東京の天気は晴れです"] * 20)
    passage = Hit("", "", 0, 0.0, 0, "jp-1", "日本語のタイトルはとても長いです 本当に", text, "s", {})
    for width in (80, 160):
        stream = io.StringIO()
        render_passages([passage], "table", stream, width=width)
        lines = stream.getvalue().splitlines()
        assert all(cell_len(line) <= width for line in lines), [cell_len(line) for line in lines]
        assert stream.getvalue().count("東京の天気は晴れです") == 20  # whole passage, no word cut


def test_get_table_of_nothing_prints_nothing(cli, sample_index):
    result = cli("get", sample_index, "nope", "-f", "table")
    one_error_line(result, 1, "no passage with id 'nope'")


def test_tables_print_brackets_and_colons_in_passages_as_they_are(cli, tmp_path, monkeypatch):
    """Rich read "[bold]x[/bold]" in a passage as markup (the id printed as "x", which 'get' then cannot find),
    "[link=URL]" as a hyperlink and ":fire:" as an emoji: a table shows the passage's own characters."""
    corpus = tmp_path / "brackets.jsonl"
    record = {
        "id": "[bold]v-1[/bold]",
        "title": "[link=http://e.x]t[/link]",
        "text": "volcano [red]lava[/red] :fire: [/]",
        "[i]year[/i]": 2020,
    }
    corpus.write_text(json.dumps(record) + "\n")
    index = tmp_path / "brackets.idx"
    assert cli("index", corpus, "-o", index).exit_code == 0
    monkeypatch.setenv("COLUMNS", "160")
    for args in (("query", index, "volcano", "--full"), ("get", index, "[bold]v-1[/bold]")):
        result = cli(*args, "-f", "table")
        assert (result.exit_code, result.stderr) == (0, ""), result.stderr
        for shown in ("[bold]v-1[/bold]", "[link=http://e.x]t[/link]", "[red]lava[/red] :fire: [/]"):
            assert shown in result.stdout
        assert "🔥" not in result.stdout and "\x1b" not in result.stdout
    info = cli("info", index)
    assert info.exit_code == 0 and "[i]year[/i]" in info.stdout
