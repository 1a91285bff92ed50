"""Never lose an index, never touch what is not ours (issue 9): paths from manifests, removal limits, locks,
crash points of a publish, corrupt manifests, disk errors, counts after a resume, status lines."""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE, Runner
from fakes import HashingEncoder
from test_cli import one_error_line

from dsearch.store import FlatIndexFileWriter, OpenIndex


def write_corpus(path: Path, n: int, prefix: str = "p") -> Path:
    rows = ({"id": f"{prefix}{i}", "text": f"passage {i} about {i % 7}"} for i in range(n))
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def segments(index: Path) -> list[str]:
    return [name for name in listing(index) if name.startswith("seg-")]


def assert_segment_holds_only_listed_files(index: Path) -> None:
    """The index has one segment, and every file in it is one its manifest lists (nothing a failed run left)."""
    (segment,) = segments(index)
    listed = set(json.loads((index / "manifest.json").read_text())["segments"][0]["files"])
    assert sorted(p.name for p in (index / segment).iterdir()) == sorted(listed)


def set_manifest(index: Path, change) -> None:
    path = index / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# --- 1. nothing outside DIR --------------------------------------------------------------------------


@pytest.mark.parametrize("bad_path", ["../victim", "VICTIM_ABSOLUTE", ".", "seg-a/../../victim", ""])
def test_a_manifest_segment_path_outside_dir_is_corrupt_and_deletes_nothing(tmp_path, cli, bad_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    corpus = write_corpus(tmp_path / "c.jsonl", 20)
    index = tmp_path / "idx"
    assert cli("index", corpus, "-o", index).exit_code == 0
    bad = str(victim) if bad_path == "VICTIM_ABSOLUTE" else bad_path
    set_manifest(index, lambda m: m["segments"][0].update(path=bad))

    one_error_line(cli("query", index, "passage"), 1, "segment path", "rebuild the index")
    status = cli("status", index)
    assert status.exit_code == 6 and status.stdout.startswith("corrupt: ") and status.stderr == ""
    rebuilt = cli("index", corpus, "-o", index, "-q")  # a rebuild repairs it ...
    assert (rebuilt.exit_code, rebuilt.stdout, rebuilt.stderr) == (0, "", "")
    assert (victim / "precious.txt").read_text() == "keep me"  # ... and never reaches outside DIR
    assert listing(tmp_path) == ["c.jsonl", "idx", "victim"]
    assert cli("status", index).exit_code == 0


def test_glob_characters_in_o_never_reach_another_index(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DSEARCH_CHECKPOINT_SECONDS", "0")
    corpus = write_corpus(tmp_path / "c.jsonl", 200)
    interrupted = Runner(capsys, lambda name, **kw: HashingEncoder(name, fail_after_batches=3))
    assert interrupted("index", corpus, "-o", tmp_path / "idx1", "--batch-size", "4").exit_code == 3
    cli = Runner(capsys)
    assert cli("index", corpus, "-o", tmp_path / "idx[1]", "--batch-size", "4").exit_code == 0
    resumed = cli("index", corpus, "-o", tmp_path / "idx1", "--batch-size", "4", "--json")
    assert resumed.exit_code == 0 and json.loads(resumed.stdout)["resumed_at"] == 96  # idx1's checkpoint survived


def test_a_users_folder_inside_dir_is_never_deleted(tmp_path, cli):
    corpus = write_corpus(tmp_path / "c.jsonl", 20)
    index = tmp_path / "idx"
    assert cli("index", corpus, "-o", index).exit_code == 0
    for name in (".staging-mine", "seg-notes.txt", "notes"):
        (index / name).mkdir() if name != "seg-notes.txt" else (index / name).write_text("mine")
    (index / ".staging-mine" / "draft.txt").write_text("mine")
    assert cli("index", corpus, "-o", index).exit_code == 0
    assert cli("index", corpus, "-o", index, "--update").exit_code == 0
    assert (index / ".staging-mine" / "draft.txt").read_text() == "mine"
    assert (index / "seg-notes.txt").read_text() == "mine" and (index / "notes").is_dir()
    assert OpenIndex(index).rows == 20


def test_status_walks_no_more_of_a_folder_than_the_build_recorded(tmp_path, cli, monkeypatch):
    corpus = write_corpus(tmp_path / "c.jsonl", 5)
    index = tmp_path / "idx"
    assert cli("index", corpus, "-o", index).exit_code == 0
    big = tmp_path / "big"
    for i in range(300):
        (big / f"d{i}").mkdir(parents=True)
        (big / f"d{i}" / "f.txt").write_text("x")
        (big / "a-empty" / f"e{i}" / "deeper").mkdir(parents=True)  # folders without files are bounded too
    set_manifest(index, lambda m: m["corpus"].update(sources=[{"path": str(big), "files": 2, "bytes": 2, "mtime": 0}]))
    import dsearch.indexer

    scanned = []
    real_scandir = os.scandir
    monkeypatch.setattr(dsearch.indexer.os, "scandir", lambda p: scanned.append(p) or real_scandir(p))
    result = cli("status", index)
    assert result.exit_code == 8 and result.stdout.startswith(f"corpus-changed: {big} changed")
    assert len(scanned) <= 5  # a few entries' worth of folders, not all 901


# --- 2. removal limit ------------------------------------------------------------------------------------


@pytest.fixture
def big_index(tmp_path, cli) -> Path:
    corpus = write_corpus(tmp_path / "corpus.jsonl", 3000)
    assert cli("index", corpus, "-o", tmp_path / "idx", "-q").exit_code == 0
    return tmp_path / "idx"


def _refused(result, removed: str, left: str) -> None:
    expected = f"refusing to remove {removed} of the index's 3,000 passages, leaving {left}"
    one_error_line(result, 9, expected, "nothing was published", "--max-remove")


@pytest.mark.parametrize("update", [False, True])
@pytest.mark.parametrize("kind", ["empty file", "empty folder", "all bad"])
def test_an_empty_corpus_never_wipes_an_index(tmp_path, cli, big_index, kind, update):
    before = tree(big_index)
    if kind == "empty file":
        corpus, flags = tmp_path / "empty.jsonl", []
        corpus.write_text("")
    elif kind == "empty folder":
        corpus, flags = tmp_path / "mnt", []
        corpus.mkdir()
    else:
        corpus, flags = tmp_path / "bad.jsonl", ["--skip-bad"]
        corpus.write_text("not json\n" * 10)
    cli.loaded.clear()
    result = cli("index", corpus, "-o", big_index, "-q", *flags, *(["--update"] if update else []))
    _refused(result, "3,000", "0")
    assert "gave no passages" in result.stderr
    assert cli.loaded == []  # refused before the model was loaded
    assert tree(big_index) == before  # nothing published, nothing left behind
    assert cli("status", big_index).exit_code == 0


def test_a_rebuild_that_shrinks_the_index_by_more_than_half_is_refused_at_the_end(tmp_path, cli, big_index):
    before = tree(big_index)
    small = write_corpus(tmp_path / "small.jsonl", 1000)
    _refused(cli("index", small, "-o", big_index), "2,000", "1,000")
    assert tree(big_index) == before
    assert cli("index", small, "-o", big_index, "--max-remove", "1999").exit_code == 9
    allowed = cli("index", small, "-o", big_index, "--max-remove", "2000", "--json")
    assert allowed.exit_code == 0 and json.loads(allowed.stdout)["indexed"] == 1000
    assert listing(big_index) == ["manifest.json", *segments(big_index)] and len(segments(big_index)) == 1


def test_an_update_that_removes_more_than_half_is_refused_before_encoding(tmp_path, cli, big_index):
    small = write_corpus(tmp_path / "corpus.jsonl", 1400)
    cli.loaded.clear()
    _refused(cli("index", small, "-o", big_index, "--update"), "1,600", "1,400")
    assert cli.loaded == []
    update = cli("index", small, "-o", big_index, "--update", "--max-remove", "60%", "--json")
    assert update.exit_code == 0 and json.loads(update.stdout)["removed"] == 1600


def test_max_remove_100_percent_allows_an_empty_index(tmp_path, cli, big_index):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = cli("index", empty, "-o", big_index, "--max-remove", "100%", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["indexed"] == 0
    assert OpenIndex(big_index).rows == 0
    assert cli("query", big_index, "anything").stdout == ""
    # An index deliberately emptied stays a valid index: the nightly run with the same empty corpus is fine.
    again = cli("index", empty, "-o", big_index, "--update", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["published"] is False
    assert cli("index", empty, "-o", big_index, "-q").exit_code == 0
    assert cli("status", big_index).stdout.startswith(f"ok: {big_index}: 0 passages")


def test_a_new_index_of_nothing_is_an_error(tmp_path, cli):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    one_error_line(cli("index", empty, "-o", tmp_path / "idx", "-q"), 1, "gave no passages", "nothing to index")
    assert listing(tmp_path) == ["empty.jsonl"]


@pytest.mark.parametrize("value", ["half", "-3", "101%", "%"])
def test_max_remove_needs_a_count_or_a_percentage(tmp_path, cli, value):
    one_error_line(cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "i", "--max-remove", value), 2, value)


# --- 3. one writer per directory, however it is spelled ------------------------------------------------


def _hold_lock(target: Path) -> subprocess.Popen:
    code = (
        "import time; from pathlib import Path; from dsearch.store import index_lock\n"
        f"with index_lock(Path({str(target)!r})):\n    print('held', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("spelling", ["symlink", "dot", "trailing"])
def test_the_lock_follows_the_directory_not_its_spelling(tmp_path, cli, monkeypatch, spelling):
    index = tmp_path / "idx"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    (tmp_path / "link").symlink_to(index)
    holder = _hold_lock(index)
    try:
        if spelling == "symlink":
            target = str(tmp_path / "link")
        elif spelling == "dot":
            monkeypatch.chdir(index)
            target = "."
        else:
            target = str(tmp_path / "link" / ".." / "idx") + "/"
        one_error_line(cli("index", SAMPLE / "passages.jsonl", "-o", target), 4, "another dsearch run")
    finally:
        holder.kill()
        holder.wait()
    assert OpenIndex(index).rows == 200


def test_no_lock_files_pile_up_and_dot_fills_an_empty_folder(tmp_path, cli, monkeypatch):
    for name in ("a", "b", "c"):
        assert cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / name).exit_code == 0
        assert cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / name, "--update").exit_code == 0
    assert listing(tmp_path) == ["a", "b", "c"]
    assert listing(tmp_path / "a") == ["manifest.json", *segments(tmp_path / "a")]
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert cli("index", SAMPLE / "passages.jsonl", "-o", ".").exit_code == 0
    assert OpenIndex(empty).rows == 200 and listing(empty) == ["manifest.json", *segments(empty)]


def test_a_lock_file_left_by_a_killed_run_is_ours_not_a_foreign_file(tmp_path, cli):
    index = tmp_path / "idx"
    index.mkdir()
    (index / ".dsearch.lock").write_text("12345\n")  # kill -9 between taking the lock and releasing it
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    assert listing(index) == ["manifest.json", *segments(index)]


# --- 4. crash points and the truth about the outcome ----------------------------------------------------

CRASH_RUN = """
import sys
sys.path[:0] = {paths!r}
from fakes import HashingEncoder
from dsearch.cli import Deps, run
sys.exit(run({args!r}, Deps(load_encoder=lambda name, **kw: HashingEncoder(name))))
"""


def _crash_at(point: str, args: list[str]) -> subprocess.CompletedProcess:
    code = CRASH_RUN.format(paths=[str(ROOT / "tests"), str(ROOT / "src")], args=args)
    env = {**os.environ, "DSEARCH_TEST_FAULT": point, "DSEARCH_CHECKPOINT_SECONDS": "0"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("update", [False, True])
@pytest.mark.parametrize("point", ["checkpointed", "merged", "segment-moved", "manifest-swapped", "cleaned"])
def test_kill_9_at_every_step_of_a_build_is_recovered_by_the_next_run(tmp_path, cli, point, update):
    old = write_corpus(tmp_path / "old.jsonl", 300)
    new = write_corpus(tmp_path / "new.jsonl", 400)
    index = tmp_path / "idx"
    assert cli("index", old, "-o", index).exit_code == 0
    flags = ["--batch-size", "8", *(["--update", "--max-remove", "100%"] if update else [])]
    crashed = _crash_at(point, ["index", str(new), "-o", str(index), *flags])
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    live = OpenIndex(index).rows  # whichever index is published answers queries
    assert live == (400 if point in ("manifest-swapped", "cleaned") else 300)
    rerun = cli("index", new, "-o", index, *flags, "--json")
    assert rerun.exit_code == 0, rerun.stderr
    assert json.loads(rerun.stdout)["indexed"] == 400
    assert OpenIndex(index, verify=True).rows == 400
    assert listing(index) == ["manifest.json", *segments(index)] and len(segments(index)) == 1
    assert cli("status", index, "--corpus", new).exit_code == 0


def test_orphan_segments_are_reported_by_status_and_collected_by_the_next_run(tmp_path, cli):
    corpus = write_corpus(tmp_path / "c.jsonl", 50)
    index = tmp_path / "idx"
    assert cli("index", corpus, "-o", index).exit_code == 0
    for _ in range(5):
        assert _crash_at("segment-moved", ["index", str(corpus), "-o", str(index)]).returncode == -signal.SIGKILL
    assert len(segments(index)) == 2  # each run collected the orphan of the crash before it: they never pile up
    status = cli("status", index)
    assert status.exit_code == 6 and status.stdout.startswith("incomplete: ") and "1 segment folder(s)" in status.stdout
    assert cli("index", corpus, "-o", index, "--update").exit_code == 0  # nothing to update, but it tidies up
    assert len(segments(index)) == 1 and cli("status", index).exit_code == 0


def test_sigterm_after_the_manifest_swap_reports_published(tmp_path, cli, monkeypatch):
    index = tmp_path / "idx"
    assert cli("index", write_corpus(tmp_path / "a.jsonl", 30), "-o", index).exit_code == 0
    monkeypatch.setenv("DSEARCH_TEST_FAULT", "manifest-swapped:TERM")
    result = cli("index", write_corpus(tmp_path / "b.jsonl", 40), "-o", index, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["published"] is True and json.loads(result.stdout)["indexed"] == 40
    assert "interrupted after the new index was published" in result.stderr
    assert "nothing was published" not in result.stderr
    assert OpenIndex(index).rows == 40
    monkeypatch.delenv("DSEARCH_TEST_FAULT")
    assert cli("index", tmp_path / "b.jsonl", "-o", index, "--update").exit_code == 0
    assert listing(index) == ["manifest.json", *segments(index)] and len(segments(index)) == 1


def test_sigterm_before_the_swap_still_says_nothing_was_published(tmp_path, cli, monkeypatch):
    index = tmp_path / "idx"
    assert cli("index", write_corpus(tmp_path / "a.jsonl", 30), "-o", index).exit_code == 0
    monkeypatch.setenv("DSEARCH_TEST_FAULT", "segment-moved:TERM")
    result = cli("index", write_corpus(tmp_path / "b.jsonl", 40), "-o", index)
    one_error_line(result, 3, "nothing was published")
    assert OpenIndex(index).rows == 30


# --- 5. corrupt manifests ---------------------------------------------------------------------------------


MANGLES = {
    "not json": lambda text: "{not json",
    "created_at": lambda text: json.dumps({**json.loads(text), "created_at": "yesterday"}),
    "no files": lambda text: text.replace('"files": {', '"files": {"x": {"bytes": 1, "xxh3_128": "0"}}, "was": {'),
    "files list": lambda text: json.dumps(
        {**json.loads(text), "segments": [{**json.loads(text)["segments"][0], "files": []}]}
    ),
    "rows type": lambda text: json.dumps({**json.loads(text), "rows": "200"}),
    "dim bool": lambda text: text.replace('"dim": 64', '"dim": true'),
}


@pytest.mark.parametrize("mangle", list(MANGLES))
def test_a_corrupt_manifest_is_reported_and_a_rebuild_repairs_it(tmp_path, cli, mangle):
    index = tmp_path / "idx"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    manifest = index / "manifest.json"
    manifest.write_text(MANGLES[mangle](manifest.read_text()))
    one_error_line(cli("query", index, "volcano"), 1, "manifest", "rebuild the index")
    one_error_line(cli("info", index), 1, "manifest")
    status = cli("status", index, "--json")
    assert status.exit_code == 6 and json.loads(status.stdout)["status"] == "corrupt" and status.stderr == ""
    cli.loaded.clear()
    one_error_line(
        cli("index", SAMPLE / "passages.jsonl", "-o", index, "--update"), 1, "rebuild it in full (without --update)"
    )
    assert cli.loaded == []  # refused before any encoding
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index, "--restart").exit_code == 0
    assert OpenIndex(index, verify=True).rows == 200 and listing(index) == ["manifest.json", *segments(index)]
    assert cli("status", index).exit_code == 0


def test_a_corrupt_manifest_among_foreign_files_is_not_replaced(tmp_path, cli):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"name": "my-app"}')
    (folder / "main.py").write_text("print('hi')")
    one_error_line(cli("index", SAMPLE / "passages.jsonl", "-o", folder), 1, "not a dsearch index", "main.py")
    assert listing(folder) == ["main.py", "manifest.json"]


# --- 6. disk full, no permission ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "code,fix",
    [(errno.ENOSPC, "free some space"), (errno.EACCES, "permissions"), (errno.EROFS, "read-only")],
)
def test_disk_errors_name_the_path_and_what_to_do(tmp_path, cli, monkeypatch, code, fix):
    index = tmp_path / "idx"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    before = tree(index)

    def fail(self, vectors):  # the disk fills up (or turns read-only) mid-build
        raise OSError(code, os.strerror(code), str(self.path))

    monkeypatch.setattr(FlatIndexFileWriter, "add", fail)
    result = cli("index", SAMPLE / "passages.jsonl", "-o", index)
    one_error_line(result, 1, "index.faiss: ", os.strerror(code), "nothing was published", fix)
    assert "unexpected" not in result.stderr
    assert tree(index) == before


# --- 7. counts after a resume ------------------------------------------------------------------------


def test_a_resumed_run_counts_only_its_own_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DSEARCH_CHECKPOINT_SECONDS", "0")
    corpus = write_corpus(tmp_path / "c.jsonl", 200)
    interrupted = Runner(capsys, lambda name, **kw: HashingEncoder(name, fail_after_batches=3))
    assert interrupted("index", corpus, "-o", tmp_path / "idx", "--batch-size", "4").exit_code == 3
    encoders: list[HashingEncoder] = []
    counting = Runner(capsys, lambda name, **kw: encoders.append(HashingEncoder(name)) or encoders[-1])
    result = counting("index", corpus, "-o", tmp_path / "idx", "--batch-size", "4", "--json")
    summary = json.loads(result.stdout)
    assert (summary["resumed_at"], summary["indexed"], summary["encoded"]) == (96, 200, 104)
    assert encoders[0].encoded_documents == summary["encoded"]
    assert summary["passages_per_second"] <= summary["encoded"] / summary["seconds"] * 1.5 + 1


def test_the_progress_rate_leaves_out_resumed_passages():
    from dsearch.cli import _Progress

    progress = _Progress(None)
    progress.resumed(2000)
    progress.advance(10)
    assert (progress.done, progress.skipped) == (10, 2000)


# --- 8. status lines ------------------------------------------------------------------------------------


def test_status_lines_name_the_index_and_give_a_command_that_works(tmp_path, cli):
    folder = tmp_path / "my corpus"
    folder.mkdir()
    write_corpus(folder / "a.jsonl", 1500, "a")
    write_corpus(folder / "b.jsonl", 700, "b")
    index = tmp_path / "the idx"
    assert cli("index", folder / "a.jsonl", folder / "b.jsonl", "-o", index, "--id-field", "id").exit_code == 0
    ok = cli("status", index)
    info = cli("info", index, "--json")
    assert ok.stdout.startswith(f"ok: {index}: 2,200 passages") and json.loads(info.stdout)["passages"] == 2200
    assert "2,200" in cli("info", index).stdout

    set_manifest(index, lambda m: m.update(created_at="2020-01-01T00:00:00+00:00"))
    old = cli("status", index, "--max-age", "1d")
    assert old.exit_code == 7 and old.stdout.startswith(f"too-old: {index}: built ")

    write_corpus(folder / "b.jsonl", 701, "b")
    changed = cli("status", index)
    assert changed.exit_code == 8
    command = changed.stdout.split("run '", 1)[1].rsplit("'", 1)[0]
    assert shlex.split(command) == [
        "dsearch", "index", str(folder / "a.jsonl"), str(folder / "b.jsonl"), "-o", str(index), "--update",
        "--id-field", "id",
    ]  # fmt: skip
    # The printed command, run as printed, brings the index up to date.
    words = shlex.split(command)
    assert cli(*words[1:]).exit_code == 0 and cli("status", index).exit_code == 0


def test_a_too_old_status_names_what_renews_the_age(tmp_path, cli):
    """`too-old` used to say "reindex", which keeps the build time; so does an --update with nothing to change."""
    corpus = write_corpus(tmp_path / "c.jsonl", 30)
    index = tmp_path / "idx"
    assert cli("index", corpus, "-o", index).exit_code == 0

    def age_check():
        return cli("status", index, "--max-age", "1d")

    set_manifest(index, lambda m: m.update(created_at="2020-01-01T00:00:00+00:00"))
    old = age_check()
    assert old.exit_code == 7 and old.stderr == ""
    assert old.stdout.startswith(f"too-old: {index}: built ") and old.stdout.count("\n") == 1
    assert "rebuild it with 'dsearch index'" in old.stdout and "--update that finds nothing" in old.stdout
    assert not old.stdout.rstrip().endswith("reindex")
    # What the line warns about: neither of these renews the age of an index whose corpus has not changed.
    assert cli("reindex", index, "-q").exit_code == 0
    assert age_check().exit_code == 7
    update = cli("index", corpus, "-o", index, "--update", "--json", "-q")
    assert update.exit_code == 0 and json.loads(update.stdout)["published"] is False
    assert age_check().exit_code == 7
    # What it says to do does.
    assert cli("index", corpus, "-o", index, "-q").exit_code == 0
    fresh = age_check()
    assert fresh.exit_code == 0 and fresh.stdout.startswith(f"ok: {index}: 30 passages")


def test_a_corpus_that_is_gone_is_reported_as_gone_not_just_changed(tmp_path, cli):
    """An unmounted or moved corpus: the update command alone would fail on it, so the line says to restore it."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_corpus(folder / "a.jsonl", 20)
    index = tmp_path / "idx"
    assert cli("index", folder, "-o", index).exit_code == 0
    folder.rename(tmp_path / "elsewhere")
    gone = cli("status", index)
    assert gone.exit_code == 8 and gone.stderr == "" and gone.stdout.count("\n") == 1
    assert gone.stdout.startswith(f"corpus-changed: {folder} is gone (unmounted or moved?) since the index was built; ")
    assert f"restore it, then run 'dsearch index {folder} -o {index} --update'" in gone.stdout
    as_json = json.loads(cli("status", index, "--json").stdout)
    assert as_json["status"] == "corpus-changed" and "is gone" in as_json["problems"][0]["detail"]
    (tmp_path / "elsewhere").rename(folder)  # restored as it was: nothing to report
    assert cli("status", index).exit_code == 0
    write_corpus(folder / "a.jsonl", 21)  # a plain change still reads as one
    changed = cli("status", index)
    assert changed.exit_code == 8 and changed.stdout.startswith(f"corpus-changed: {folder} changed since the index ")
    assert "restore it" not in changed.stdout


def test_status_corpus_takes_several_paths_and_files_inside_a_folder(tmp_path, cli):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("Volcanoes erupt.\n\nTides follow the moon.\n")
    (folder / "sub" / "b.md").write_text("# Bread\n\nYeast makes bread rise.\n")
    extra = write_corpus(tmp_path / "extra.jsonl", 5)
    index = tmp_path / "idx"
    assert cli("index", folder, extra, "-o", index).exit_code == 0
    # repeated --corpus, as the README documents
    both = cli("status", index, "--corpus", folder, "--corpus", extra)
    assert both.exit_code == 0, both.stdout
    # files and folders inside an indexed folder, unchanged: not "corpus changed"
    for inside in (folder / "sub" / "b.md", folder / "sub", folder / "a.txt"):
        result = cli("status", index, "--corpus", inside)
        assert result.exit_code == 0, result.stdout
    (folder / "sub" / "b.md").write_text("# Bread\n\nYeast makes bread rise, slowly.\n")
    after = cli("status", index, "--corpus", folder / "sub" / "b.md")
    assert after.exit_code == 8 and after.stdout.startswith(f"corpus-changed: {folder / 'sub' / 'b.md'} changed")
    assert cli("status", index, "--corpus", folder / "a.txt").exit_code == 0  # its neighbour did not change
    elsewhere = write_corpus(tmp_path / "other.jsonl", 3)
    other = cli("status", index, "--corpus", elsewhere)
    assert other.exit_code == 8 and "not part of the build" in other.stdout


KILLED_IN_BM25 = """
import os, signal, sys
sys.path[:0] = {paths!r}
import dsearch.lexical
from fakes import HashingEncoder
from dsearch.cli import Deps, run
dsearch.lexical._score = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # killed while scoring BM25
sys.exit(run({args!r}, Deps(load_encoder=lambda name, **kw: HashingEncoder(name))))
"""


def test_a_build_killed_in_its_bm25_pass_publishes_no_temporary_files_when_resumed(tmp_path, cli):
    """The streamed BM25 build keeps its triples in a temporary folder of the staged segment; a run killed
    there after a checkpoint is resumed by the next, which must not carry that folder into the published index."""
    corpus = write_corpus(tmp_path / "c.jsonl", 300)
    index = tmp_path / "idx"
    args = ["index", str(corpus), "-o", str(index), "--batch-size", "8"]
    code = KILLED_IN_BM25.format(paths=[str(ROOT / "tests"), str(ROOT / "src")], args=args)
    env = {**os.environ, "DSEARCH_CHECKPOINT_SECONDS": "0"}
    crashed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert list(index.glob(".staging-*/seg-*/bm25-*/triples.bin"))  # what the kill left, resumable
    rerun = cli("index", corpus, "-o", index, "--batch-size", "8", "--json")
    assert rerun.exit_code == 0, rerun.stderr
    assert json.loads(rerun.stdout)["resumed_at"] == 300
    assert_segment_holds_only_listed_files(index)


# --- 9. a failure after encoding keeps the vectors ------------------------------------------------------


def counting_runner(capsys) -> tuple[Runner, list[HashingEncoder]]:
    encoders: list[HashingEncoder] = []
    return Runner(capsys, lambda name, **kw: encoders.append(HashingEncoder(name)) or encoders[-1]), encoders


def test_an_ann_build_that_fails_keeps_the_encoded_vectors_for_the_rerun(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl", 300)
    index = tmp_path / "idx"
    cli, encoders = counting_runner(capsys)
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    before = tree(index)
    # FAISS cannot train 1024 lists on 300 vectors: known only once every passage is encoded.
    failed = cli("index", corpus, "-o", index, "--index-type", "IVF1024,Flat")
    one_error_line(failed, 2, "cannot build the index", "the encoded vectors are kept", "a rerun finishes without")
    assert encoders[-1].encoded_documents == 300
    assert {k: v for k, v in tree(index).items() if not k.startswith(".staging-")} == before  # nothing published
    again = cli("index", corpus, "-o", index, "--index-type", "IVF1024,Flat")  # the same mistake costs no encoding
    one_error_line(again, 2, "cannot build the index", "the encoded vectors are kept")
    # The index type is not part of what the vectors depend on: another one resumes from them.
    rerun = cli("index", corpus, "-o", index, "--index-type", "IVF4,Flat", "--json")
    assert rerun.exit_code == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert (summary["resumed_at"], summary["indexed"], summary["encoded"]) == (300, 300, 0)
    assert sum(e.encoded_documents for e in encoders[2:]) == 0  # after the first failure, nothing was encoded
    assert not list(index.glob(".staging-*"))
    assert_segment_holds_only_listed_files(index)  # no file of the failed runs
    fresh = Runner(capsys)
    assert fresh("index", corpus, "-o", tmp_path / "fresh", "--index-type", "IVF4,Flat").exit_code == 0
    assert OpenIndex(index).vectors_at(list(range(300))).tolist() == (
        OpenIndex(tmp_path / "fresh").vectors_at(list(range(300))).tolist()
    )


def test_an_ann_file_a_killed_run_left_half_written_is_not_published_by_the_resumed_run(tmp_path, cli):
    """kill -9 while FAISS writes the ANN file (after the final checkpoint) leaves the partial file in the staged
    segment; the resumed run moved it into the published segment, where no manifest lists it."""
    corpus = write_corpus(tmp_path / "c.jsonl", 300)
    index = tmp_path / "idx"
    one_error_line(cli("index", corpus, "-o", index, "--index-type", "IVF1024,Flat"), 2, "vectors are kept")
    (staged,) = index.glob(".staging-*/seg-*")
    (staged / "ann-0123456789ab.faiss").write_bytes(b"half of an IVF index")  # what the kill left
    rerun = cli("index", corpus, "-o", index, "--index-type", "IVF4,Flat", "--json")
    assert rerun.exit_code == 0, rerun.stderr
    assert json.loads(rerun.stdout)["encoded"] == 0
    assert_segment_holds_only_listed_files(index)
    assert cli("status", index).exit_code == 0


def test_kept_vectors_are_not_resumed_by_a_run_whose_model_is_another(tmp_path, capsys):
    """The same --model (a local path, the default) that now holds other weights: the rerun resumed from the old
    model's vectors and published them under the new model's fingerprint, so every query scored against vectors
    of another model."""
    corpus = write_corpus(tmp_path / "c.jsonl", 300)
    index = tmp_path / "idx"
    old = Runner(capsys)  # fingerprint hashing-64-cosine
    one_error_line(old("index", corpus, "-o", index, "--index-type", "IVF1024,Flat"), 2, "vectors are kept")
    new, encoders = counting_runner(capsys)
    new.encoder_factory = lambda name, **kw: encoders.append(HashingEncoder(name, similarity="dot")) or encoders[-1]
    rerun = new("index", corpus, "-o", index, "--json")
    assert rerun.exit_code == 0, rerun.stderr
    assert (json.loads(rerun.stdout)["resumed_at"], json.loads(rerun.stdout)["encoded"]) == (0, 300)
    assert new("index", corpus, "-o", tmp_path / "fresh").exit_code == 0
    built, fresh = OpenIndex(index), OpenIndex(tmp_path / "fresh")
    assert built.manifest.model.fingerprint == fresh.manifest.model.fingerprint == "hashing-64-dot"
    assert built.vectors(0, 300).tolist() == fresh.vectors(0, 300).tolist()
    assert not list(index.glob(".staging-*"))


@pytest.mark.parametrize(("first", "second"), [("--no-split", "--split"), ("--split", "--no-split")])
def test_kept_vectors_are_not_resumed_by_a_run_that_cuts_passages_otherwise(tmp_path, cli, first, second):
    """Vectors of whole (truncated) passages are not the vectors of their windows: the rerun encodes again. It
    resumed, and published 300 truncated vectors under a manifest that said the passages were split."""
    rows = ({"id": f"p{i}", "text": " ".join(f"w{i}x{j}" for j in range(100))} for i in range(300))
    corpus = tmp_path / "long.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))  # 100 words: 40-token windows split them
    index = tmp_path / "idx"
    failed = cli("index", corpus, "-o", index, first, "--index-type", "IVF4096,Flat")
    one_error_line(failed, 2, "the encoded vectors are kept")
    rerun = cli("index", corpus, "-o", index, second, "--json")
    assert rerun.exit_code == 0, rerun.stderr
    assert (json.loads(rerun.stdout)["resumed_at"], json.loads(rerun.stdout)["encoded"]) == (0, 300)
    assert cli("index", corpus, "-o", tmp_path / "fresh", second).exit_code == 0
    built, fresh = OpenIndex(index), OpenIndex(tmp_path / "fresh")
    assert built.manifest.corpus["split"] == fresh.manifest.corpus["split"]
    assert built.rows == fresh.rows and built.rows in (300, 1500) and (built.rows == 1500) == (second == "--split")
    assert built.vectors(0, built.rows).tolist() == fresh.vectors(0, fresh.rows).tolist()
    assert not list(index.glob(".staging-*"))


def test_a_full_disk_while_writing_the_manifest_does_not_promise_kept_vectors(tmp_path, cli, monkeypatch):
    """By the time the new manifest is written the segment has left the staging area (and its parts, which a
    resume needs, are gone): the error said the vectors were kept for a rerun that then encoded them all again."""
    import dsearch.store

    corpus = write_corpus(tmp_path / "c.jsonl", 300)
    index = tmp_path / "idx"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    before = tree(index)
    real_write = dsearch.store._write_file

    def full(path, data, atomic=False):
        if path.name == dsearch.store.MANIFEST_TMP:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, data, atomic)

    monkeypatch.setattr(dsearch.store, "_write_file", full)
    failed = cli("index", corpus, "-o", index)
    monkeypatch.undo()
    one_error_line(failed, 1, "No space left on device", "nothing was published")
    assert "kept" not in failed.stderr
    assert {k: v for k, v in tree(index).items() if k.startswith("manifest")} == {
        k: v for k, v in before.items() if k.startswith("manifest")
    }
    assert cli("query", index, "volcano", "--format", "jsonl").exit_code == 0  # the published index answers
    rerun = cli("index", corpus, "-o", index, "--json")
    assert rerun.exit_code == 0 and json.loads(rerun.stdout)["encoded"] == 300, rerun.stderr
    assert tree(index).keys() == {k for k in tree(index) if not k.startswith(".staging")}
    assert len(segments(index)) == 1


def test_a_build_from_stdin_that_fails_after_encoding_keeps_nothing_and_does_not_promise_a_resume(tmp_path, cli):
    """Passages read from stdin cannot be read again, so no rerun resumes from their vectors: the error said they
    were kept for a rerun that 'finishes without encoding them again', status then said to rerun to finish it
    (exit 6), and the rerun encoded everything anyway."""
    corpus = write_corpus(tmp_path / "c.jsonl", 300).read_bytes()
    index = tmp_path / "new" / "idx"
    failed = cli("index", "-", "-o", index, "--index-type", "IVF1024,Flat", stdin=corpus)
    one_error_line(failed, 2, "cannot build the index", "choose another --index-type")
    assert "kept" not in failed.stderr and "rerun" not in failed.stderr
    assert listing(tmp_path) == ["c.jsonl"]  # no staging area, nor the folders this first build made
    assert cli("status", index).exit_code == 5
    rerun = cli("index", "-", "-o", index, "--index-type", "IVF4,Flat", "--json", stdin=corpus)
    assert rerun.exit_code == 0, rerun.stderr
    assert (json.loads(rerun.stdout)["resumed_at"], json.loads(rerun.stdout)["encoded"]) == (0, 300)
    assert cli("status", index).exit_code == 0


def test_an_interrupted_build_from_stdin_keeps_no_checkpoint_and_does_not_promise_a_resume(
    tmp_path, capsys, monkeypatch
):
    """Ctrl-C while encoding stdin: the error said 'run the same command again to resume', the checkpoint (and
    the folders of a first build) stayed, status said to rerun to finish it; no rerun can read stdin again."""
    monkeypatch.setenv("DSEARCH_CHECKPOINT_SECONDS", "0")
    corpus = write_corpus(tmp_path / "c.jsonl", 300).read_bytes()
    interrupted = Runner(capsys, lambda name, **kw: HashingEncoder(name, fail_after_batches=3))
    result = interrupted("index", "-", "-o", tmp_path / "new" / "idx", "--batch-size", "8", stdin=corpus)
    one_error_line(result, 3, "interrupted; nothing was published", "stdin")
    assert "resume" not in result.stderr
    assert listing(tmp_path) == ["c.jsonl"]
    # From files, the checkpoint stays and the message promises the resume it gets.
    result = interrupted("index", tmp_path / "c.jsonl", "-o", tmp_path / "idx", "--batch-size", "8")
    one_error_line(result, 3, "interrupted; nothing was published (run the same command again to resume)")
    rerun = Runner(capsys)("index", tmp_path / "c.jsonl", "-o", tmp_path / "idx", "--batch-size", "8", "--json")
    assert rerun.exit_code == 0 and json.loads(rerun.stdout)["resumed_at"] > 0, rerun.stderr


def test_a_failure_while_encoding_still_removes_the_staging_area(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": 7}\n')
    result = Runner(capsys)("index", corpus, "-o", tmp_path / "idx")
    assert result.exit_code == 1
    assert "kept" not in result.stderr
    assert not (tmp_path / "idx").exists()


def test_a_rebuild_refused_by_max_remove_keeps_no_checkpoint(tmp_path, cli):
    """The refusal means the corpus was wrong (a folder not mounted): its vectors are not worth keeping, and a
    kept checkpoint would turn the healthy index's `status` into exit 6."""
    index = tmp_path / "idx"
    assert cli("index", write_corpus(tmp_path / "big.jsonl", 100), "-o", index).exit_code == 0
    refused = cli("index", write_corpus(tmp_path / "small.jsonl", 10), "-o", index)
    one_error_line(refused, 9, "refusing to remove 90")
    assert "kept" not in refused.stderr
    assert not list(index.glob(".staging-*"))
    assert cli("status", index).exit_code == 0


# --- 10. a failed first build leaves no folders -----------------------------------------------------------


def bad_corpus(path: Path) -> Path:
    path.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": 7}\n')  # found bad only while reading
    return path


def test_a_failed_first_build_removes_the_folders_it_created_and_no_other(tmp_path, cli, monkeypatch):
    corpus = bad_corpus(tmp_path / "c.jsonl")
    (tmp_path / "existing").mkdir()
    result = cli("index", corpus, "-o", tmp_path / "existing" / "a" / "b" / "idx")
    assert result.exit_code == 1
    assert listing(tmp_path) == ["c.jsonl", "existing"] and listing(tmp_path / "existing") == []
    # `..` and a folder that was there before: only what the run made goes, by the path it made it with.
    monkeypatch.chdir(tmp_path)
    assert cli("index", corpus, "-o", Path("new") / ".." / "existing" / "idx").exit_code == 1
    assert listing(tmp_path) == ["c.jsonl", "existing"]
    (tmp_path / "existing" / "keep.txt").write_text("mine")
    assert cli("index", corpus, "-o", tmp_path / "existing" / "x" / "idx").exit_code == 1
    assert listing(tmp_path / "existing") == ["keep.txt"]


def test_a_first_build_whose_new_parent_a_sibling_build_removes_meanwhile_makes_it_again(tmp_path, cli, monkeypatch):
    """Two first builds into new/a and new/b. b finds no `new`, a makes it, b sees it exists, then a fails and
    removes it before b makes new/b in it. b failed with 'cannot create it (No such file or directory)'; it makes
    `new` again, and owns it: its own failure removes it, its success keeps it."""
    real_mkdir = os.mkdir

    def racing(parent: Path, target: Path, calls: list[Path]):
        def mkdir(path, *args, **kwargs):
            calls.append(Path(path))
            if len(calls) == 2 and Path(path) == parent:
                real_mkdir(parent)  # the sibling build made it just now
            if len(calls) == 3 and Path(path) == target:
                os.rmdir(parent)  # and its failure removed it again
            return real_mkdir(path, *args, **kwargs)

        return mkdir

    for corpus, code in ((SAMPLE / "passages.jsonl", 0), (bad_corpus(tmp_path / "bad.jsonl"), 1)):
        parent = tmp_path / f"new{code}"
        target, calls = parent / "b", []
        monkeypatch.setattr(os, "mkdir", racing(parent, target, calls))
        result = cli("index", corpus, "-o", target)
        monkeypatch.undo()
        assert "cannot create" not in result.stderr and result.exit_code == code, result.stderr
        assert calls[:5] == [target, parent, target, target, parent]  # the race as described, then `new` again
        if code == 0:
            assert (target / "manifest.json").is_file()
            assert cli("query", target, "solar", "--format", "jsonl").stdout.count("\n") > 0
        else:
            assert not parent.exists()  # this run made `new` again: its failure removed it


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.ELOOP])
@pytest.mark.parametrize("failing", [".dsearch.lock", "idx"])
def test_a_first_build_that_cannot_create_its_lock_file_removes_the_folders_it_created(
    tmp_path, cli, monkeypatch, code, failing
):
    """Out of inodes (a tmpfs with nr_inodes, measured): the three folders of -o x/y/idx took the last ones and
    the lock file could not be created, or x and y did and idx could not; the run failed with its one line but
    left x/y/idx (or x/y) behind."""
    (tmp_path / "existing").mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def fails(path) -> bool:
        if os.path.basename(os.fspath(path)) == failing and os.path.isdir(os.path.dirname(os.fspath(path))):
            raise OSError(code, os.strerror(code), os.fspath(path))

    monkeypatch.setattr(os, "open", lambda path, *a, **kw: fails(path) or real_open(path, *a, **kw))
    monkeypatch.setattr(os, "mkdir", lambda path, *a, **kw: fails(path) or real_mkdir(path, *a, **kw))
    result = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "existing" / "x" / "y" / "idx")
    monkeypatch.undo()
    assert result.exit_code == 1 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert failing in result.stderr
    assert listing(tmp_path) == ["existing"] and listing(tmp_path / "existing") == []


def test_a_failed_first_build_with_kept_vectors_keeps_its_folders(tmp_path, cli):
    target = tmp_path / "a" / "idx"
    result = cli("index", write_corpus(tmp_path / "c.jsonl", 300), "-o", target, "--index-type", "IVF1024,Flat")
    one_error_line(result, 2, "the encoded vectors are kept")
    assert len(list(target.glob(".staging-*"))) == 1
    assert cli("index", tmp_path / "c.jsonl", "-o", target, "--json").exit_code == 0


# --- 11. an index a newer dsearch wrote ---------------------------------------------------------------------


@pytest.mark.parametrize("update", [False, True])
def test_an_index_of_a_newer_format_is_never_replaced(cli, tmp_path, update):
    from dsearch.manifest import FORMAT_VERSION

    index = tmp_path / "idx"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    set_manifest(index, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    before = tree(index)
    args = ["index", SAMPLE / "passages.jsonl", "-o", index] + (["--update"] if update else [])
    result = cli(*args)
    one_error_line(result, 1, f"format version {FORMAT_VERSION + 1} is newer", "nothing was changed", "upgrade dsearch")
    assert tree(index) == before and not list(index.glob(".staging-*"))


@pytest.mark.parametrize("command", ["reindex", "reindex --index-type hnsw", "index --update", "index --restart"])
def test_nothing_in_an_index_of_a_newer_format_is_collected_as_left_over(cli, tmp_path, command):
    """What looks left over in a newer dsearch's index (a staging area, a segment, an ANN file its manifest lists
    in a way this version does not read) may be its own: `reindex` removed a staging area before refusing."""
    from dsearch.manifest import FORMAT_VERSION

    index = tmp_path / "idx"
    assert cli("index", SAMPLE / "passages.jsonl", "-o", index).exit_code == 0
    set_manifest(index, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    (segment,) = segments(index)
    (index / ".staging-20990101000000-0123abcd").mkdir()  # no progress.json this version reads
    (index / "seg-20990101000000-0123abcd").mkdir()  # named by no manifest this version reads
    (index / segment / "ann-0123456789ab.faiss").write_bytes(b"listed where this version does not look")
    (index / ".manifest.json.tmp").write_bytes(b"its publish in progress")
    before = tree(index)
    name, *options = command.split()
    result = cli(name, *([SAMPLE / "passages.jsonl", "-o"] if name == "index" else []), index, *options)
    one_error_line(result, 1, f"format version {FORMAT_VERSION + 1} is newer", "upgrade dsearch")
    assert tree(index) == before
    assert sorted(p.name for p in index.iterdir() if p.is_dir()) == sorted(
        [segment, ".staging-20990101000000-0123abcd", "seg-20990101000000-0123abcd"]
    )



# --- 12. a corpus change that changes no passage ------------------------------------------------------------


def test_an_update_that_changes_no_passage_clears_the_corpus_change_status_reports(cli, tmp_path):
    """A `touch` (or a copy that keeps the bytes) is a corpus change to `status` (exit 8) but no passage changes:
    the update published nothing and left status at 8 for ever, though cron ran it every night."""
    docs = tmp_path / "docs"
    docs.mkdir()
    write_corpus(docs / "a.jsonl", 20)
    write_corpus(docs / "b.jsonl", 20, prefix="q")
    index = tmp_path / "idx"
    assert cli("index", docs, "-o", index).exit_code == 0
    segments_before = json.loads((index / "manifest.json").read_text())["segments"]
    created = json.loads((index / "manifest.json").read_text())["created_at"]
    os.utime(docs / "a.jsonl", (1e9, 1e9))  # an older time for one file: not even the newest mtime
    (docs / "b.jsonl").touch()
    assert cli("status", index).exit_code == 8
    update = cli("index", docs, "-o", index, "--update", "--json")
    assert update.exit_code == 0, update.stderr
    summary = json.loads(update.stdout)
    assert (summary["published"], summary["encoded"], summary["unchanged"]) == (False, 0, 40)
    status = cli("status", index)
    assert (status.exit_code, status.stdout.split(":")[0]) == (0, "ok"), status.stdout
    manifest = json.loads((index / "manifest.json").read_text())
    assert (manifest["segments"], manifest["created_at"]) == (segments_before, created)  # the index as it was
    before = tree(index)
    assert cli("index", docs, "-o", index, "--update").exit_code == 0
    assert tree(index) == before  # with nothing new to record, nothing is written
