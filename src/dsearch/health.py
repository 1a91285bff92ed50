"""``dsearch status``: is the index present, complete, intact, fresh and built from the corpus as it is now?"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from dsearch.corpus import FORMATS
from dsearch.errors import (
    EXIT_OK,
    EXIT_STATUS_BROKEN,
    EXIT_STATUS_CORPUS_CHANGED,
    EXIT_STATUS_MISSING,
    EXIT_STATUS_TOO_OLD,
    DsearchError,
)
from dsearch.indexer import describe_source
from dsearch.manifest import MANIFEST_FILE, Manifest
from dsearch.store import (
    OpenIndex,
    leftover_segments,
    lock_is_held,
    read_progress,
    staging_dirs,
    unlisted_ann_files,
)

# When several things are wrong, the exit code is the first of these that applies.
_ORDER = {
    "missing": EXIT_STATUS_MISSING,
    "incomplete": EXIT_STATUS_BROKEN,
    "corrupt": EXIT_STATUS_BROKEN,
    "too-old": EXIT_STATUS_TOO_OLD,
    "corpus-changed": EXIT_STATUS_CORPUS_CHANGED,
}


@dataclass
class StatusReport:
    index: str
    problems: list[dict[str, str]] = field(default_factory=list)  # {"kind": …, "detail": …}
    passages: int | None = None
    created_at: str | None = None
    age_seconds: float | None = None
    updating: bool = False  # another run holds the lock right now
    kept_checkpoint: str | None = None  # an unfinished run's checkpoint that an --update passed over: not a problem

    @property
    def status(self) -> str:
        return self.problems[0]["kind"] if self.problems else "ok"

    @property
    def exit_code(self) -> int:
        return _ORDER[self.status] if self.problems else EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "index": self.index,
            "passages": self.passages,
            "created_at": self.created_at,
            "age_seconds": self.age_seconds,
            "updating": self.updating,
            "kept_checkpoint": self.kept_checkpoint,
            "problems": self.problems,
        }

    def line(self) -> str:
        if not self.problems:
            age = f", built {_human_age(self.age_seconds)} ago" if self.age_seconds is not None else ""
            busy = "; a run is updating it now" if self.updating else ""
            if self.kept_checkpoint:
                busy += f"; an unfinished run's checkpoint is kept for its rerun in {self.kept_checkpoint}"
            return _one_line(f"ok: {self.index}: {self.passages:,} passages{age}{busy}")  # 2,000 as `info` has it
        return _one_line("; ".join(f"{p['kind']}: {p['detail']}" for p in self.problems))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(text: str) -> str:
    """The status line stays one line for the monitor that reads it, and sends no raw control characters to a
    terminal, whatever a path holds: a newline shows as ``\\x0a`` (the command in it is quoted without any)."""
    return _CONTROL.sub(lambda m: _code(m.group()), text)


def _code(char: str) -> str:
    return f"\\x{ord(char):02x}" if ord(char) < 256 else f"\\u{ord(char):04x}"


def shell_join(words: list[str]) -> str:
    """``shlex.join``, except that a word with a control character (a newline in a folder's name) is written in
    bash's ``$'...'`` quoting, so that the command stays on one line and runs as printed in bash and zsh."""
    return " ".join(_ansi_c_quote(w) if _CONTROL.search(w) else shlex.quote(w) for w in words)


def _ansi_c_quote(word: str) -> str:
    def escape(char: str) -> str:
        if char in "\\'":
            return "\\" + char
        return _code(char) if _CONTROL.fullmatch(char) else char

    return "$'" + "".join(escape(c) for c in word) + "'"


def _human_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def check_index(directory: Path, corpus: list[str] | None = None, max_age: float | None = None) -> StatusReport:
    try:
        return _check_index(directory, corpus, max_age)
    except OSError as exc:  # a file or folder it may not read (a cron user's permissions), an I/O error
        # Broken for every reader too (queries fail on it): a status, not an 'unexpected error' without one.
        report = StatusReport(str(directory))
        where = exc.filename if exc.filename else directory
        fix = "check its permissions" if exc.errno in (errno.EACCES, errno.EPERM) else "check the disk"
        problem = f"{where}: cannot read it ({exc.strerror or exc}); {fix}, then run 'dsearch status' again"
        report.problems.append({"kind": "corrupt", "detail": problem})
        return report


def _check_index(directory: Path, corpus: list[str] | None, max_age: float | None) -> StatusReport:
    report = StatusReport(str(directory))
    report.updating = lock_is_held(directory)
    checkpoints = [] if report.updating else _checkpoints(directory)
    if not (directory / MANIFEST_FILE).exists():
        report.problems += _checkpoint_problems(checkpoints, None, report)
        detail = f"{directory}: no index here; build it with 'dsearch index'"
        if report.updating:  # the first build is running: telling cron to start one would only get exit 4
            detail = f"{directory}: no index here yet; a run is building it now, check again when it ends"
        report.problems.insert(0, {"kind": "missing", "detail": detail})
        return report
    try:
        opened = OpenIndex(directory, verify=True)
    except DsearchError as exc:
        report.problems += _checkpoint_problems(checkpoints, None, report)
        report.problems.insert(0, {"kind": "corrupt", "detail": exc.for_cli()})  # `dsearch status` prints it
        return report
    manifest = opened.manifest
    report.problems += _checkpoint_problems(checkpoints, manifest, report)
    orphans = leftover_segments(directory, {s.path for s in manifest.segments})
    if orphans and not report.updating:
        report.problems.append(
            {
                "kind": "incomplete",
                "detail": f"{directory}: {len(orphans)} segment folder(s) that no manifest names ({orphans[0].name}), "
                "left by an interrupted or crashed run; the next 'dsearch index' run removes them",
            }
        )
    stray = unlisted_ann_files(directory, manifest)
    if stray and not report.updating:
        report.problems.append(
            {
                "kind": "incomplete",
                "detail": f"{stray[0]}: an ANN file that the manifest does not list, left by an interrupted "
                "'dsearch reindex'; the index is intact, and the next 'dsearch reindex' or 'dsearch index' run "
                "removes it",
            }
        )
    report.passages = manifest.passages  # not rows: a split passage has several
    report.created_at = manifest.created_at
    created = dt.datetime.fromisoformat(manifest.created_at)
    if created.tzinfo is None:
        created = created.replace(tzinfo=dt.UTC)  # written by dsearch in UTC
    report.age_seconds = round((dt.datetime.now(dt.UTC) - created).total_seconds(), 1)
    if max_age is not None and report.age_seconds > max_age:
        report.problems.append(
            {
                "kind": "too-old",
                "detail": f"{directory}: built {_human_age(report.age_seconds)} ago, "
                f"more than the allowed {_human_age(max_age)}; rebuild it with 'dsearch index' "
                # Not `dsearch reindex` (it keeps the build time), and not --update alone: with nothing to
                # change it publishes nothing, so an up-to-date index keeps aging.
                "(an --update that finds nothing to change keeps the old build time)",
            }
        )
    fmt = manifest.corpus.get("format")
    changed = _changed_sources(manifest.corpus.get("sources", []), corpus, fmt if fmt in FORMATS else None)
    if changed:
        report.problems.append(
            {
                "kind": "corpus-changed",
                # A path that is gone (an unmounted or moved corpus), or a link the build stops on, fails the
                # update until it is put right: the line says what to do first.
                "detail": f"{changed.how}; {changed.first + ', then ' if changed.first else ''}"
                f"run '{update_command(directory, manifest, corpus)}'",
            }
        )
    report.problems.sort(key=lambda p: list(_ORDER).index(p["kind"]))  # the first problem sets the exit code
    return report


def _checkpoints(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The staging areas in ``directory`` that hold a checkpoint, with its record."""
    found = ((root, read_progress(root)) for root in staging_dirs(directory))
    return [(root, progress) for root, progress in found if progress is not None]


def _checkpoint_problems(
    checkpoints: list[tuple[Path, dict[str, Any]]], manifest: Manifest | None, report: StatusReport
) -> list[dict[str, str]]:
    """What kept checkpoints mean for the index (``manifest``: the one published, if it reads): an unfinished
    run to rerun; debris that no run can resume, which the next run removes; or, once an --update found the index
    complete and current after it, no problem at all (``report.kept_checkpoint`` names it for the ok line)."""
    for root, progress in checkpoints:
        why = obsolete_checkpoint(progress, manifest) if manifest is not None else None
        if why:
            detail = f"{root}: a checkpoint that no run can resume ({why}); the next 'dsearch index' run removes it"
        elif manifest is not None and "passed_over" in progress:
            report.kept_checkpoint = report.kept_checkpoint or str(root)
            continue
        else:
            detail = (
                f"an interrupted or failed run left a checkpoint in {root}; rerun 'dsearch index' to finish it "
                "(or --update --restart to discard it)"
            )
        return [{"kind": "incomplete", "detail": detail}]
    return []


def obsolete_checkpoint(progress: dict[str, Any], manifest: Manifest) -> str | None:
    """Why no run can resume this checkpoint any more, or None while one still can (or when the dsearch that made
    it did not record what from).

    A run resumes a checkpoint only with the signature it was made with (``indexer._signature``), which holds the
    size and time of every corpus file, and for an ``--update`` the version of the index it started from. Once
    the files are different, every run's signature differs (a corpus path that is gone is not that: an unmounted
    disk comes back), and once another version is published, every update's does (a rebuild records none).
    """
    made_from = progress.get("made_from")
    if not isinstance(made_from, dict):
        return None
    base = made_from.get("base")
    if base is not None and base != manifest.created_at:
        return "it was an update of an index version that is no longer published"
    sources, fmt = made_from.get("sources"), made_from.get("format")
    change = _changed_sources(sources if isinstance(sources, list) else [], None, fmt if fmt in FORMATS else None)
    if change is not None and change.lasting:
        return "its corpus files changed since it was made"
    return None


def update_command(directory: Path, manifest: Manifest, given: list[str] | None = None) -> str:
    """The command that brings this index up to date, from what its manifest recorded, quoted for a shell.

    An index built from stdin recorded no files, and --update cannot read stdin: the corpus paths given to
    ``status --corpus`` stand in, else a CORPUS placeholder (never a command without a corpus).
    """
    corpus = manifest.corpus
    paths = [str(s.get("path")) for s in corpus.get("sources", []) if isinstance(s, dict) and s.get("path") != "-"]
    words = ["dsearch", "index", *(paths or given or ["CORPUS"])]
    words += ["-o", str(directory), "--update"]
    if corpus.get("format"):
        words += ["--format", str(corpus["format"])]
    for name, value in (corpus.get("fields") or {}).items():
        if value is not None and name in ("id", "text", "title"):
            words += [f"--{name}-field", str(value)]
    return shell_join(words)


class _Change(NamedTuple):
    """How a corpus path differs from the build's record, for the status line."""

    how: str  # what differs
    first: str  # what to do before the update command can succeed ("" when it can now)
    lasting: bool  # its files differ: no run reads the corpus as recorded again (a path that is gone may come back)


def _changed_sources(recorded: list[Any], corpus: list[str] | None, fmt: str | None = None) -> _Change | None:
    """How the first corpus path whose files, size or modification time differ from the build's record differs:
    ``PATH changed``; ``PATH is gone …`` when nothing is there now (unmounted, moved); or a link in it that a
    build reading ``fmt`` stops on (to nothing, or to a folder that holds the corpus), whatever else changed:
    the update command alone would fail on it.

    Paths come from the manifest, which may be damaged or hostile: a folder is walked no further than the
    number of files and folders the build recorded there (plus one, which is enough to see a change), so a
    manifest that names ``/usr`` costs as much as the build's own walk and no more. (A cap in seconds or a
    fixed count would either cut real corpora short or still let a hostile record walk far; the record's own
    size is the bound that is right for each index.)
    """
    by_path = {s["path"]: s for s in recorded if isinstance(s, dict) and isinstance(s.get("path"), str)}
    by_path.pop("-", None)
    paths = corpus if corpus is not None else list(by_path)
    for path in paths:
        resolved = os.path.realpath(path)  # not Path.resolve(): it raises RuntimeError on a symlink loop
        then = by_path.get(resolved)
        if then is None:
            then, inside = _recorded_part(by_path, resolved)
            if then is None:
                return _Change(f"{path} ({inside or 'not part of the build'}) changed{_SINCE}", "", True)
        # Files and folders the build saw, plus one: enough to see a change, and no more than the build walked.
        # (Records from before "folders" was kept: the files count stands in for both.)
        files = then.get("files") if isinstance(then.get("files"), int) else 0
        folders = then.get("folders") if isinstance(then.get("folders"), int) else files
        if not os.path.lexists(path):
            return _Change(f"{path} is gone (unmounted or moved?){_SINCE}", "restore it", False)
        now = describe_source(path, budget=max(files, 0) + max(folders, 0) + 1, fmt=fmt)
        if now.get("problem"):  # the build stops on it (exit 1), and so would the update this line gives
            return _Change(f"{now['problem']}: the next 'dsearch index' stops on it", "put that right", False)
        if now.get("cut_short") or any(now[k] != then.get(k) for k in ("files", "bytes", "mtime")):
            return _Change(f"{path} changed{_SINCE}", "", True)
        # File by file where the build listed them: a renamed file or linked folder keeps the totals but changes
        # the passages a build reads (text passages' ids name their file).
        if isinstance(then.get("listing"), dict) and "listing" in now and now["listing"] != then["listing"]:
            return _Change(f"{path} changed{_SINCE}", "", True)
    return None


_SINCE = " since the index was built"


def _recorded_part(by_path: dict[str, dict[str, Any]], resolved: str) -> tuple[dict[str, Any] | None, str]:
    """What the build recorded for a file or folder inside one of its source folders (from that folder's listing)."""
    for root, source in by_path.items():
        if not resolved.startswith(root.rstrip("/") + "/"):
            continue
        listing = source.get("listing")
        if not isinstance(listing, dict):
            return None, f"inside {root}, whose files were too many to record one by one; give {root} itself"
        prefix = resolved[len(root.rstrip("/")) + 1 :]
        names = [k for k in listing if k == prefix or k.startswith(prefix + "/")]
        if not names:
            return None, "not part of the build"
        files = [listing[k] for k in names]
        folders = {str(Path(k).parent) for k in names if k != prefix} - {prefix, "."}
        return {
            "folders": len(folders),
            "files": len(files),
            "bytes": sum(v[0] for v in files),
            "mtime": max(v[1] for v in files),
        }, ""
    return None, ""
