"""The command line, in-process with the hashing encoder: exit codes, stdout and stderr checked separately."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import ir_measures
import pytest
from conftest import SAMPLE, Runner
from fakes import HashingEncoder

from dsearch.output import TSV_COLUMNS

JSONL_KEYS = {"qid", "query", "rank", "score", "id", "title", "text", "source", "fields", "window"}


def one_error_line(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dsearch: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


# --- index -------------------------------------------------------------------------------------------


def test_index_summary_goes_to_stderr(cli, tmp_path):
    result = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert result.stderr.startswith("indexed 200 passages into ")
    assert "skipped 0 empty, 0 bad" in result.stderr


def test_index_json_summary_on_stdout(cli, tmp_path):
    result = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--json", "-q")
    assert result.exit_code == 0 and result.stderr == ""
    summary = json.loads(result.stdout)
    assert summary["indexed"] == 200 and summary["skipped_bad"] == 0 and summary["skipped_empty"] == 0
    assert {"truncated", "seconds", "passages_per_second", "model", "index"} <= set(summary)


def test_index_from_stdin(cli, tmp_path):
    stdin = b'{"id": "a", "text": "apples"}\n{"id": "b", "text": "bananas"}\n'
    result = cli("index", "-", "-o", tmp_path / "idx", "--json", stdin=stdin)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["indexed"] == 2


def test_bad_corpus_stops_and_publishes_nothing(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b" "text": "oops"}\n')
    target = tmp_path / "idx"
    result = cli("index", bad, "-o", target)
    one_error_line(result, 1, f"{bad}:2:", "not valid JSON", "--skip-bad")
    assert not target.exists()
    # No staging debris and no lock file either.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_bad_corpus_keeps_previous_index(cli, tmp_path, sample_index):
    before = cli("query", sample_index, "volcano", "--format", "ids").stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "dup"}\n')
    one_error_line(cli("index", bad, "-o", sample_index), 1, f"{bad}:2:", "duplicate id 'a'")
    assert cli("query", sample_index, "volcano", "--format", "ids").stdout == before


def test_skip_bad_counts(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b" "text": "oops"}\n{"id": "c", "text": " "}\n')
    result = cli("index", bad, "-o", tmp_path / "idx", "--skip-bad", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert (summary["indexed"], summary["skipped_bad"], summary["skipped_empty"]) == (1, 1, 1)


def test_interrupted_index_exits_3_and_keeps_previous(capsys, tmp_path, sample_index):
    before = {p: p.read_bytes() for p in sample_index.rglob("*") if p.is_file()}
    failing = Runner(capsys, lambda name, **options: HashingEncoder(name, fail_after_batches=1))
    result = failing("index", SAMPLE / "passages.jsonl", "-o", sample_index, "--batch-size", "4")
    one_error_line(result, 3, "interrupted; nothing was published")
    assert {p: p.read_bytes() for p in sample_index.rglob("*") if p.is_file()} == before


def test_refuses_non_index_directory(cli, tmp_path):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    one_error_line(cli("index", SAMPLE / "passages.jsonl", "-o", target), 1, "not a dsearch index")
    assert (target / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["index", "x.jsonl"], "-o"),
        (["index", "x.jsonl", "-o", "out", "--format", "xml"], "unknown --format 'xml'"),
        (["index", "-", "-", "-o", "out"], "stdin"),
        (["query", "idx", "q", "--format", "html"], "unknown --format 'html'"),
        (["query", "idx", "q", "-k", "0"], "-k"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_usage_errors_exit_2_on_one_line(cli, args, fragment):
    one_error_line(cli(*args), 2, fragment)


@pytest.mark.parametrize(
    "args,help_command",
    [
        (["query", "idx", "q", "-k", "0"], "dsearch query --help"),
        (["index", "x.jsonl"], "dsearch index --help"),
        (["status"], "dsearch status --help"),
        (["eval", "idx"], "dsearch eval --help"),
        (["frobnicate"], "dsearch --help"),
        (["--frobnicate"], "dsearch --help"),
    ],
)
def test_a_usage_error_points_to_the_help_that_lists_the_option(cli, args, help_command):
    """`dsearch --help` lists only the commands: an option's error points to its own command's help."""
    result = cli(*args)
    one_error_line(result, 2)
    assert result.stderr.rstrip().endswith(f"(see '{help_command}')")


def test_no_arguments_prints_help_and_exits_2(cli):
    result = cli()
    assert result.exit_code == 2 and result.stdout == ""
    assert "Usage: dsearch" in result.stderr


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.startswith("dsearch ") and result.stderr == ""


# --- query -------------------------------------------------------------------------------------------


def test_query_jsonl_in_a_pipe(cli, sample_index):
    result = cli("query", sample_index, "tallest volcano Olympus Mons", "-k", "3")
    assert result.exit_code == 0 and result.stderr == ""
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(hits) == 3 and all(set(h) == JSONL_KEYS for h in hits)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["id"] == "astronomy-04" and hits[0]["title"] == "Mars"
    assert hits[0]["qid"] == "1" and hits[0]["query"] == "tallest volcano Olympus Mons"
    assert hits[0]["fields"] == {"topic": "astronomy"}
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_queries_are_numbered_in_order(cli, sample_index):
    result = cli("query", sample_index, "volcano", "bread yeast", "-k", "1")
    assert [json.loads(line)["qid"] for line in result.stdout.splitlines()] == ["1", "2"]


def test_queries_from_stdin(cli, sample_index):
    result = cli("query", sample_index, "-k", "2", "--format", "tsv", stdin=b"volcano\n\nbread yeast\n")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == list(TSV_COLUMNS)
    assert [line.split("\t")[0] for line in lines[1:]] == ["1", "1", "2", "2"]


@pytest.mark.parametrize(
    "name,content",
    [
        ("q.tsv", "a7\ttallest volcano Olympus Mons\nb9\tbread yeast dough\n"),
        (
            "q.jsonl",
            '{"_id": "a7", "text": "tallest volcano Olympus Mons"}\n{"_id": "b9", "text": "bread yeast dough"}\n',
        ),
    ],
)
def test_query_files(cli, sample_index, tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    result = cli("query", sample_index, "--queries", path, "-k", "1", "--format", "trec")
    assert result.exit_code == 0
    rows = [line.split() for line in result.stdout.splitlines()]
    assert [(r[0], r[1], r[2], r[3], r[5]) for r in rows] == [
        ("a7", "Q0", "astronomy-04", "1", "dsearch"),
        ("b9", "Q0", "cooking-01", "1", "dsearch"),
    ]


def test_trec_output_loads_in_ir_measures(cli, sample_index, tmp_path):
    result = cli("query", sample_index, "--queries", SAMPLE / "queries.tsv", "-k", "5", "--format", "trec")
    run_file = tmp_path / "run.txt"
    run_file.write_text(result.stdout)
    run = list(ir_measures.read_trec_run(str(run_file)))
    assert len(run) == 12 * 5
    assert {r.query_id for r in run} == {f"q{i}" for i in range(1, 13)}


def test_ids_format(cli, sample_index):
    result = cli("query", sample_index, "volcano", "-k", "4", "--format", "ids")
    ids = result.stdout.splitlines()
    assert len(ids) == 4 and all("-" in i for i in ids)


def test_table_format(cli, sample_index):
    result = cli("query", sample_index, "tallest volcano Olympus Mons", "-k", "2", "--format", "table")
    assert result.exit_code == 0
    assert "astronomy-04" in result.stdout and "Mars" in result.stdout and "rank" in result.stdout
    assert "\x1b[" not in result.stdout  # no colour codes outside a terminal


def test_bad_query_file(cli, sample_index, tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text("q1\tfine\nno tab here\n")
    one_error_line(cli("query", sample_index, "--queries", path), 1, f"{path}:2:", "qid<TAB>")


def test_queries_and_query_file_together_is_usage_error(cli, sample_index):
    one_error_line(cli("query", sample_index, "x", "--queries", SAMPLE / "queries.tsv"), 2, "not both")


def test_missing_index(cli, tmp_path):
    one_error_line(cli("query", tmp_path / "nowhere", "x"), 1, "not a dsearch index")


def test_model_with_other_dimension_is_refused(capsys, sample_index):
    other = Runner(capsys, lambda name, **options: HashingEncoder(name, dim=32))
    one_error_line(other("query", sample_index, "x", "--model", "other"), 1, "32-d", "64-d")


def test_model_with_other_fingerprint_warns(capsys, sample_index):
    other = Runner(capsys, lambda name, **options: HashingEncoder(name, similarity="dot"))
    result = other("query", sample_index, "volcano", "--model", "other", "-k", "1")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1
    assert "differs from the one that built the index" in result.stderr


def test_query_uses_the_manifest_model(cli, sample_index):
    cli.loaded.clear()
    cli("query", sample_index, "x")
    assert cli.loaded == ["hash-test"]


# --- info --------------------------------------------------------------------------------------------


def test_info_json(cli, sample_index):
    result = cli("info", sample_index, "--json")
    assert result.exit_code == 0 and result.stderr == ""
    data = json.loads(result.stdout)
    assert (data["model"], data["dim"], data["similarity"], data["passages"], data["index_type"]) == (
        "hash-test",
        64,
        "cosine",
        200,
        "IndexFlatIP",
    )
    assert data["size_bytes"] > 200 * 64 * 4


def test_info_words(cli, sample_index):
    result = cli("info", sample_index, "--verify")
    assert result.exit_code == 0
    for words in ("hash-test", "64", "cosine", "200", "IndexFlatIP", "size on disk"):
        assert words in result.stdout


def test_info_missing_index(cli, tmp_path):
    one_error_line(cli("info", tmp_path), 1, "not a dsearch index")


def test_a_run_whose_stdout_cannot_flush_at_the_start_leaves_the_streams_as_it_found_them(monkeypatch):
    """A program whose sys.stdout held unwritten text for a pipe left non-blocking, whose reader had gone, called
    ``cli.run``: setting up the streams raised BrokenPipeError out of ``run`` (a traceback, not an exit code), and
    the count of runs stayed raised, so that every later run in that process found the streams "installed by
    another run" and neither set them up nor put them back."""
    from dsearch import cli as cli_module

    read, write = os.pipe()
    os.set_blocking(write, False)
    os.close(read)
    stream = io.TextIOWrapper(io.BufferedWriter(io.FileIO(write, "w")), encoding="utf-8")
    stream.write("the program's own line, not yet flushed")
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        code = cli_module.run(["--version"])
        assert (code, sys.stdout, cli_module._streams["runs"]) == (0, stream, 0)  # the closed pipe: quietly
    finally:
        monkeypatch.undo()
        cli_module._streams["runs"] = 0
        with contextlib.suppress(OSError):
            stream.close()


def test_a_run_that_fails_to_set_up_its_streams_is_not_counted(monkeypatch):
    """A run whose stream set-up failed (no descriptor left for /dev/null, in a process that leaks them) left the
    count of runs raised: every later run in the process then took the streams for another run's, and ran without
    the stdout that maps a closed pipe and a full disk, and without putting anything back."""
    from dsearch import cli as cli_module

    monkeypatch.setattr(sys, "stdin", None)  # started with `<&-`: the set-up opens /dev/null for it
    monkeypatch.setattr(os, "devnull", "/nonexistent/devnull")  # ... and cannot
    with pytest.raises(OSError):
        cli_module.run(["--version"])
    monkeypatch.undo()
    assert cli_module._streams["runs"] == 0
