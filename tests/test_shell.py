"""dsearch as a shell user runs it: stdout to a full disk or closed, stdin or stderr closed, a non-UTF-8 locale.

These run the real ``dsearch`` command in a subprocess (the shell's file descriptors are what is tested), with the
tests' hashing encoder for the commands that encode.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_corpus"
FULL = Path("/dev/full")

ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    "DSEARCH_TEST_ENCODER": "fakes:hashing_encoder",
}


def shell(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``script`` in bash, where ``$DSEARCH`` is the dsearch command; stdout and stderr kept as bytes."""
    env = {**ENV, **(env or {}), "DSEARCH": f"{sys.executable} -m dsearch"}
    return subprocess.run(["bash", "-c", script], capture_output=True, env=env, timeout=120)


def error_line(stderr: bytes) -> str:
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("dsearch: error: "), lines
    return lines[0]


@pytest.mark.skipif(not FULL.exists(), reason="no /dev/full on this system")
@pytest.mark.parametrize(
    "command",
    [
        "query {idx} 'how hot is venus' -f jsonl",
        "query {idx} 'how hot is venus' -f table",
        "get {idx} astronomy-03",
        "info {idx} --json",
        "status {idx}",
        "eval {idx} --queries {sample}/queries.tsv --qrels {sample}/qrels.txt",
        "--version",
        "--help",
        "query --help",
    ],
)
def test_stdout_on_a_full_disk_is_one_error_line_not_an_unexpected_error(sample_index, command):
    """`dsearch query … > /dev/full` said 'unexpected OSError: [Errno 28] … report it'."""
    args = command.format(idx=sample_index, sample=SAMPLE)
    result = shell(f"$DSEARCH {args} > /dev/full")
    assert result.returncode == 1
    assert result.stdout == b""
    line = error_line(result.stderr)
    assert "stdout: cannot write the results (No space left on device)" in line
    assert "unexpected" not in line


def test_a_closed_stdout_is_one_error_line(sample_index):
    """`dsearch query … >&-` said "unexpected AttributeError: 'NoneType' object has no attribute 'isatty'"."""
    result = shell(f"$DSEARCH query {sample_index} 'how hot is venus' >&-")
    assert result.returncode == 1
    assert "stdout is closed" in error_line(result.stderr)


@pytest.mark.parametrize("command", ["query {idx} -f ids", "get {idx} -"])
def test_a_closed_stdin_reads_as_empty_like_dev_null(sample_index, command):
    """`dsearch query DIR <&-` said "unexpected AttributeError: 'NoneType' object has no attribute 'buffer'"."""
    args = command.format(idx=sample_index)
    closed = shell(f"$DSEARCH {args} <&-")
    empty = shell(f"$DSEARCH {args} </dev/null")
    assert (closed.returncode, closed.stdout, closed.stderr) == (0, b"", b"")
    assert (empty.returncode, empty.stdout, empty.stderr) == (0, b"", b"")


def test_a_closed_stderr_keeps_error_messages_off_stdout(tmp_path):
    """With stderr closed (`2>&-`), print(file=sys.stderr) wrote the error line to stdout, into the results."""
    result = shell(f"$DSEARCH query {tmp_path / 'no-such.idx'} anything 2>&-")
    assert result.returncode == 1
    assert result.stdout == b""


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_stdout_is_utf8_whatever_the_locale_says(tmp_path, cli, encoding):
    """Under PYTHONIOENCODING=ascii (or a Latin-1 locale) `-f ids` died with 'unexpected UnicodeEncodeError', and
    `-f jsonl` wrote Latin-1 bytes that jq cannot read."""
    corpus = tmp_path / "c.jsonl"
    records = [{"id": "ü-ñ", "text": "Venus is hot \u2028 and cloudy"}, {"id": "plain", "text": "Mars is cold"}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    index = tmp_path / "idx"
    assert cli("index", corpus, "-o", index, "--no-lexical").exit_code == 0
    env = {"PYTHONIOENCODING": encoding}
    ids = shell(f"$DSEARCH query {index} venus -k 2 -f ids", env)
    assert ids.returncode == 0, ids.stderr
    assert set(ids.stdout.decode("utf-8").splitlines()) == {"ü-ñ", "plain"}
    lines = shell(f"$DSEARCH query {index} venus -k 2 -f jsonl", env)
    assert lines.returncode == 0, lines.stderr
    hits = [json.loads(line) for line in lines.stdout.decode("utf-8").split("\n") if line]  # not splitlines: U+2028
    assert {h["id"] for h in hits} == {"ü-ñ", "plain"}
    assert any("\u2028" in h["text"] for h in hits)


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_a_query_on_stdin_is_answered_before_the_next_one_arrives(sample_index, mode):
    """A coprocess writes a query and waits for its answer. The answer waited for 255 more queries or the end of
    stdin, though the code promised "a pipeline gets each answer as its query arrives": the batcher filled a
    batch of 256 with `islice`, blocking on the pipe."""
    import select

    args = [sys.executable, "-m", "dsearch", "query", str(sample_index), "-k", "1", "-f", "trec", "--mode", mode]
    child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        answers = []
        for text in ("how hot is venus", "the red planet"):
            child.stdin.write(f"{text}\n".encode())
            child.stdin.flush()
            readable, _, _ = select.select([child.stdout], [], [], 60)
            assert readable, f"no answer to {text!r} while stdin stays open"
            answers.append(child.stdout.readline().decode())
        child.stdin.close()
        assert child.stdout.read() == b""
        assert child.wait(timeout=60) == 0
        assert child.stderr.read() == b""
    finally:
        child.kill()
        child.wait()
    assert [a.split(" ")[0] for a in answers] == ["1", "2"]  # numbered across the stream, one hit each
    assert all(a.endswith(" dsearch\n") and a.count(" ") == 5 for a in answers)


BEIR_QUERIES = b'{"_id": "q1", "text": "how hot is venus"}\n{"_id": "q2", "text": "the red planet"}\n'


def test_queries_dash_reads_json_lines_or_tsv_from_stdin(cli, sample_index):
    """`jq -c … | dsearch query DIR --queries -` said '-: cannot read the queries file (No such file or
    directory)'."""
    jsonl = cli("query", sample_index, "--queries", "-", "-k", "1", "-f", "trec", stdin=BEIR_QUERIES)
    assert jsonl.exit_code == 0, jsonl.stderr
    assert [line.split(" ")[0] for line in jsonl.stdout.splitlines()] == ["q1", "q2"]
    tsv = cli("query", sample_index, "--queries", "-", "-k", "1", "-f", "trec", stdin=b"q1\thow hot is venus\n")
    assert tsv.exit_code == 0, tsv.stderr
    assert tsv.stdout == jsonl.stdout.splitlines(keepends=True)[0]
    bad = cli("query", sample_index, "--queries", "-", stdin=b"{not json\n")
    assert bad.exit_code == 1 and bad.stdout == ""
    assert bad.stderr.startswith("dsearch: error: <stdin>:1: not valid JSON") and bad.stderr.count("\n") == 1


def test_a_queries_file_named_without_an_extension_is_read_as_json_lines_when_it_is(cli, sample_index, tmp_path):
    """`--queries /dev/stdin` or `--queries <(jq -c …)` of BEIR queries was read as TSV: 'expected
    qid<TAB>query text'."""
    named = tmp_path / "queries"  # what a shell's <(…) or /dev/stdin looks like: no extension
    named.write_bytes(BEIR_QUERIES)
    result = cli("query", sample_index, "--queries", named, "-k", "1", "-f", "trec")
    assert result.exit_code == 0, result.stderr
    assert [line.split(" ")[0] for line in result.stdout.splitlines()] == ["q1", "q2"]
    qrels = tmp_path / "qrels"
    top = [line.split(" ")[2] for line in result.stdout.splitlines()]
    qrels.write_text(f"q1 0 {top[0]} 1\nq2 0 {top[1]} 1\n")
    scored = cli("eval", sample_index, "--queries", "-", "--qrels", qrels, "--metrics", "R@1", stdin=BEIR_QUERIES)
    assert (scored.exit_code, scored.stdout, scored.stderr) == (0, "R@1\tall\t1.0000\n", "")
    tsv = tmp_path / "topics"
    tsv.write_text("q1\thow hot is venus\n")
    assert (
        cli("query", sample_index, "--queries", tsv, "-k", "1", "-f", "trec").stdout
        == result.stdout.splitlines(keepends=True)[0]
    )


def test_status_of_an_index_whose_first_build_is_running_says_so(cli, tmp_path):
    """While the first build ran, `status` said 'no index here; build it with dsearch index' (a second build
    would exit 4); only --json's "updating" told the truth."""
    import fcntl

    directory = tmp_path / "idx"
    directory.mkdir()
    with open(directory / ".dsearch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running `dsearch index` holds
        building = cli("status", directory)
        as_json = cli("status", directory, "--json")
    assert building.exit_code == 5 and building.stderr == ""
    building_line = f"missing: {directory}: no index here yet; a run is building it now, check again when it ends\n"
    assert building.stdout == building_line
    report = json.loads(as_json.stdout)
    assert (report["status"], report["exit_code"], report["updating"]) == ("missing", 5, True)
    idle = cli("status", directory)
    assert idle.exit_code == 5
    assert idle.stdout == f"missing: {directory}: no index here; build it with 'dsearch index'\n"


@pytest.mark.parametrize("variable", ["FORCE_COLOR", "TTY_COMPATIBLE"])
@pytest.mark.parametrize(
    "command",
    [
        ("info", "{idx}"),
        ("query", "{idx}", "how hot is venus", "-f", "table"),
        ("get", "{idx}", "astronomy-03", "-f", "table"),
    ],
)
def test_no_escape_codes_in_a_pipe_even_when_the_environment_forces_colour(
    cli, sample_index, monkeypatch, variable, command
):
    """With FORCE_COLOR=1 (set by some CI systems and dotfiles) Rich took the pipe for a terminal: `dsearch info
    DIR | grep model` got bold escape codes around every key."""
    monkeypatch.setenv(variable, "1")
    result = cli(*(part.format(idx=sample_index) for part in command))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() and "\x1b" not in result.stdout
    assert result.stderr == ""


def test_eval_run_to_stdout_redirected_to_a_file_keeps_the_metrics(sample_index, tmp_path):
    """`dsearch eval … --run /dev/stdout > out.txt` lost the metric lines: opening /dev/stdout anew truncated the
    file they had been written to. `--run -` wrote a file named '-'."""
    out = tmp_path / "out.txt"
    args = f"eval {sample_index} --queries {SAMPLE}/queries.tsv --qrels {SAMPLE}/qrels.txt --metrics R@10"
    saved = tmp_path / "saved.run"
    alone = shell(f"$DSEARCH {args} --run {saved}")
    assert alone.returncode == 0 and alone.stdout.decode().startswith("R@10\tall\t")
    for target in ("/dev/stdout", "-"):
        result = shell(f"cd {tmp_path} && $DSEARCH {args} --run {target} > {out}")
        assert (result.returncode, result.stderr) == (0, b"")
        assert out.read_text() == saved.read_text() + alone.stdout.decode()  # the whole run, then the metrics
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize("target", ["/dev/stdout", "-"])
def test_eval_run_to_stdout_into_head_ends_quietly(sample_index, target):
    """`dsearch eval … --run /dev/stdout | head -1` said 'error: /dev/stdout: cannot write the run (Broken pipe)',
    exit 1, where the README promises a closed pipe ends quietly with 0."""
    args = f"eval {sample_index} --queries {SAMPLE}/queries.tsv --qrels {SAMPLE}/qrels.txt --run {target} -q"
    result = shell(f'$DSEARCH {args} | head -1; echo "exit ${{PIPESTATUS[0]}}" >&2')
    assert result.stdout.decode().count("\n") == 1 and " Q0 " in result.stdout.decode()
    assert result.stderr == b"exit 0\n"


def _without_numbers(lines: list[str]) -> list[str]:
    """Log lines with their timestamps and timings made alike, to compare two runs' -v lines."""
    import re

    return [re.sub(r"\d+(\.\d+)?", "N", line) for line in lines]


@pytest.mark.parametrize("redirect", ["2>", "2>>"])
def test_eval_run_to_stderr_redirected_to_a_log_keeps_the_log(sample_index, tmp_path, redirect):
    """`dsearch eval … -v --run /dev/stderr 2>log` lost the -v lines: /dev/stderr resolved to the log file, which the
    run replaced (atomically, as a regular file), and the lines logged after it went to the replaced file."""
    log = tmp_path / "log"
    log.write_text("an earlier line\n")
    args = f"eval {sample_index} --queries {SAMPLE}/queries.tsv --qrels {SAMPLE}/qrels.txt --metrics R@10 -v"
    saved = tmp_path / "saved.run"
    alone = shell(f"$DSEARCH {args} --run {saved}")
    assert alone.returncode == 0, alone.stderr
    verbose = alone.stderr.decode().splitlines()
    assert verbose, "eval -v logged nothing to compare with"
    result = shell(f"$DSEARCH {args} --run /dev/stderr {redirect}{log}")
    assert (result.returncode, result.stdout, result.stderr) == (0, alone.stdout, b"")
    text = log.read_text(encoding="utf-8")
    assert "\x00" not in text
    if redirect == "2>>":
        assert text.startswith("an earlier line\n")
        text = text.removeprefix("an earlier line\n")
    run = saved.read_text(encoding="utf-8")
    assert text.count(run) == 1, text  # the whole run, once, between the log lines
    before, after = text.split(run)
    assert _without_numbers((before + after).splitlines()) == _without_numbers(verbose)


def test_eval_run_naming_the_log_stderr_appends_to_keeps_it(sample_index, tmp_path):
    """`--run LOG 2>>LOG` replaced the log with the run, as `--run /dev/stderr` did."""
    log = tmp_path / "log"
    log.write_text("an earlier line\n")
    args = f"eval {sample_index} --queries {SAMPLE}/queries.tsv --qrels {SAMPLE}/qrels.txt --metrics R@10 -v"
    result = shell(f"$DSEARCH {args} --run {log} 2>>{log}")
    assert result.returncode == 0 and result.stdout.startswith(b"R@10\tall\t")
    text = log.read_text(encoding="utf-8")
    assert text.startswith("an earlier line\n")
    assert sum(" Q0 " in line for line in text.splitlines()) > 0
    assert any(" dsearch INFO: " in line for line in text.splitlines())


@pytest.mark.skipif(not FULL.exists(), reason="no /dev/full on this system")
@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("query {idx} 'how hot is venus' -k 2 -f ids -v", 0),
        ("query {idx} 'how hot is venus' --format xml", 2),
        ("query {tmp}/no-such.idx anything", 1),
        ("index /dev/null --format jsonl -o {idx}", 9),
        ("index {sample}/passages.jsonl -o {tmp}/new.idx --no-lexical", 0),
    ],
)
def test_a_stderr_that_cannot_be_written_keeps_the_exit_code(sample_index, tmp_path, command, code):
    """With stderr on a full disk (`2>>/var/log/x` in a cron line), a message that could not be written made the run
    exit 120 (Python's flush of stderr at exit failed) or 1 ('unexpected OSError' raised while saying the error),
    whatever had happened: a published index, a refused one (9), a usage error (2)."""
    args = command.format(idx=sample_index, tmp=tmp_path, sample=SAMPLE)
    status = 'echo "exit $?" >&3'
    result = shell(f"{{ $DSEARCH {args} 2>/dev/full; {status}; }} 3>&2")
    assert result.stderr == f"exit {code}\n".encode()
    if "new.idx" in command:
        assert (tmp_path / "new.idx" / "manifest.json").exists()
        return
    quiet = shell(f"$DSEARCH {args} 2>/dev/null")  # the same run where stderr can be written
    assert (quiet.returncode, result.stdout) == (code, quiet.stdout)


def test_stdout_and_stderr_into_a_pipe_that_closed_end_quietly(sample_index):
    """`dsearch query … -v 2>&1 | head -1`: once head had gone, the -v lines could not be written either, and
    Python's flush of stderr at exit failed: exit 120 instead of 0."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before dsearch writes anything
    try:
        args = [sys.executable, "-m", "dsearch", "query", str(sample_index), "how hot is venus", "-f", "jsonl", "-v"]
        result = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=write, stderr=write, env=ENV, timeout=120)
    finally:
        os.close(write)
    assert result.returncode == 0


def test_runs_in_two_threads_put_back_the_callers_stdout(sample_index, capsys):
    """Two `cli.run` calls overlapping in two threads: the second took the first's stdout proxy for the real
    stdout and put it back when it ended, last, so sys.stdout stayed dsearch's proxy for good (and a write error
    once seen there would fail every later run)."""
    from fakes import HashingEncoder

    from dsearch.cli import Deps, run

    before_out, before_err = sys.stdout, sys.stderr
    second_started, first_done = threading.Event(), threading.Event()

    def first_encoder(name, **options):
        assert second_started.wait(30)
        return HashingEncoder(name)

    def second_encoder(name, **options):
        second_started.set()
        assert first_done.wait(30)
        return HashingEncoder(name)

    codes: dict[str, int] = {}

    def query(name: str, load) -> None:
        deps = Deps(load_encoder=load, stdin=io.BytesIO(b""))
        codes[name] = run(["query", str(sample_index), "how hot is venus", "-k", "1", "-f", "ids"], deps=deps)

    first = threading.Thread(target=query, args=("first", first_encoder))
    second = threading.Thread(target=query, args=("second", second_encoder))
    first.start()
    second.start()
    first.join(60)
    first_done.set()
    second.join(60)
    assert codes == {"first": 0, "second": 0}
    assert sys.stdout is before_out and sys.stderr is before_err
    out, err = capsys.readouterr()
    assert err == "" and len(out.splitlines()) == 2 and len(set(out.splitlines())) == 1


def test_a_closed_pipe_leaves_no_descriptor_open(sample_index, monkeypatch):
    """Every run whose stdout's reader had gone opened /dev/null to silence stdout and never closed it: a program
    calling `dsearch.cli.run` again and again ran out of file descriptors."""
    from fakes import HashingEncoder

    from dsearch.cli import Deps, run

    deps = Deps(load_encoder=lambda name, **options: HashingEncoder(name))
    args = ["query", str(sample_index), "how hot is venus", "-f", "jsonl"]

    def into_a_closed_pipe() -> int:
        read, write = os.pipe()
        os.close(read)
        with open(write, "w", encoding="utf-8") as stream:
            monkeypatch.setattr(sys, "stdout", stream)
            try:
                return run(args, deps=deps)
            finally:
                monkeypatch.undo()

    assert into_a_closed_pipe() == 0  # imports what a query needs, once
    opened = len(os.listdir("/proc/self/fd"))
    assert [into_a_closed_pipe() for _ in range(5)] == [0] * 5
    assert len(os.listdir("/proc/self/fd")) == opened


def _first_batch_while_the_writer_waits(data: bytes) -> list[str] | None:
    """The first batch of queries a reader of stdin hands to the search when a writer has sent ``data`` and keeps
    the pipe open, waiting for answers; None when the batch waited for more input."""
    import fcntl

    from dsearch.search import PipeLines, ReadyIterator, decode_lines, next_batch, queries_from_texts

    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 1 << 18)  # all of ``data`` waits in the pipe, more than one read takes
    os.write(write, data)
    lines = PipeLines(read)
    queries = ReadyIterator(queries_from_texts(decode_lines(lines, "<stdin>")), lines.ready)
    batches: list[list[str]] = []
    reader = threading.Thread(target=lambda: batches.append([q.text for q in next_batch(queries, 256)]))
    reader.start()
    reader.join(5)
    answered = not reader.is_alive()
    os.close(write)  # lets a reader that waited go
    reader.join(30)
    os.close(read)
    return batches[0] if answered else None


@pytest.mark.parametrize(
    ("data", "batch"),
    [
        (b"how hot is venus\nthe red planet\n", ["how hot is venus", "the red planet"]),
        (b"how hot is venus\r\n\r\n  \n\tthe red planet\r\n\n", ["how hot is venus", "the red planet"]),
        (b"how hot is venus\n\xc2\xa0\n", ["how hot is venus"]),  # a line of a no-break space only
        (b"how hot is venus\n\xe3\x80\x80\x1c\n", ["how hot is venus"]),  # ideographic space, a separator
        (b"how hot is venus\nthe red pl", ["how hot is venus"]),  # the next query is still being written
        (b"how hot is venus\n" + b"x" * 100_000, ["how hot is venus"]),  # ... and is longer than one read
    ],
)
def test_a_batch_takes_the_queries_that_arrived_and_never_waits_for_more(data, batch):
    """A coprocess's query waited for the next one when a line that the query reader skips as blank (Unicode
    whitespace: a no-break space, U+3000) or a query not yet written to its end followed it: `ready()` took bytes
    that are not a whole query for one, and the batcher blocked on the pipe."""
    assert _first_batch_while_the_writer_waits(data) == batch


def test_a_query_followed_by_blank_lines_without_end_is_answered():
    """`{ echo QUERY; yes ''; } | dsearch query DIR`: looking past the query for the next one, the reader read blank
    lines for as long as they came, its buffer growing without bound, and the query was never answered."""
    from dsearch.search import PipeLines, ReadyIterator, decode_lines, next_batch, queries_from_texts

    read, write = os.pipe()
    os.write(write, b"how hot is venus\n")

    def blanks() -> None:
        try:
            while True:
                os.write(write, b"\n" * 65536)
        except OSError:  # the reader is gone
            return

    writer = threading.Thread(target=blanks, daemon=True)
    writer.start()
    lines = PipeLines(read)
    queries = ReadyIterator(queries_from_texts(decode_lines(lines, "<stdin>")), lines.ready)
    batches: list[list[str]] = []
    reader = threading.Thread(target=lambda: batches.append([q.text for q in next_batch(queries, 256)]), daemon=True)
    reader.start()
    reader.join(10)
    answered = not reader.is_alive()
    os.close(read)  # ends the writer (EPIPE) and a reader still reading (EBADF)
    writer.join(30)
    reader.join(30)
    os.close(write)
    assert answered and batches == [["how hot is venus"]]
    assert len(lines.buffer) < 1 << 20


@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_queries_on_stdin_before_a_line_that_is_not_utf8_are_answered(cli, sample_index, mode):
    """Queries that arrived with a bad line after them were lost or answered depending on timing: a batch of
    them was dropped when the bad line came in the same read, answered when it came a moment later."""
    stdin = b"how hot is venus\nthe red planet\n\xff\xfe bad\nvolcano\n"
    result = cli("query", sample_index, "-k", "1", "-f", "trec", "--mode", mode, stdin=stdin)
    assert result.exit_code == 1
    assert [line.split(" ")[0] for line in result.stdout.splitlines()] == ["1", "2"]
    assert result.stderr == "dsearch: error: <stdin>:3: not valid UTF-8 (send the queries in UTF-8)\n"


def test_query_dash_reads_queries_typed_at_a_terminal(sample_index):
    """`dsearch query DIR -` at a terminal said 'no query given … pipe queries on stdin', where the README says
    queries come from stdin when the only one is '-', from a pipe or a terminal."""
    import pty
    import select

    master, slave = pty.openpty()
    args = [sys.executable, "-m", "dsearch", "query", str(sample_index), "-k", "1", "-f", "ids"]
    typed = subprocess.Popen([*args, "-"], stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    bare = subprocess.run(args, stdin=slave, capture_output=True, env=ENV, timeout=120)
    os.close(slave)
    try:
        os.write(master, b"how hot is venus\n")
        readable, _, _ = select.select([typed.stdout], [], [], 60)
        assert readable, "no answer to a query typed at the terminal"
        answer = typed.stdout.readline()
        os.write(master, b"\x04")  # Ctrl-D: the end of the input
        assert typed.wait(timeout=60) == 0
        assert typed.stdout.read() == b"" and typed.stderr.read() == b""
    finally:
        typed.kill()
        typed.wait()
        os.close(master)
    expected = shell(f"$DSEARCH query {sample_index} 'how hot is venus' -k 1 -f ids")
    assert answer == expected.stdout and answer.strip()
    assert bare.returncode == 2 and b"no query given" in bare.stderr  # no '-': refused, as it was


@pytest.mark.parametrize(
    "args",
    [["--version"], ["--help"], ["query", "--help"], ["query", "{idx}", "how hot is venus", "-f", "trec"]],
)
def test_help_and_version_into_a_closed_pipe_end_quietly_with_success(sample_index, args):
    """`dsearch --help | head -0` (or `--version`, `query --help`) exited 1: Click met the closed pipe before any
    command ran and answered it with its own exit 1, where every command ends quietly with 0."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before dsearch writes anything
    try:
        command = [sys.executable, "-m", "dsearch", *(a.format(idx=sample_index) for a in args)]
        result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=write, stderr=subprocess.PIPE, env=ENV)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (0, b"")


def test_a_non_blocking_stdout_gets_every_line(sample_index):
    """A parent that left the shared pipe non-blocking (O_NONBLOCK: Node.js, some CI log collectors) got the first
    64 KiB of the results and exit 0: once the pipe was full, writes failed with EAGAIN inside Python's buffers and
    the rest was dropped without a word."""
    import fcntl
    import termios
    import time

    args = ["query", str(sample_index), "--queries", str(SAMPLE / "queries.tsv"), "-k", "200", "-f", "jsonl"]
    expected = subprocess.run([sys.executable, "-m", "dsearch", *args], capture_output=True, env=ENV, timeout=120)
    assert expected.returncode == 0 and len(expected.stdout) > 4 * 65536
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETFL, fcntl.fcntl(write, fcntl.F_GETFL) | os.O_NONBLOCK)
    child = subprocess.Popen([sys.executable, "-m", "dsearch", *args], stdout=write, stderr=subprocess.PIPE, env=ENV)
    os.close(write)
    try:
        waiting = bytearray(4)
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:  # until the pipe is full: the writer must wait
            fcntl.ioctl(read, termios.FIONREAD, waiting)
            if int.from_bytes(waiting, sys.byteorder) >= 60_000:
                break
            time.sleep(0.05)
        time.sleep(0.5)
        received = bytearray()
        while chunk := os.read(read, 1 << 16):
            received += chunk
        assert child.wait(timeout=60) == 0
        assert child.stderr.read() == b""
    finally:
        child.kill()
        child.wait()
        os.close(read)
    assert bytes(received) == expected.stdout


@pytest.mark.parametrize("option", [[], ["--json"]])
def test_status_into_a_closed_pipe_keeps_its_exit_code(tmp_path, option):
    """`dsearch status DIR | true` exited 0 when the reader had gone before the line was written: a missing or
    corrupt index read as healthy to a script checking the exit code. The line is for the reader; the code is the
    check's."""
    read, write = os.pipe()
    os.close(read)
    try:
        command = [sys.executable, "-m", "dsearch", "status", str(tmp_path / "no-such.idx"), *option]
        result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=write, stderr=subprocess.PIPE, env=ENV)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (5, b"")


def test_queries_on_a_non_blocking_stdin_are_all_answered(sample_index):
    """A parent that left stdin non-blocking (O_NONBLOCK, set on the terminal that stdin and stdout share, or on a
    pipe by Node.js) made the first read before a query had arrived fail: 'unexpected BlockingIOError', exit 1, and
    no query answered. stdout already waits on such a descriptor (streams.PatientWriter); stdin must wait too."""
    import fcntl
    import time

    args = [sys.executable, "-m", "dsearch", "query", str(sample_index), "-k", "1", "-f", "ids"]
    expected = subprocess.run(args, input=b"how hot is venus\nthe red planet\n", capture_output=True, env=ENV)
    assert expected.returncode == 0 and expected.stdout.count(b"\n") == 2
    read, write = os.pipe()
    fcntl.fcntl(read, fcntl.F_SETFL, fcntl.fcntl(read, fcntl.F_GETFL) | os.O_NONBLOCK)
    child = subprocess.Popen(args, stdin=read, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    os.close(read)
    try:
        for query in (b"how hot is venus\n", b"the red planet\n"):
            time.sleep(1.0)  # the child finds the pipe empty first, and again between the queries
            with contextlib.suppress(BrokenPipeError):  # a child that failed is gone: its exit code says so
                os.write(write, query)
        os.close(write)
        write = -1
        out, err = child.communicate(timeout=60)
    finally:
        if write >= 0:
            os.close(write)
        child.kill()
        child.wait()
    assert (child.returncode, err) == (0, b"")
    assert out == expected.stdout


def _run_on_a_non_blocking_stdin(args: list[str], data: bytes) -> subprocess.CompletedProcess[bytes]:
    """``dsearch ARGS`` with a stdin pipe that is non-blocking and still empty when dsearch first reads it."""
    import fcntl
    import time

    read, write = os.pipe()
    fcntl.fcntl(read, fcntl.F_SETFL, fcntl.fcntl(read, fcntl.F_GETFL) | os.O_NONBLOCK)
    command = [sys.executable, "-m", "dsearch", *args]
    child = subprocess.Popen(command, stdin=read, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    os.close(read)
    try:
        time.sleep(1.5)  # dsearch has started and found the pipe empty
        with contextlib.suppress(BrokenPipeError):  # a child that failed is gone: its exit code says so
            os.write(write, data)
    finally:
        os.close(write)
    out, err = child.communicate(timeout=120)
    return subprocess.CompletedProcess(command, child.returncode, out, err)


def test_a_queries_file_on_a_non_blocking_stdin_is_read_whole(sample_index):
    """`--queries -` on a stdin left non-blocking read nothing (Python's read() gives None there) and failed with
    '<stdin>: cannot read the queries file (No such file or directory)'."""
    args = ["query", str(sample_index), "--queries", "-", "-k", "1", "-f", "ids"]
    data = (SAMPLE / "queries.tsv").read_bytes()
    expected = subprocess.run([sys.executable, "-m", "dsearch", *args], input=data, capture_output=True, env=ENV)
    assert expected.returncode == 0 and expected.stdout
    result = _run_on_a_non_blocking_stdin(args, data)
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == expected.stdout


def test_passages_on_a_non_blocking_stdin_are_all_indexed(tmp_path):
    """`dsearch index -` on a stdin left non-blocking read no passage ('- gave no passages', exit 1): an --update
    of an index built from a pipe would find nothing to keep."""
    data = (SAMPLE / "passages.jsonl").read_bytes()
    result = _run_on_a_non_blocking_stdin(["index", "-", "-o", str(tmp_path / "idx"), "--format", "jsonl", "-q"], data)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    info = subprocess.run([sys.executable, "-m", "dsearch", "info", str(tmp_path / "idx"), "--json"],
                          capture_output=True, env=ENV)  # fmt: skip
    assert json.loads(info.stdout)["passages"] == data.count(b"\n")


def test_eval_run_to_a_non_blocking_stderr_is_written_whole(sample_index, tmp_path):
    """`eval --run /dev/stderr` into a pipe that a parent left non-blocking wrote its first 64 KiB, then failed
    with '/dev/stderr: cannot write the run (write could not complete without blocking)', exit 1: the run went
    through a plain copy of stderr's descriptor, not through the stream that waits for the reader."""
    import fcntl
    import time

    args = [f"{sample_index}", "--queries", f"{SAMPLE}/queries.tsv", "--qrels", f"{SAMPLE}/qrels.txt", "-k", "200"]
    saved = tmp_path / "saved.run"
    alone = subprocess.run([sys.executable, "-m", "dsearch", "eval", *args, "--run", str(saved)], capture_output=True,
                           env=ENV)  # fmt: skip
    assert alone.returncode == 0 and saved.stat().st_size > 65536  # more than a pipe holds
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETFL, fcntl.fcntl(write, fcntl.F_GETFL) | os.O_NONBLOCK)
    command = [sys.executable, "-m", "dsearch", "eval", *args, "--run", "/dev/stderr"]
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=write, env=ENV)
    os.close(write)
    try:
        time.sleep(3)  # the run fills the pipe: dsearch must wait for the reader
        received = bytearray()
        while chunk := os.read(read, 1 << 16):
            received += chunk
        out = child.stdout.read()
        assert child.wait(timeout=60) == 0, bytes(received[-300:])
    finally:
        child.kill()
        child.wait()
        os.close(read)
    assert (out, bytes(received)) == (alone.stdout, saved.read_bytes())
