"""Reindexing from cron: --update, locks, checkpoints and resume, status, readers during a publish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SAMPLE, Runner
from fakes import HashingEncoder
from test_cli import one_error_line

from dsearch.indexer import build_index
from dsearch.manifest import FORMAT_VERSION
from dsearch.search import Query, run_search
from dsearch.store import OpenIndex, index_lock

QUERIES = [
    Query("1", "volcano planet"),
    Query("2", "bread yeast"),
    Query("3", "quokkas island"),
    Query("4", "music composer"),
    Query("5", "ocean tides moon"),
]


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / "passages.jsonl").read_text().splitlines()]


def write_corpus(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def changed_rows() -> list[dict]:
    """The sample corpus with one passage added, one rewritten, one re-tagged and one removed."""
    rows = sample_rows()
    rows[0] = {**rows[0], "text": rows[0]["text"] + " It is about 4.6 billion years old."}  # re-encode
    rows[1] = {**rows[1], "topic": "planets"}  # metadata only
    del rows[2]  # removed
    rows.insert(10, {"_id": "new-1", "title": "Quokkas", "text": "Quokkas are small marsupials on an island."})
    return rows


def answers(index: Path) -> list[list[tuple[str, float]]]:
    opened = OpenIndex(index)
    return [[(h.id, round(h.score, 4)) for h in hits] for _, hits in run_search(opened, HashingEncoder(), QUERIES, 10)]


def test_update_encodes_only_what_changed_and_equals_a_rebuild(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl", sample_rows())
    cli = Runner(capsys)
    assert cli("index", corpus, "-o", tmp_path / "idx").exit_code == 0
    write_corpus(corpus, changed_rows())
    encoders: list[HashingEncoder] = []
    counting = Runner(capsys, lambda name, **kw: encoders.append(HashingEncoder(name)) or encoders[-1])
    result = counting("index", corpus, "-o", tmp_path / "idx", "--update", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {k: summary[k] for k in ("added", "updated", "metadata_only", "unchanged", "removed", "indexed")} == {
        "added": 1,
        "updated": 1,
        "metadata_only": 1,
        "unchanged": 197,
        "removed": 1,
        "indexed": 200,
    }
    assert summary["published"] is True and summary["encoded"] == 2
    assert "1 added, 1 updated, 1 metadata-only, 197 unchanged, 1 removed" in result.stderr
    # Nothing else went through the encoder: only the windows of the two passages that changed.
    changed = {changed_rows()[0]["_id"], "new-1"}
    windows = [r["id"] for r in OpenIndex(tmp_path / "idx").iter_rows(("id",)) if r["id"] in changed]
    assert encoders[0].encoded_documents == len(windows) >= 2

    rebuilt = tmp_path / "rebuilt"
    assert cli("index", corpus, "-o", rebuilt).exit_code == 0
    assert answers(tmp_path / "idx") == answers(rebuilt)
    updated, fresh = OpenIndex(tmp_path / "idx"), OpenIndex(rebuilt)
    assert [r["id"] for r in updated.iter_rows(("id",))] == [r["id"] for r in fresh.iter_rows(("id",))]
    retagged = changed_rows()[1]["_id"]
    assert {r["fields"] for r in updated.iter_rows(("id", "fields")) if r["id"] == retagged} == {'{"topic": "planets"}'}


def test_update_with_nothing_changed_loads_no_model_and_writes_nothing(tmp_path, capsys):
    cli = Runner(capsys)
    assert cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx").exit_code == 0
    before = (tmp_path / "idx" / "manifest.json").read_text()
    cli.loaded.clear()
    result = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--update", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert (summary["unchanged"], summary["encoded"], summary["published"]) == (200, 0, False)
    assert cli.loaded == []  # the model was never loaded
    assert (tmp_path / "idx" / "manifest.json").read_text() == before
    assert result.stderr.startswith("unchanged: ")


def test_update_without_torch_when_nothing_changed(tmp_path):
    """The real command: an unchanged corpus is checked without importing torch or sentence-transformers."""
    target = tmp_path / "idx"
    build_index([str(SAMPLE / "passages.jsonl")], target, HashingEncoder())
    code = (
        "import sys; from dsearch.cli import run; "
        f"rc = run(['index', {str(SAMPLE / 'passages.jsonl')!r}, '-o', {str(target)!r}, '--update', '-q']); "
        "print(rc, [m for m in ('torch', 'sentence_transformers') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "0 []", result.stderr


def test_update_of_missing_index_builds_it(tmp_path, capsys):
    result = Runner(capsys)("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "new", "--update", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["added"] == 200


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--model", "another-model"], "built with model 'hash-test'"),
        (["--precision", "int8"], "built at precision fp32"),
    ],
)
def test_update_refuses_another_model_or_precision(tmp_path, capsys, flags, fragment):
    cli = Runner(capsys)
    assert cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx").exit_code == 0
    one_error_line(
        cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--update", *flags),
        1,
        fragment,
        "rebuild it in full",
    )


def test_update_refuses_an_older_format(tmp_path, capsys):
    cli = Runner(capsys)
    assert cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx").exit_code == 0
    manifest = tmp_path / "idx" / "manifest.json"
    manifest.write_text(manifest.read_text().replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 0'))
    one_error_line(
        cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--update"), 1, "format version 0", "rebuild"
    )


def test_update_needs_files_not_stdin(tmp_path, cli):
    one_error_line(cli("index", "-", "-o", tmp_path / "idx", "--update"), 2, "not stdin")


def _hold_lock(target: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from pathlib import Path; from dsearch.store import index_lock\n"
        f"with index_lock(Path({str(target)!r})):\n    print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_exits_4_while_the_lock_is_held(tmp_path, cli):
    holder = _hold_lock(tmp_path / "idx")
    try:
        result = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx")
        one_error_line(result, 4, "another dsearch run", f"(pid {holder.pid})")
        assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [".dsearch.lock"]  # the holder's, only
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, cli):
    holder = _hold_lock(tmp_path / "idx")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx").exit_code == 0


# --- crash safety and resume ---------------------------------------------------------------------------


def _run_and_kill(args: list[str], target: Path, env: dict) -> int:
    """Start a real `dsearch index`, kill -9 it once a checkpoint exists beyond the first; return passages saved."""
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    rows = 0
    while time.monotonic() < deadline and process.poll() is None:
        for progress in target.glob(".staging-*/progress.json"):
            try:
                rows = json.loads(progress.read_text())["passages"]  # passages, not rows: long ones are windows
            except (OSError, ValueError, KeyError):
                continue
        if rows >= 600:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return rows


def _abstract_length_corpus(n: int) -> str:
    """``n`` JSONL passages about as long as SciFact abstracts (~200 words), made from the sample corpus, so that
    a run lasts long enough to be killed mid-way on any machine."""
    texts = [json.loads(line)["text"] for line in (SAMPLE / "passages.jsonl").read_text().splitlines()]
    rows = (
        {"_id": f"p{i}", "text": " ".join(texts[(i * 7 + j * 13) % len(texts)] for j in range(6))} for i in range(n)
    )
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.mark.slow
def test_kill_9_mid_run_keeps_the_old_index_and_the_rerun_resumes(tmp_path, tiny_seed_model):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(_abstract_length_corpus(3000))
    dsearch = str(Path(sys.executable).with_name("dsearch"))
    env = {**os.environ, "DSEARCH_CHECKPOINT_SECONDS": "0"}
    target = tmp_path / "idx"
    common = ["--model", str(tiny_seed_model), "--precision", "fp32", "--batch-size", "16"]
    old = subprocess.run(
        [dsearch, "index", str(SAMPLE / "passages.jsonl"), "-o", str(target), *common],
        env=env,
        capture_output=True,
        text=True,
    )
    assert old.returncode == 0, old.stderr
    old_answer = subprocess.run(
        [dsearch, "query", str(target), "volcano", "--format", "ids", "-k", "3"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout

    saved = _run_and_kill([dsearch, "index", str(corpus), "-o", str(target), *common], target, env)
    assert saved >= 600
    during = subprocess.run(
        [dsearch, "query", str(target), "volcano", "--format", "ids", "-k", "3"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert during.returncode == 0 and during.stdout == old_answer  # the old index still answers
    status = subprocess.run([dsearch, "status", str(target)], env=env, capture_output=True, text=True)
    assert status.returncode == 6 and status.stdout.startswith("incomplete: ")

    resumed = subprocess.run(
        [dsearch, "index", str(corpus), "-o", str(target), *common, "--json"], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed_at"] >= saved and summary["indexed"] == 3000
    assert summary["encoded"] == 3000 - summary["resumed_at"]  # this run's work only, not the checkpoint's
    clean = tmp_path / "clean"
    assert (
        subprocess.run(
            [dsearch, "index", str(corpus), "-o", str(clean), *common], env=env, capture_output=True
        ).returncode
        == 0
    )
    queries = tmp_path / "q.tsv"
    queries.write_text("1\tcancer cells\n2\tprotein folding\n3\tvaccine trial\n")

    def run(index: Path) -> list[tuple[str, ...]]:
        out = subprocess.run(
            [dsearch, "query", str(index), "--queries", str(queries), "--format", "trec", "-k", "10"],
            env=env,
            capture_output=True,
            text=True,
        ).stdout
        return [(r[0], r[2], r[3], f"{float(r[4]):.4f}") for r in (line.split() for line in out.splitlines())]

    assert run(target) == run(clean)
    assert subprocess.run([dsearch, "status", str(target)], env=env).returncode == 0


def test_restart_discards_the_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DSEARCH_CHECKPOINT_SECONDS", "0")
    corpus = write_corpus(tmp_path / "c.jsonl", sample_rows())
    interrupted = Runner(capsys, lambda name, **kw: HashingEncoder(name, fail_after_batches=3))
    result = interrupted("index", corpus, "-o", tmp_path / "idx", "--batch-size", "4")
    one_error_line(result, 3, "interrupted; nothing was published")
    assert list(tmp_path.glob("idx/.staging-*/progress.json"))  # kept for the next run
    cli = Runner(capsys)
    resumed = cli("index", corpus, "-o", tmp_path / "idx", "--batch-size", "4", "--json")
    assert json.loads(resumed.stdout)["resumed_at"] == 96  # three chunks of 8 batches of 4
    assert "resumed at passage 96" in resumed.stderr
    assert interrupted("index", corpus, "-o", tmp_path / "again", "--batch-size", "4").exit_code == 3
    restarted = cli("index", corpus, "-o", tmp_path / "again", "--batch-size", "4", "--restart", "--json")
    assert json.loads(restarted.stdout)["resumed_at"] == 0
    assert answers(tmp_path / "idx") == answers(tmp_path / "again")
    assert not list(tmp_path.glob("*/.staging*"))


# --- readers during a publish ----------------------------------------------------------------------------


def test_readers_see_the_old_or_the_new_index_never_a_mix(tmp_path):
    target = tmp_path / "idx"
    corpus_a = write_corpus(tmp_path / "a.jsonl", sample_rows())
    corpus_b = write_corpus(tmp_path / "b.jsonl", changed_rows())
    build_index([str(corpus_b)], tmp_path / "b-only", HashingEncoder())
    build_index([str(corpus_a)], target, HashingEncoder())
    expected = {json.dumps(answers(target)), json.dumps(answers(tmp_path / "b-only"))}
    seen: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(json.dumps(answers(target)))
            except BaseException as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for round_ in range(12):
        corpus = corpus_b if round_ % 2 == 0 else corpus_a
        build_index([str(corpus)], target, HashingEncoder(), update=True)
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(seen) > 12 and set(seen) <= expected and len(set(seen)) == 2


# --- status ------------------------------------------------------------------------------------------


def test_status_codes(tmp_path, cli):
    corpus = write_corpus(tmp_path / "c.jsonl", sample_rows())
    missing = cli("status", tmp_path / "idx")
    assert missing.exit_code == 5 and missing.stdout.startswith("missing: ")
    assert cli("index", corpus, "-o", tmp_path / "idx").exit_code == 0
    ok = cli("status", tmp_path / "idx", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["status"] == "ok" and json.loads(ok.stdout)["passages"] == 200
    assert cli("status", tmp_path / "idx").stdout.startswith(f"ok: {tmp_path / 'idx'}: 200 passages")

    manifest = tmp_path / "idx" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "created_at": "2020-01-01T00:00:00+00:00"}))
    old = cli("status", tmp_path / "idx", "--max-age", "1d", "--json")
    assert old.exit_code == 7 and json.loads(old.stdout)["status"] == "too-old"
    assert cli("status", tmp_path / "idx").exit_code == 0  # no --max-age, no age limit

    write_corpus(corpus, changed_rows())
    changed = cli("status", tmp_path / "idx")
    assert changed.exit_code == 8 and changed.stdout.startswith("corpus-changed: ") and "--update" in changed.stdout
    other = write_corpus(tmp_path / "other.jsonl", sample_rows())
    assert cli("status", tmp_path / "idx", "--corpus", other).exit_code == 8

    faiss_file = next((tmp_path / "idx").rglob("index.faiss"))
    raw = bytearray(faiss_file.read_bytes())
    raw[-1] ^= 0xFF
    faiss_file.write_bytes(bytes(raw))
    corrupt = cli("status", tmp_path / "idx", "--json")
    assert corrupt.exit_code == 6 and json.loads(corrupt.stdout)["status"] == "corrupt"
    one_error_line(cli("status", tmp_path / "idx", "--max-age", "soon"), 2, "--max-age 'soon'")


def test_lock_file_is_inside_the_index_and_goes_with_the_run(tmp_path):
    with index_lock(tmp_path / "idx") as real:
        assert real == (tmp_path / "idx").resolve()
        assert (tmp_path / "idx" / ".dsearch.lock").read_text() == f"{os.getpid()}\n"
    assert list(tmp_path.iterdir()) == []  # the directory it made for the lock, and the lock file, are gone
