"""Symlinks in a corpus folder that lead nowhere or around the corpus, and kept checkpoints that no run resumes:
what the build does with them, and what `status` (which cron checks before building) says the build will do."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fakes import HashingEncoder
from test_cli import one_error_line

from dsearch.corpus import corpus_files
from dsearch.errors import InputError
from dsearch.indexer import describe_source


def jsonl(path: Path, *ids: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "text": f"passage {i} about {i}"}) + "\n" for i in ids))
    return path


def stored_ids(index: Path) -> list[str]:
    [parquet] = index.glob("seg-*/passages.parquet")
    return pq.read_table(parquet, columns=["id"]).column("id").to_pylist()


def update_line(docs: Path, index: Path) -> str:
    return f"run 'dsearch index {docs} -o {index} --update'"


# --- 1. a link to nothing: taken for whatever could hold passages ----------------------------------------------

# A name with no extension, or with one no file type has, may have been a folder; a corpus file is read.
MAY_HOLD_PASSAGES = ["archive", "archive.2024", "v1.2", "data.old", "site.com", "b.jsonl", "notes.md"]
# Certainly a file, of a type the build does not read.
OTHER_FILES = ["logo.png", "notes.docx", "report.pdf", "backup.tar.gz", "Photo.JPG", "config.yaml"]


@pytest.mark.parametrize("name", ["archive.2024", "v1.2", "archive"])
def test_a_linked_folder_on_an_unmounted_disk_stops_the_run_whatever_its_name(cli, tmp_path, name):
    """archive.2024 -> /mnt/disk/archive.2024 with the disk not mounted: a name with a dot was taken for a file
    and skipped, so the update removed the folder's passages (within --max-remove's default) and exited 0."""
    docs, disk = tmp_path / "docs", tmp_path / "disk"
    jsonl(docs / "a.jsonl", "a1", "a2", "a3")
    jsonl(disk / name / "b.jsonl", "b1", "b2")
    (docs / name).symlink_to(disk / name, target_is_directory=True)
    index = tmp_path / "idx"
    assert cli("index", docs, "-o", index).exit_code == 0
    assert stored_ids(index) == ["a1", "a2", "a3", "b1", "b2"]
    (disk / name).rename(tmp_path / "unmounted")  # tonight the disk is not there
    status = cli("status", index)
    assert (status.exit_code, status.stderr) == (8, "")
    assert status.stdout.startswith(f"corpus-changed: {docs / name}: a symlink to {disk / name}, which does not exist")
    assert "the next 'dsearch index' stops on it; put that right, then " + update_line(docs, index) in status.stdout
    for update in ([], ["--update"]):
        result = cli("index", docs, "-o", index, *update)
        one_error_line(result, 1, f"{docs / name}: a symlink to {disk / name}", "does not exist", "mount it")
        assert stored_ids(index) == ["a1", "a2", "a3", "b1", "b2"]  # nothing removed
    (tmp_path / "unmounted").rename(disk / name)  # mounted again
    assert cli("status", index).exit_code == 0


@pytest.mark.parametrize("name", ["archive.2024", "b.jsonl", "archive"])
def test_a_new_link_to_nothing_makes_status_say_the_next_build_stops(cli, tmp_path, name):
    """status compared the files a build reads, and a link to nothing is not one: exit 0, then the nightly build
    failed on it (exit 1)."""
    docs = tmp_path / "docs"
    jsonl(docs / "a.jsonl", "a1")
    index = tmp_path / "idx"
    assert cli("index", docs, "-o", index).exit_code == 0
    (docs / name).symlink_to(tmp_path / "gone" / name)
    status = cli("status", index)
    assert (status.exit_code, status.stderr) == (8, ""), status.stdout
    assert status.stdout.startswith(f"corpus-changed: {docs / name}: a symlink to {tmp_path / 'gone' / name}")
    assert status.stdout.rstrip("\n").endswith(update_line(docs, index)) and status.stdout.count("\n") == 1
    as_json = json.loads(cli("status", index, "--json").stdout)
    assert (as_json["status"], as_json["exit_code"]) == ("corpus-changed", 8)
    one_error_line(cli("index", docs, "-o", index, "--update"), 1, str(docs / name), "does not exist")
    (docs / name).unlink()
    assert cli("status", index).exit_code == 0


@pytest.mark.parametrize("name", OTHER_FILES)
def test_a_link_to_a_missing_file_of_another_type_stops_neither_build_nor_status(cli, tmp_path, name):
    docs = tmp_path / "docs"
    jsonl(docs / "a.jsonl", "a1")
    (docs / name).symlink_to(tmp_path / "gone" / name)
    index = tmp_path / "idx"
    result = cli("index", docs, "-o", index)
    assert result.exit_code == 0, result.stderr
    assert stored_ids(index) == ["a1"]
    status = cli("status", index)
    assert (status.exit_code, status.stdout.split(":")[0]) == (0, "ok"), status.stdout


def test_with_format_a_link_to_a_missing_file_of_another_corpus_format_is_left_alone(cli, tmp_path):
    """README.md is a corpus file when every format is read, and not one under -f jsonl: build and status agree."""
    docs = tmp_path / "docs"
    jsonl(docs / "a.jsonl", "a1")
    (docs / "README.md").symlink_to(tmp_path / "gone.md")
    index = tmp_path / "idx"
    one_error_line(cli("index", docs, "-o", index), 1, str(docs / "README.md"), "does not exist")
    assert cli("index", docs, "-o", index, "-f", "jsonl").exit_code == 0
    assert cli("status", index).exit_code == 0
    (docs / "b.ndjson").symlink_to(tmp_path / "gone.ndjson")  # a file of the format read
    assert cli("status", index).exit_code == 8


@pytest.mark.parametrize("fmt", [None, "jsonl"])
@pytest.mark.parametrize("name", MAY_HOLD_PASSAGES + OTHER_FILES)
def test_the_build_and_the_walk_status_makes_agree_on_every_link_to_nothing(tmp_path, name, fmt):
    docs = tmp_path / "docs"
    jsonl(docs / "a.jsonl", "a1")
    (docs / "sub").mkdir()
    (docs / "sub" / name).symlink_to(tmp_path / "nowhere")
    try:
        corpus_files(docs, fmt)
        stops = False
    except InputError as exc:
        stops = True
        assert str(exc).startswith(f"{docs / 'sub' / name}: a symlink to {tmp_path / 'nowhere'}")
    reported = describe_source(str(docs), fmt=fmt).get("problem")
    assert stops == (reported is not None)
    read_by_format = name == "b.jsonl" or (name == "notes.md" and fmt is None)
    expected = name not in OTHER_FILES and (read_by_format or not name.endswith((".jsonl", ".md")))
    assert stops == expected


# --- 2. a link to a folder that holds the corpus ----------------------------------------------------------------


@pytest.mark.parametrize("target", ["..", "ROOT", "/"])
def test_a_link_to_a_folder_that_holds_the_corpus_stops_the_run_and_reads_nothing(cli, tmp_path, target):
    """docs/up -> .. read every file beside the corpus folder (and /, the whole disk); the corpus itself was
    only skipped because the walk had already visited it."""
    outer = tmp_path / "outer"
    docs = outer / "docs"
    jsonl(docs / "a.jsonl", "a1")
    jsonl(outer / "unrelated.jsonl", "u1")
    link = docs / "up"
    link.symlink_to({"ROOT": str(tmp_path), "..": ".."}.get(target, target), target_is_directory=True)
    real = os.path.realpath(link)
    index = tmp_path / "idx"
    result = cli("index", docs, "-o", index)
    one_error_line(result, 1, f"{link}: a symlink to {real}, which holds the corpus folder {docs}", "remove the link")
    assert not index.exists()
    assert describe_source(str(docs))["problem"].startswith(f"{link}: a symlink to {real}")


def test_a_new_link_around_the_corpus_is_reported_by_status_without_walking_it(cli, tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    jsonl(docs / "a.jsonl", "a1")
    jsonl(tmp_path / "beside.jsonl", "x1")
    index = tmp_path / "idx"
    assert cli("index", docs, "-o", index).exit_code == 0
    (docs / "all").symlink_to("/", target_is_directory=True)
    import dsearch.indexer

    scanned: list[str] = []
    real_scandir = os.scandir
    monkeypatch.setattr(dsearch.indexer.os, "scandir", lambda p: scanned.append(str(p)) or real_scandir(p))
    status = cli("status", index)
    assert (status.exit_code, status.stderr) == (8, "")
    assert status.stdout.startswith(f"corpus-changed: {docs / 'all'}: a symlink to /, which holds the corpus folder")
    assert str(docs) in scanned and "/" not in scanned  # the link was never walked
    one_error_line(cli("index", docs, "-o", index, "--update"), 1, f"{docs / 'all'}: a symlink to /")
    assert stored_ids(index) == ["a1"]


def test_links_inside_the_corpus_are_still_read_once_and_v_counts_what_was_walked(cli, tmp_path):
    docs, elsewhere = tmp_path / "docs", tmp_path / "elsewhere"
    jsonl(docs / "sub" / "a.jsonl", "a1")
    jsonl(elsewhere / "deep" / "b.jsonl", "b1")
    (docs / "sub" / "up").symlink_to("..", target_is_directory=True)  # the corpus folder itself: read once
    (docs / "linked").symlink_to(elsewhere, target_is_directory=True)  # another disk: followed
    index = tmp_path / "idx"
    result = cli("index", docs, "-o", index, "-v")
    assert result.exit_code == 0, result.stderr
    assert stored_ids(index) == ["b1", "a1"]
    size = (docs / "sub" / "a.jsonl").stat().st_size + (elsewhere / "deep" / "b.jsonl").stat().st_size
    assert f"{docs}: 2 corpus files ({size:,} bytes) found walking it and 3 folders below it" in result.stderr


# --- 3. a kept checkpoint that an update passes over ------------------------------------------------------------


def _failed_rebuild(cli, docs: Path, index: Path) -> Path:
    """A rebuild that fails after encoding (FAISS cannot train 1024 lists on 30 vectors): its vectors are kept."""
    failed = cli("index", docs, "-o", index, "--index-type", "IVF1024,Flat")
    one_error_line(failed, 2, "the encoded vectors are kept")
    (staging,) = index.glob(".staging-*")
    status = cli("status", index)
    assert (status.exit_code, status.stdout.split(":")[0]) == (6, "incomplete")
    assert "failed run left a checkpoint" in status.stdout and "--update --restart" in status.stdout
    return staging


@pytest.fixture
def docs_index(cli, tmp_path) -> tuple[Path, Path]:
    docs = tmp_path / "docs"
    jsonl(docs / "a.jsonl", *(f"a{i}" for i in range(20)))
    jsonl(docs / "b.jsonl", *(f"b{i}" for i in range(10)))
    index = tmp_path / "idx"
    assert cli("index", docs, "-o", index).exit_code == 0
    return docs, index


def test_an_update_that_finds_the_index_current_ends_the_incomplete_status_of_a_failed_rebuild(cli, docs_index):
    """The user changed their mind after a failed rebuild and went back to the nightly --update: it had nothing to
    do, so the checkpoint stayed and status said exit 6 for ever. The rebuild's rerun can still use it."""
    docs, index = docs_index
    before = (index / "manifest.json").read_bytes()
    staging = _failed_rebuild(cli, docs, index)
    update = cli("index", docs, "-o", index, "--update", "--index-type", "flat", "--json")
    assert update.exit_code == 0, update.stderr
    assert json.loads(update.stdout)["published"] is False
    assert (index / "manifest.json").read_bytes() == before  # the published index untouched
    status = cli("status", index)
    assert (status.exit_code, status.stderr) == (0, "")
    assert status.stdout.startswith(f"ok: {index}: 30 passages") and str(staging) in status.stdout
    assert json.loads(cli("status", index, "--json").stdout)["kept_checkpoint"] == str(staging)
    assert staging.is_dir()  # kept: the rebuild's rerun finishes without encoding
    encoders: list[HashingEncoder] = []
    cli.encoder_factory = lambda name, **kw: encoders.append(HashingEncoder(name)) or encoders[-1]
    rerun = cli("index", docs, "-o", index, "--index-type", "IVF2,Flat", "--json")
    assert rerun.exit_code == 0, rerun.stderr
    assert (json.loads(rerun.stdout)["resumed_at"], json.loads(rerun.stdout)["encoded"]) == (30, 0)
    assert sum(e.encoded_documents for e in encoders) == 0
    assert not list(index.glob(".staging-*"))
    assert cli("status", index).exit_code == 0


@pytest.mark.parametrize("change", ["touch", "restart"])
def test_a_checkpoint_no_run_can_resume_is_reported_as_such_and_removed_by_an_update_with_nothing_to_do(
    cli, docs_index, change
):
    """A touched corpus file changes every run's signature: the checkpoint can never be resumed, and status must
    not send the user to 'rerun to finish it'. --restart discards one that a run could still resume."""
    docs, index = docs_index
    before = (index / "manifest.json").read_bytes()
    staging = _failed_rebuild(cli, docs, index)
    if change == "touch":
        os.utime(docs / "b.jsonl", (2e9, 2e9))  # the same passages, another time
        status = cli("status", index)
        assert (status.exit_code, status.stdout.split(":")[0]) == (6, "incomplete")
        assert f"{staging}: a checkpoint that no run can resume (its corpus files changed since it was made)" in (
            status.stdout
        )
        assert "the next 'dsearch index' run removes it" in status.stdout
    update = cli("index", docs, "-o", index, "--update", *(["--restart"] if change == "restart" else []))
    assert update.exit_code == 0, update.stderr
    assert not staging.exists()
    status = cli("status", index)
    assert (status.exit_code, status.stdout.split(":")[0]) == (0, "ok"), status.stdout
    assert "kept" not in status.stdout and json.loads(cli("status", index, "--json").stdout)["kept_checkpoint"] is None
    if change == "restart":
        assert (index / "manifest.json").read_bytes() == before


def test_an_update_checkpoint_of_a_version_no_longer_published_is_obsolete(cli, docs_index):
    """An update's signature holds the index version it started from: once another is published, no update
    resumes it, and a rebuild never does."""
    from dsearch.health import obsolete_checkpoint
    from dsearch.manifest import read_manifest
    from dsearch.store import read_progress

    docs, index = docs_index
    jsonl(docs / "c.jsonl", "c1")  # something for the update to do
    failed = cli("index", docs, "-o", index, "--update", "--index-type", "IVF1024,Flat")
    one_error_line(failed, 2, "the encoded vectors are kept")
    (staging,) = index.glob(".staging-*")
    progress = read_progress(staging)
    manifest = read_manifest(index)
    assert progress["made_from"]["base"] == manifest.created_at
    assert obsolete_checkpoint(progress, manifest) is None  # the same update resumes it
    manifest.created_at = "2000-01-01T00:00:00+00:00"  # another version published since
    assert "no longer published" in obsolete_checkpoint(progress, manifest)
    rerun = cli("index", docs, "-o", index, "--update", "--json")
    assert rerun.exit_code == 0, rerun.stderr
    assert json.loads(rerun.stdout)["resumed_at"] == 31
