"""Adversarial cases found after issues 9 and 10 landed: hostile files inside DIR, damaged manifests, odd inputs."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE
from test_cli import one_error_line
from test_split import long_corpus

from dsearch.store import OpenIndex


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- DIR/.dsearch.lock that dsearch did not write ------------------------------------------------------


def plant_lock(index: Path, kind: str, victim: Path) -> None:
    lock = index / ".dsearch.lock"
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "dangling symlink":
        lock.symlink_to(victim.parent / "nowhere")
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "fifo", "folder"])
def test_a_lock_path_that_is_not_a_regular_file_is_refused_and_left_alone(tmp_path, cli, kind):
    index = tmp_path / "idx"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    victim = tmp_path / "precious.txt"
    victim.write_text("precious\n")
    plant_lock(index, kind, victim)
    before = listing(index)

    one_error_line(cli("index", SAMPLE / "passages.jsonl", "-o", index), 1, ".dsearch.lock", "nothing was changed")

    assert victim.read_text() == "precious\n"  # never truncated through the symlink
    assert listing(index) == before  # the planted entry is still there, nothing else was added
    assert not (tmp_path / "nowhere").exists()
    assert OpenIndex(index, verify=True).rows == 200


def test_status_does_not_hang_on_a_fifo_where_the_lock_goes(tmp_path, cli):
    index = tmp_path / "idx"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    os.mkfifo(index / ".dsearch.lock")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "dsearch", "status", str(index)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ok: {index}: 200 passages")


# --- DIR/.manifest.json.tmp that dsearch did not write -------------------------------------------------


@pytest.mark.parametrize("dangling", [True, False])
def test_a_symlink_at_the_manifest_temp_name_never_sends_the_manifest_outside_dir(tmp_path, cli, dangling):
    index = tmp_path / "idx"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    victim = tmp_path / "victim.txt"
    if not dangling:
        victim.write_text("precious\n")
    (index / ".manifest.json.tmp").symlink_to(victim)

    result = cli("index", SAMPLE / "passages.jsonl", "-o", index)

    assert result.exit_code == 0, result.stderr
    assert victim.read_text() == "precious\n" if not dangling else not victim.exists()
    manifest = index / "manifest.json"
    assert manifest.is_file() and not manifest.is_symlink()
    assert listing(index) == ["manifest.json", *[n for n in listing(index) if n.startswith("seg-")]]
    assert OpenIndex(index, verify=True).rows == 200


def test_a_folder_at_the_manifest_temp_name_is_refused_before_encoding(tmp_path, cli):
    index = tmp_path / "idx"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    (index / ".manifest.json.tmp").mkdir()
    before = listing(index)
    cli.loaded.clear()
    one_error_line(cli("index", SAMPLE / "passages.jsonl", "-o", index), 1, ".manifest.json.tmp", "nothing was changed")
    assert cli.loaded == [] and listing(index) == before


# --- passages, not windows ------------------------------------------------------------------------------


def test_status_counts_passages_of_a_split_index_as_info_does(tmp_path, cli):
    index = tmp_path / "idx"
    assert cli("index", long_corpus(tmp_path / "long.jsonl"), "-o", index).exit_code == 0
    info = json.loads(cli("info", index, "--json").stdout)
    assert info["passages"] == 10 and info["rows"] > 10  # the premise: split into windows
    status = cli("status", index)
    assert status.exit_code == 0 and status.stdout.startswith(f"ok: {index}: 10 passages, built ")
    assert json.loads(cli("status", index, "--json").stdout)["passages"] == 10


@pytest.mark.parametrize("value", ["ten", [10], True, -3, 0, 10**9])
def test_a_damaged_passage_count_in_the_manifest_is_corruption_not_a_crash(tmp_path, cli, value):
    index = tmp_path / "idx"
    assert cli("index", long_corpus(tmp_path / "long.jsonl"), "-o", index).exit_code == 0
    manifest = index / "manifest.json"
    data = json.loads(manifest.read_text())
    data["stats"]["passages"] = value
    manifest.write_text(json.dumps(data))
    one_error_line(cli("info", index), 1, "manifest", "passages", "rebuild the index")
    one_error_line(cli("query", index, "zanzibar"), 1, "manifest", "rebuild the index")
    status = cli("status", index)
    assert status.exit_code == 6 and status.stdout.startswith("corrupt: ") and status.stderr == ""


# --- manifest fields that lead into the model cache or switch checks off ---------------------------------

MODEL_MANGLES = {
    "fingerprint out of the cache": ("model", "fingerprint", "../../evil"),
    "absolute fingerprint": ("model", "fingerprint", "/tmp/evil"),
    "unknown similarity": ("model", "similarity", "euclid"),  # would switch off the impossible-score check
    "precision not text": ("model", "precision", 5),
    "prompts not an object": ("model", "prompts", "query: "),
    "prompt not text": ("model", "prompts", {"query": 5}),
    "max_seq_length not a number": ("model", "max_seq_length", "256"),
    "sources not a list": ("corpus", "sources", "corpus.jsonl"),
    "source without a path": ("corpus", "sources", [{"files": 1}]),
    "split not an object": ("corpus", "split", "yes"),  # --update made a SplitSpec of it: unexpected TypeError
    "split overlap negative": ("corpus", "split", {"overlap": -5}),
}


@pytest.mark.parametrize("mangle", list(MODEL_MANGLES))
def test_a_manifest_model_or_corpus_field_of_the_wrong_shape_is_corruption(tmp_path, cli, mangle):
    index = tmp_path / "idx"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    section, key, value = MODEL_MANGLES[mangle]
    manifest = index / "manifest.json"
    data = json.loads(manifest.read_text())
    data[section][key] = value
    manifest.write_text(json.dumps(data))
    cli.loaded.clear()
    one_error_line(cli("query", index, "volcano"), 1, "manifest", key, "rebuild the index")
    assert cli.loaded == []  # refused before any model is looked for
    one_error_line(cli("info", index), 1, "manifest", key)
    status = cli("status", index, "--json")
    assert status.exit_code == 6 and json.loads(status.stdout)["status"] == "corrupt"  # never "ok"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0  # a rebuild repairs it
    assert cli("status", index).exit_code == 0


# --- terminal width -----------------------------------------------------------------------------------


def test_a_table_with_columns_0_still_shows_the_hits(cli, sample_index, monkeypatch):
    monkeypatch.setenv("COLUMNS", "0")  # also what some containers' terminals report
    result = cli("query", sample_index, "volcano", "-k", "2", "-f", "table")
    assert result.exit_code == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "[1] volcano" and len(lines) >= 5
    assert all(len(line) <= 80 for line in lines)  # laid out for 80 columns, the documented fallback
    ids = cli("query", sample_index, "volcano", "-k", "2", "-f", "ids").stdout.split()
    assert all(any(i in line for line in lines) for i in ids)
    shown = cli("get", sample_index, ids[0], "-f", "table")
    assert shown.exit_code == 0 and ids[0] in shown.stdout


# --- eval --run must not replace its own inputs ----------------------------------------------------------


@pytest.mark.parametrize("which", ["--qrels", "--queries", "symlink to --qrels"])
def test_eval_run_naming_an_input_file_is_refused_and_the_input_kept(tmp_path, cli, sample_index, which):
    queries, qrels = tmp_path / "queries.tsv", tmp_path / "qrels.txt"
    queries.write_bytes((SAMPLE / "queries.tsv").read_bytes())
    qrels.write_bytes((SAMPLE / "qrels.txt").read_bytes())
    run = {"--qrels": qrels, "--queries": queries}.get(which)
    if run is None:
        run = tmp_path / "link"
        run.symlink_to(qrels)
    flag = "--queries" if which == "--queries" else "--qrels"
    cli.loaded.clear()
    one_error_line(
        cli("eval", sample_index, "--queries", queries, "--qrels", qrels, "--run", run), 2, f"the {flag} file"
    )
    assert cli.loaded == []  # refused before any query ran
    assert queries.read_bytes() == (SAMPLE / "queries.tsv").read_bytes()
    assert qrels.read_bytes() == (SAMPLE / "qrels.txt").read_bytes()


@pytest.mark.parametrize("name", ["manifest.json", "SEG/index.faiss", "SEG/passages.parquet", "link to manifest"])
def test_eval_run_naming_a_file_of_the_index_is_refused_and_the_index_kept(tmp_path, cli, sample_index, name):
    """--run DIR/manifest.json replaced the manifest with a TREC run: the index was gone (status: corrupt)."""
    seg = next(sample_index.glob("seg-*")).name
    run = sample_index / name.replace("SEG", seg)
    if name == "link to manifest":
        run = tmp_path / "run.trec"
        run.symlink_to(sample_index / "manifest.json")
    before = {p: p.read_bytes() for p in sample_index.rglob("*") if p.is_file()}
    cli.loaded.clear()
    inputs = ("--queries", SAMPLE / "queries.tsv", "--qrels", SAMPLE / "qrels.txt")
    result = cli("eval", sample_index, *inputs, "--run", run)
    one_error_line(result, 2, f"--run {run}", "a file of the index", "another path")
    assert cli.loaded == []  # refused before any query ran
    assert {p: p.read_bytes() for p in sample_index.rglob("*") if p.is_file()} == before
    assert cli("status", sample_index).exit_code == 0


# --- -o paths that cannot be a directory ----------------------------------------------------------------


@pytest.mark.parametrize("below", ["idx", "a/b/idx"])
def test_o_below_a_file_is_one_line_not_an_unexpected_error(tmp_path, cli, below):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder\n")
    target = a_file / below
    one_error_line(
        cli("index", SAMPLE / "passages.jsonl", "-o", target), 1, str(target), "is a file, not a folder", "another -o"
    )
    assert a_file.read_text() == "not a folder\n" and listing(tmp_path) == ["notes.txt"]


# --- empty paths: an unset shell variable in a cron line --------------------------------------------------


def test_an_empty_o_is_a_usage_error_not_the_current_folder(tmp_path, cli, monkeypatch):
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)  # empty, so before the fix the index was built right here
    one_error_line(cli("index", SAMPLE / "passages.jsonl", "-o", ""), 2, "'-o' / '--output'", "empty path")
    assert listing(here) == []


@pytest.mark.parametrize(
    "args",
    [
        ("query", "", "volcano"),
        ("get", "", "x"),
        ("info", ""),
        ("status", ""),
        ("status", "IDX", "--corpus", ""),
        ("index", "", "-o", "OUT"),
        ("eval", "IDX", "--queries", "", "--qrels", "QRELS"),
        ("eval", "IDX", "--queries", "QUERIES", "--qrels", "QRELS", "--run", ""),
    ],
)
def test_every_empty_path_argument_is_a_usage_error(tmp_path, cli, sample_index, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    names = {"IDX": str(sample_index), "OUT": str(tmp_path / "out"), "QRELS": str(SAMPLE / "qrels.txt")}
    names["QUERIES"] = str(SAMPLE / "queries.tsv")
    result = cli(*(names.get(a, a) for a in args))
    one_error_line(result, 2, "empty path")
    assert not (tmp_path / "out").exists() and not (tmp_path / "manifest.json").exists()


def test_get_ids_on_stdin_that_are_not_utf8_are_called_ids(cli, sample_index):
    result = cli("get", sample_index, "-", "-f", "ids", stdin=b"astronomy-17\n\xff\n")
    one_error_line(result, 1, "<stdin>:2", "not valid UTF-8", "send the ids in UTF-8")
    assert "queries" not in result.stderr


@pytest.mark.parametrize("below", ["", "sub"])
def test_o_through_a_dangling_symlink_creates_nothing_and_says_so(tmp_path, cli, below):
    mount = tmp_path / "mnt" / "disk"  # say, a disk that is not mounted
    link = tmp_path / "idx"
    link.symlink_to(mount)
    target = link / below if below else link
    one_error_line(
        cli("index", SAMPLE / "passages.jsonl", "-o", target), 1, "a symlink to", "nothing was changed", "another -o"
    )
    assert not (tmp_path / "mnt").exists() and link.is_symlink()


# --- a manifest.json that is not a regular file ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_a_manifest_that_is_a_fifo_or_device_is_corrupt_not_a_hang(tmp_path, kind):
    index = tmp_path / "idx"
    index.mkdir()
    if kind == "fifo":
        os.mkfifo(index / "manifest.json")
    else:
        (index / "manifest.json").symlink_to(kind)  # reading it would never end
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for command, code in (("status", 6), ("query", 1), ("info", 1)):
        args = [sys.executable, "-m", "dsearch", command, str(index)] + (["volcano"] if command == "query" else [])
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == code, (command, done.stderr)
        out = done.stdout if command == "status" else done.stderr
        assert "manifest.json: not a regular file" in out and out.count("\n") == 1


@pytest.mark.parametrize("age", ["", "-1d", "nan", "nanh"])
def test_a_max_age_that_would_switch_the_check_off_is_a_usage_error(cli, sample_index, age):
    # An unset variable gave '' and NaN compared false: both said "ok" for an index of any age.
    one_error_line(cli("status", sample_index, "--max-age", age), 2, "--max-age", "not a duration")


# --- query ids in a BEIR queries.jsonl -------------------------------------------------------------------


@pytest.mark.parametrize("qid", ["", "  ", {"a": 1}, [1], True, float("nan"), float("inf")])
def test_a_queries_jsonl_id_that_cannot_be_a_qid_is_an_error_naming_the_line(tmp_path, cli, sample_index, qid):
    queries = tmp_path / "queries.jsonl"  # (json.dumps writes NaN and Infinity, which Python's JSON reads back)
    queries.write_text(json.dumps({"_id": "q1", "text": "volcano"}) + "\n" + json.dumps({"_id": qid, "text": "lava"}))
    one_error_line(cli("query", sample_index, "--queries", queries, "-f", "trec"), 1, "queries.jsonl:2", "query id")


def test_a_queries_jsonl_id_may_be_a_number(tmp_path, cli, sample_index):
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"_id": 7, "text": "volcano"}) + "\n")
    result = cli("query", sample_index, "--queries", queries, "-f", "trec", "-k", "1")
    assert result.exit_code == 0 and result.stdout.startswith("7 Q0 ") and result.stderr == ""


# --- status's command for an index built from stdin --------------------------------------------------------


def test_status_of_an_index_built_from_stdin_gives_an_update_command_with_a_corpus(tmp_path, cli):
    index = tmp_path / "idx"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes((SAMPLE / "passages.jsonl").read_bytes())
    assert cli("index", "-", "-o", index, stdin=corpus.read_bytes()).exit_code == 0
    status = cli("status", index, "--corpus", corpus)
    assert status.exit_code == 8 and status.stderr == ""
    command = status.stdout.split("; run '", 1)[1].rstrip("'\n")
    assert command == shlex.join(["dsearch", "index", str(corpus), "-o", str(index), "--update"])
    result = cli(*shlex.split(command)[1:])  # the command it prints works as printed
    assert result.exit_code == 0, result.stderr


def test_a_field_type_in_the_manifest_cannot_smuggle_sql_into_where(tmp_path, cli):
    """--where pastes each recorded field type into SQL: a manifest type that is SQL is corruption, not run."""
    corpus = tmp_path / "c.jsonl"
    rows = ({"id": f"d{i}", "text": f"text {i}", "year": 2000 + i} for i in range(5))
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    index = tmp_path / "idx"
    assert cli("index", corpus, "-o", index).exit_code == 0
    planted = tmp_path / "planted.csv"
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["corpus"]["field_types"] == {"year": "BIGINT"}
    manifest["corpus"]["field_types"]["year"] = f"BIGINT) AS year FROM stored; COPY (SELECT 1) TO '{planted}'; --"
    (index / "manifest.json").write_text(json.dumps(manifest))
    result = cli("query", index, "text", "--where", "year > 2001", "-f", "ids")
    one_error_line(result, 1, "field_types")
    assert not planted.exists()
    assert cli("status", index).exit_code == 6


# --- symlink loops and names too long: one line, never "unexpected ... report it" -------------------------


@pytest.fixture
def loop(tmp_path) -> Path:
    """``loop`` -> ``loop2`` -> ``loop``: what a mistyped ``ln -s`` in a cron setup leaves."""
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    return tmp_path / "loop"


def test_a_corpus_that_is_a_symlink_loop_is_one_line_and_the_index_kept(tmp_path, cli, sample_index, loop):
    before = cli("query", sample_index, "northern lights", "-f", "ids").stdout
    for extra in ([], ["--update"]):
        result = cli("index", loop, "-o", sample_index, *extra)
        one_error_line(result, 1, str(loop), "symlink", "Too many levels of symbolic links", "fix the link")
        assert "unexpected" not in result.stderr
        assert cli("query", sample_index, "northern lights", "-f", "ids").stdout == before
    new = tmp_path / "new.idx"
    one_error_line(cli("index", loop, "-o", new), 1, "symlink")
    assert not new.exists()


def test_status_with_a_corpus_that_is_a_symlink_loop_says_corpus_changed(cli, sample_index, loop):
    result = cli("status", sample_index, "--corpus", loop)
    assert (result.exit_code, result.stderr) == (8, "")
    assert result.stdout.startswith(f"corpus-changed: {loop} ")


@pytest.mark.parametrize("below", ["idx", "a/b/idx"])
def test_o_through_a_symlink_loop_is_one_line_and_creates_nothing(tmp_path, cli, loop, below):
    result = cli("index", SAMPLE / "passages.jsonl", "-o", loop / below)
    one_error_line(result, 1, str(loop / below), "Too many levels of symbolic links", "another -o")
    assert listing(tmp_path) == ["loop", "loop2"]


def test_an_o_name_too_long_is_one_line(tmp_path, cli):
    target = tmp_path / ("x" * 300)
    one_error_line(cli("index", SAMPLE / "passages.jsonl", "-o", target), 1, "too long", "another -o")
    assert listing(tmp_path) == []


# --- a file size limit (ulimit -f) or a full disk while writing -------------------------------------------


@pytest.fixture
def file_size_limit():
    """Sets RLIMIT_FSIZE of this process (None: as it was); Python ignores SIGXFSZ, so a write past it is EFBIG."""
    import resource

    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    yield lambda size: resource.setrlimit(resource.RLIMIT_FSIZE, (before[0] if size is None else size, before[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, before)


def test_a_build_past_the_file_size_limit_is_one_line_and_publishes_nothing(tmp_path, cli, file_size_limit):
    target = tmp_path / "idx"
    file_size_limit(20_000)  # the vectors alone are 200 x 64 x 4 = 51 kB
    result = cli("index", SAMPLE / "passages.jsonl", "-o", target)
    file_size_limit(None)
    one_error_line(result, 1, "File too large", "nothing was published", "ulimit -f")
    assert not target.exists()


def test_the_lexical_index_past_the_file_size_limit_is_one_line_and_keeps_the_vectors(tmp_path, cli, file_size_limit):
    """numpy's tofile reports a short write as 'OSError: N requested and M written', without the errno: the build
    failed with 'unexpected OSError ... report it' while writing the BM25 index, after every vector was encoded."""
    import random

    rng = random.Random(1)
    rows = ({"id": f"p{i}", "text": " ".join(f"w{rng.randrange(1000)}" for _ in range(37))} for i in range(1000))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    target = tmp_path / "idx"
    file_size_limit(300_000)  # the vectors are 1000 x 64 x 4 = 256 kB; the BM25 build's temporary triples 430 kB
    result = cli("index", corpus, "-o", target)
    file_size_limit(None)
    one_error_line(result, 1, "File too large", "nothing was published", "ulimit -f", "the encoded vectors are kept")
    assert "unexpected" not in result.stderr
    rerun = cli("index", corpus, "-o", target, "--json")
    assert rerun.exit_code == 0, rerun.stderr
    assert (json.loads(rerun.stdout)["resumed_at"], json.loads(rerun.stdout)["encoded"]) == (1000, 0)
    assert cli("status", target).exit_code == 0


def test_a_reindex_past_the_file_size_limit_is_one_line_and_leaves_no_half_written_file(
    cli, sample_index, file_size_limit
):
    before = listing(next(sample_index.glob("seg-*")))
    file_size_limit(40_000)  # the HNSW file holds the 51 kB of vectors and the graph
    result = cli("reindex", sample_index, "--index-type", "hnsw")
    file_size_limit(None)
    one_error_line(result, 1, "ann-", "File too large", "ulimit -f")
    assert listing(next(sample_index.glob("seg-*"))) == before  # no half-written ANN file
    assert cli("status", sample_index).exit_code == 0
    assert cli("reindex", sample_index, "--index-type", "hnsw").exit_code == 0  # and with room, it works


# --- Parquet files damaged in place (same size): undetected until read, then one line ----------------------


@pytest.mark.parametrize("name", ["passages.parquet", "fields.parquet"])
def test_a_parquet_file_damaged_in_place_is_one_line_wherever_it_is_read(tmp_path, cli, sample_index, name):
    """A flipped byte keeps the size, so only checksums (status, info --verify) see it; a query that reads the
    page gets one line naming the damage (it was 'unexpected OSError/IndexError/KeyError ... report it', or an
    error message of several lines from pyarrow's)."""
    seg = next(sample_index.glob("seg-*"))
    size = (seg / name).stat().st_size
    reads = [
        ("query", "northern lights", "-f", "ids", "--where", "topic = 'physics and chemistry'"),
        ("query", "northern lights", "-f", "jsonl", "-k", "200"),
        ("get", "astronomy-17", "physics-05", "-f", "jsonl"),
    ]
    failed = 0
    for offset in range(0, size, size // 40):
        damaged = tmp_path / f"idx-{offset}"
        shutil.copytree(sample_index, damaged)
        path = damaged / seg.name / name
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
        for args in reads:
            result = cli(args[0], damaged, *args[1:])
            if result.exit_code == 0:
                continue  # a byte no read decodes (or one decoded to another valid value: status finds it)
            failed += 1
            one_error_line(result, 1, str(damaged / seg.name))
            assert "unexpected" not in result.stderr, (offset, args, result.stderr)
        assert cli("status", damaged).exit_code == 6
        shutil.rmtree(damaged)
    assert failed > 10  # the damage was seen, not skipped


# --- status prints one line, whatever the paths hold -------------------------------------------------------


def test_status_is_one_line_when_the_corpus_path_holds_a_newline_and_its_command_still_runs(tmp_path, cli):
    """A corpus folder named with a newline split the status line (and its 'run ...' command) in two, so a
    monitor reading one line got half a message; an ESC in the name reached the terminal raw."""
    corpus = tmp_path / "new\nline\x1b[31m"
    corpus.mkdir()
    (corpus / "c.jsonl").write_bytes((SAMPLE / "passages.jsonl").read_bytes())
    index = tmp_path / "idx"
    assert cli("index", corpus, "-o", index).exit_code == 0
    with open(corpus / "c.jsonl", "a") as fh:
        fh.write('{"id": "new-1", "text": "aurora borealis"}\n')
    status = cli("status", index)
    assert status.exit_code == 8 and status.stderr == ""
    assert status.stdout.count("\n") == 1 and "\x1b" not in status.stdout
    assert status.stdout.startswith("corpus-changed: ")
    command = status.stdout.split("; run '", 1)[1][:-2]  # what the line says to run, as a shell reads it
    run = subprocess.run(["bash", "-c", f"printf '%s\\0' {command}"], capture_output=True, check=True)
    words = run.stdout.decode().split("\0")[:-1]
    assert words == ["dsearch", "index", str(corpus), "-o", str(index), "--update"]


# --- an index the user cannot write to ---------------------------------------------------------------------


@pytest.fixture
def unwritable_lock(monkeypatch):
    """Opening DIR/.dsearch.lock fails as it does on a read-only mount (EROFS) or, for a cron user without
    write permission on DIR, EACCES (which root, running these tests, never gets from chmod)."""
    import errno

    import dsearch.store

    real_open = os.open
    code = {"errno": errno.EROFS}

    def open_(path, flags, *args, **kwargs):
        if os.path.basename(path) == ".dsearch.lock" and flags & os.O_CREAT:
            raise OSError(code["errno"], os.strerror(code["errno"]), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(dsearch.store.os, "open", open_)
    return code


@pytest.mark.parametrize("errno_name", ["EROFS", "EACCES"])
@pytest.mark.parametrize("command", ["index", "update", "reindex"])
def test_an_index_on_a_read_only_or_unwritable_folder_says_so_not_that_a_lock_is_planted(
    cli, sample_index, unwritable_lock, errno_name, command
):
    """It said '.dsearch.lock: a symlink, folder or special file ... remove it if it is not yours': there is no
    such file, and the user went looking for it."""
    import errno

    unwritable_lock["errno"] = getattr(errno, errno_name)
    args = {
        "index": ("index", SAMPLE / "passages.jsonl", "-o", sample_index),
        "update": ("index", SAMPLE / "passages.jsonl", "-o", sample_index, "--update"),
        "reindex": ("reindex", sample_index, "--index-type", "hnsw"),
    }[command]
    result = cli(*args)
    one_error_line(result, 1, ".dsearch.lock", os.strerror(getattr(errno, errno_name)))
    assert "remove it if it is not yours" not in result.stderr and "symlink" not in result.stderr


def _unreadable(path: Path) -> list[str]:
    """A command prefix that runs without root's power to read anything (CAP_DAC_OVERRIDE), so that a file with
    mode 000 is unreadable as it is to a cron user; [] when this machine cannot drop it."""
    if os.geteuid() != 0:
        return []
    probe = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "cat", str(path)],
        capture_output=True,
    )
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"] if probe.returncode else []


@pytest.mark.parametrize("which", ["DIR", "index.faiss", "passages.parquet", "bm25.json", "fields.parquet"])
def test_status_of_an_index_it_may_not_read_is_broken_not_an_unexpected_error(tmp_path, cli, which):
    """'unexpected PermissionError ... report it' (exit 1) where a monitor needs a status: an index that its
    readers cannot read is broken (exit 6), and the line says which file and to check its permissions."""
    index = tmp_path / "idx"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    target = index if which == "DIR" else next(index.glob("seg-*")) / which
    target.chmod(0)
    try:
        prefix = _unreadable(target) if os.geteuid() == 0 else []
        if os.geteuid() == 0 and not prefix:
            pytest.skip("root that cannot drop CAP_DAC_OVERRIDE reads any file")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        command = [*prefix, sys.executable, "-m", "dsearch", "status", str(index)]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert (result.returncode, result.stderr) == (6, ""), result.stderr
        assert result.stdout.startswith("corrupt: ") and result.stdout.count("\n") == 1
        assert "Permission denied" in result.stdout and "check its permissions" in result.stdout
    finally:
        target.chmod(0o755 if which == "DIR" else 0o644)


@pytest.mark.parametrize("update", [True, False])
def test_a_corpus_subfolder_it_may_not_read_stops_the_run_instead_of_dropping_its_passages(tmp_path, cli, update):
    """os.walk skipped a folder it could not list: an --update removed that folder's passages (half the index,
    within --max-remove's default) and exited 0."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    lines = (SAMPLE / "passages.jsonl").read_text().splitlines(keepends=True)
    (corpus / "a.jsonl").write_text("".join(lines[:100]))
    (corpus / "sub" / "b.jsonl").write_text("".join(lines[100:]))
    index = tmp_path / "idx"
    assert cli("index", corpus, "-o", index, "--no-lexical").exit_code == 0
    (corpus / "sub").chmod(0)
    try:
        prefix = _unreadable(corpus / "sub")
        if os.geteuid() == 0 and not prefix:
            pytest.skip("root that cannot drop CAP_DAC_OVERRIDE reads any folder")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
            "DSEARCH_TEST_ENCODER": "fakes:hashing_encoder",
        }
        args = ["index", str(corpus), "-o", str(index), *(["--update"] if update else [])]
        result = subprocess.run([*prefix, sys.executable, "-m", "dsearch", *args], capture_output=True, text=True,
                                env=env, timeout=120)  # fmt: skip
        assert result.returncode == 1 and result.stdout == ""
        lines_out = result.stderr.strip().splitlines()
        assert len(lines_out) == 1 and lines_out[0].startswith("dsearch: error: ")
        assert str(corpus / "sub") in lines_out[0] and "Permission denied" in lines_out[0]
    finally:
        (corpus / "sub").chmod(0o755)
    assert OpenIndex(index).rows == 200  # nothing was removed


def test_a_corpus_file_that_became_a_dangling_symlink_stops_the_run_instead_of_dropping_its_passages(tmp_path, cli):
    """corpus/b.jsonl -> /mnt/disk/b.jsonl with the disk not mounted: the walk skipped it, and --update removed
    its passages (half the index, within --max-remove's default) and exited 0."""
    corpus, disk = tmp_path / "corpus", tmp_path / "disk"
    corpus.mkdir()
    disk.mkdir()
    lines = (SAMPLE / "passages.jsonl").read_text().splitlines(keepends=True)
    (corpus / "a.jsonl").write_text("".join(lines[:100]))
    (disk / "b.jsonl").write_text("".join(lines[100:]))
    (corpus / "b.jsonl").symlink_to(disk / "b.jsonl")
    index = tmp_path / "idx"
    assert cli("index", corpus, "-o", index).exit_code == 0
    (disk / "b.jsonl").rename(tmp_path / "elsewhere.jsonl")  # the disk is not mounted tonight
    for update in ([], ["--update"]):
        result = cli("index", corpus, "-o", index, *update)
        one_error_line(result, 1, str(corpus / "b.jsonl"), "does not exist", "not mounted")
        assert OpenIndex(index).rows == 200


# --- file names that are not UTF-8 (Linux allows any bytes) ------------------------------------------------


@pytest.mark.parametrize("where", ["file", "folder", "file in folder", "-o"])
def test_a_name_that_is_not_utf8_is_one_line_before_any_encoding(tmp_path, cli, where):
    """The manifest and each passage's source are UTF-8 text: such a name failed once every passage was
    encoded, with 'unexpected UnicodeEncodeError ... report it'."""
    bad = os.fsdecode(b"bad\xff")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_bytes((SAMPLE / "passages.jsonl").read_bytes())
    target = tmp_path / "idx"
    if where == "file":
        corpus = corpus / "a.jsonl"
        corpus = corpus.rename(corpus.with_name(bad + ".jsonl"))
    elif where == "folder":
        corpus = corpus.rename(tmp_path / bad)
    elif where == "file in folder":
        (corpus / "a.jsonl").rename(corpus / (bad + ".jsonl"))
    else:
        target = tmp_path / (bad + ".idx")
    result = cli("index", corpus, "-o", target)
    one_error_line(result, 1, "bad\\xff", "not valid UTF-8")
    assert cli.loaded == [] and listing(tmp_path) == sorted([corpus.name if where != "file" else "corpus"])
