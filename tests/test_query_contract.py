"""Issue 9, query side: impossible scores, --run targets, stdin encodings, duplicate qids, closed pipes,
qrels values, escaping in the line formats. Exit codes, stdout and stderr are checked separately."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE
from test_cli import one_error_line

from dsearch.store import FlatIndexFileWriter, OpenIndex

QUERY = "tallest volcano Olympus Mons"  # astronomy-04 is its top hit


def corrupt_vector(index_dir: Path, passage_id: str, dim: int, value: float) -> None:
    """Overwrite one float of a passage's stored vector, as a flipped byte on disk would."""
    row = next(n for n, r in enumerate(OpenIndex(index_dir).iter_rows(("id",))) if r["id"] == passage_id)
    (faiss_file,) = index_dir.glob("*/index.faiss")
    with open(faiss_file, "r+b") as fh:
        fh.seek(FlatIndexFileWriter.HEADER_BYTES + (row * 64 + dim) * 4)
        fh.write(np.float32(value).tobytes())


def top_dims(text: str) -> list[int]:
    from fakes import HashingEncoder

    return [int(d) for d in np.flatnonzero(HashingEncoder()._vector(text))]


# --- 1. silently wrong answers --------------------------------------------------------------------------


# A NaN score sorts last: it is seen only when the corrupt passage is among the hits asked for.
@pytest.mark.parametrize("value,k", [(4.01, "1"), (float("inf"), "1"), (-2.0, "200"), (float("nan"), "200")])
def test_impossible_scores_are_an_error(cli, sample_index, value, k):
    before = cli("query", sample_index, QUERY, "-k", "1")
    assert before.exit_code == 0 and json.loads(before.stdout)["id"] == "astronomy-04"
    corrupt_vector(sample_index, "astronomy-04", top_dims(QUERY)[0], value)
    result = cli("query", sample_index, QUERY, "-k", k)
    one_error_line(result, 1, "astronomy-04", "corrupt", f"dsearch status {sample_index}", "info --verify")


def test_corrupt_hit_vector_with_a_possible_score_is_an_error(cli, sample_index):
    # A dimension the query does not use: the score stays plausible, the vector's length does not.
    unused = next(d for d in range(64) if d not in top_dims(QUERY))
    corrupt_vector(sample_index, "astronomy-04", unused, 3.0)
    assert json.loads(cli("info", sample_index, "--json").stdout)["similarity"] == "cosine"
    one_error_line(cli("query", sample_index, QUERY, "-k", "3"), 1, "astronomy-04", "length", "corrupt")


def test_eval_refuses_corrupt_vectors_too(cli, sample_index):
    corrupt_vector(sample_index, "astronomy-04", top_dims(QUERY)[0], 4.01)
    queries = SAMPLE / "queries.tsv"
    one_error_line(cli("eval", sample_index, "--queries", queries, "--qrels", SAMPLE / "qrels.txt"), 1, "corrupt")


# --- 2. eval --run targets ------------------------------------------------------------------------------


def eval_args(index: Path, *extra: object) -> list[object]:
    return ["eval", index, "--queries", SAMPLE / "queries.tsv", "--qrels", SAMPLE / "qrels.txt", *extra]


@pytest.mark.parametrize("kind", ["missing-dir", "dir", "root", "dangling"])
def test_bad_run_paths_are_refused_before_any_query(cli, sample_index, tmp_path, kind):
    target = {
        "missing-dir": tmp_path / "no-such-dir" / "run.trec",
        "dir": tmp_path,
        "root": Path("/"),
        "dangling": tmp_path / "link",
    }[kind]
    if kind == "dangling":
        target.symlink_to(tmp_path / "gone")
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir("/"))
    result = cli(*eval_args(sample_index, "--run", target))
    one_error_line(result, 1, str(target))
    assert "unexpected" not in result.stderr
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir("/"))) == before  # no litter


def test_run_through_a_symlink_keeps_the_link(cli, sample_index, tmp_path):
    real = tmp_path / "real.trec"
    real.write_text("old\n")
    link = tmp_path / "link.trec"
    link.symlink_to(real)
    assert cli(*eval_args(sample_index, "--run", link)).exit_code == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert len(real.read_text().splitlines()) == 12 * 100
    assert sorted(p.name for p in tmp_path.iterdir() if "trec" in p.name) == ["link.trec", "real.trec"]


def test_run_into_a_fifo_writes_through_it(cli, sample_index, tmp_path):
    fifo = tmp_path / "run.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    result = cli(*eval_args(sample_index, "--run", fifo, "-k", "3"))
    out, _ = reader.communicate(timeout=60)
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert len(out.decode().splitlines()) == 12 * 3


def test_run_to_stdout_link_keeps_the_link(tmp_path):
    # In a real process, through a link like /dev/stdout (-> /proc/self/fd/1, a pipe here): the run must go
    # down the pipe and the link must stay. A private link, so that a regression cannot replace /dev/stdout.
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    code = (
        "import sys; sys.path.insert(0, 'tests'); from fakes import HashingEncoder; "
        "from dsearch.cli import Deps, run; deps = Deps(load_encoder=lambda n, **o: HashingEncoder(n)); "
        f"assert run(['index', '{SAMPLE / 'passages.jsonl'}', '-o', '{tmp_path / 'idx'}', '-q'], deps) == 0; "
        f"sys.exit(run(['eval', '{tmp_path / 'idx'}', '--queries', '{SAMPLE / 'queries.tsv'}', '--qrels', "
        f"'{SAMPLE / 'qrels.txt'}', '-k', '2', '--run', '{link}', '--metrics', 'P@1'], deps))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len([line for line in lines if " Q0 " in line]) == 24 and "P@1\tall\t" in lines[-1]
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"


# --- 3. encodings of queries ----------------------------------------------------------------------------


def test_stdin_that_is_not_utf8_is_an_error(cli, sample_index):
    # The queries before a bad line are answered first (test_shell.py); here the first line is the bad one.
    one_error_line(cli("query", sample_index, "-k", "1", stdin=b"br\xffead\nvolcano\n"), 1, "<stdin>:1:", "UTF-8")


def test_stdin_bom_is_stripped(cli, sample_index):
    result = cli("query", sample_index, "-k", "1", stdin="\ufeffvolcano\n".encode())
    assert result.exit_code == 0 and result.stderr == ""
    assert json.loads(result.stdout)["query"] == "volcano"


def test_query_argument_that_is_not_utf8(cli, sample_index):
    one_error_line(cli("query", sample_index, "fine", "br\udcffead"), 2, "query argument 2", "UTF-8")


# --- 4. duplicate qids, empty queries -------------------------------------------------------------------


def test_duplicate_qids_are_refused(cli, sample_index, tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text("q1\tvolcano\nq2\tbread\nq1\tmarathon\n")
    one_error_line(cli("query", sample_index, "--queries", path), 1, f"{path}:3:", "duplicate query id 'q1'", "line 1")


def test_empty_query_in_a_file_is_skipped_with_a_warning(cli, sample_index, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"_id": "a", "text": "volcano"}\n{"_id": "b", "text": "  "}\n{"_id": "c", "text": "bread"}\n')
    result = cli("query", sample_index, "--queries", path, "-k", "1", "-f", "trec")
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["a", "c"]
    assert result.stderr.strip() == f"dsearch: WARNING: {path}:2: query 'b' has no text; skipped"


# --- 5. closed pipes, every format (a real subprocess and a real pipe) -----------------------------------


@pytest.mark.parametrize("fmt", ["table", "jsonl", "tsv", "trec", "ids"])
def test_closed_pipe_ends_quietly_in_every_format(tmp_path, fmt):
    code = (
        "import sys; sys.path.insert(0, 'tests'); from fakes import HashingEncoder; "
        "from dsearch.cli import Deps, run; deps = Deps(load_encoder=lambda n, **o: HashingEncoder(n)); "
        f"assert run(['index', '{SAMPLE / 'passages.jsonl'}', '-o', '{tmp_path / 'idx'}', '-q'], deps) == 0; "
        f"sys.exit(run(['query', '{tmp_path / 'idx'}', '--queries', '{SAMPLE / 'queries.tsv'}', '-k', '200', "
        f"'-f', '{fmt}'], deps))"
    )
    script = f"'{sys.executable}' -c \"{code}\" | head -1; echo \"status=${{PIPESTATUS[0]}}\" >&2"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert len(result.stdout.splitlines()) == 1
    assert result.stderr.strip() == "status=0"


# --- 6. qrels values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,line,problem",
    [
        ("q1 0 cooking-01 inf\n", 1, "'inf' is not a whole number"),
        ("q1 0 cooking-01 1\nq2 0 cooking-02 1.7\n", 2, "'1.7' is not a whole number"),
        ("q1 0 cooking-01 nan\n", 1, "'nan' is not a whole number"),
        ("q1 0 cooking-01 1\nq1 0 cooking-01 2\n", 2, "judged 2 here but 1 on line 1"),
    ],
)
def test_bad_qrels_values(cli, sample_index, tmp_path, content, line, problem):
    qrels = tmp_path / "qrels.txt"
    qrels.write_text(content)
    result = cli("eval", sample_index, "--queries", SAMPLE / "queries.tsv", "--qrels", qrels)
    one_error_line(result, 1, f"{qrels}:{line}:", problem)


def test_repeated_agreeing_qrels_warn(cli, sample_index, tmp_path):
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("q1 0 cooking-01 1\nq1 0 cooking-01 1\nq1 0 cooking-01 1.0\n")
    result = cli("eval", sample_index, "--queries", SAMPLE / "queries.tsv", "--qrels", qrels, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["queries"] == 1
    assert f"{qrels}:2 (same as line 1): repeated judgement kept once and 1 more" in result.stderr


def test_eval_with_no_judged_query_is_an_error(cli, sample_index, tmp_path):
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("other-1 0 cooking-01 1\n")
    result = cli("eval", sample_index, "--queries", SAMPLE / "queries.tsv", "--qrels", qrels)
    one_error_line(result, 1, "no judged query", "'q1'", "'other-1'")


# --- 7. formats: empty --format, escaping, valid JSON ---------------------------------------------------


def test_empty_format_is_a_usage_error(cli, sample_index):
    one_error_line(cli("query", sample_index, "volcano", "--format", ""), 2, "unknown --format ''")


@pytest.fixture
def odd_index(cli, tmp_path) -> Path:
    corpus = tmp_path / "odd.jsonl"
    records = [
        {"id": "a b", "title": "t\x1b[31m", "text": "volcano one\x00two\tthree\nfour \\ five", "x": "NaN"},
        {"id": "a_b", "text": "volcano again"},
        {"id": "line\nbreak", "text": "volcano lines"},
    ]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records).replace('"NaN"', "NaN"))
    result = cli("index", corpus, "-o", tmp_path / "odd.idx")
    assert result.exit_code == 0, result.stderr
    return tmp_path / "odd.idx"


def test_trec_and_ids_escape_without_collisions(cli, odd_index):
    from dsearch import unescape_field

    trec = cli("query", odd_index, "volcano", "-f", "trec").stdout.splitlines()
    assert len(trec) == 3 and all(len(line.split(" ")) == 6 for line in trec)
    docids = [line.split(" ")[2] for line in trec]
    assert sorted(docids) == sorted(["a\\sb", "a_b", "line\\nbreak"])
    assert sorted(map(unescape_field, docids)) == sorted(["a b", "a_b", "line\nbreak"])
    ids = cli("query", odd_index, "volcano", "-f", "ids").stdout.splitlines()
    assert sorted(ids) == sorted(["a b", "a_b", "line\\nbreak"])


def test_tsv_escapes_control_characters(cli, odd_index):
    from dsearch import unescape_field

    out = cli("query", odd_index, "volcano", "-f", "tsv").stdout
    assert "\x00" not in out and "\x1b" not in out
    rows = [line.split("\t") for line in out.splitlines()[1:]]
    assert all(len(row) == 7 for row in rows)
    row = next(r for r in rows if r[4] == "a b")
    assert row[5] == "t\\x1b[31m"
    assert unescape_field(row[6]) == "volcano one\x00two\tthree\nfour \\ five"


def test_jsonl_is_valid_json_without_nan(cli, odd_index):
    out = cli("query", odd_index, "volcano").stdout
    assert "NaN" not in out
    strict = {"parse_constant": lambda c: pytest.fail(f"non-JSON constant {c}")}
    hits = [json.loads(line, **strict) for line in out.split("\n") if line]
    assert next(h for h in hits if h["id"] == "a b")["fields"] == {"x": None}


@pytest.mark.parametrize("value", ["plain", "a b\tc\nd\\e", "\x00\x7f\x85\u2028 \xa0end", "\\s\\n", ""])
def test_escape_round_trips(value):
    from dsearch import unescape_field
    from dsearch.output import escape_field

    for space in (False, True):
        token = escape_field(value, space=space)
        assert unescape_field(token) == value
        assert "\n" not in token and "\t" not in token and (not space or not any(c.isspace() for c in token))
