"""``dsearch status``: is the index present, complete, intact, fresh and built from the corpus as it is now?"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsearch.errors import (
    EXIT_OK,
    EXIT_STATUS_BROKEN,
    EXIT_STATUS_CORPUS_CHANGED,
    EXIT_STATUS_MISSING,
    EXIT_STATUS_TOO_OLD,
    DsearchError,
)
from dsearch.indexer import describe_sources
from dsearch.manifest import MANIFEST_FILE
from dsearch.store import OpenIndex, lock_is_held, read_progress, staging_dirs

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
            "problems": self.problems,
        }

    def line(self) -> str:
        if not self.problems:
            age = f", built {_human_age(self.age_seconds)} ago" if self.age_seconds is not None else ""
            busy = "; a run is updating it now" if self.updating else ""
            return f"ok: {self.index}: {self.passages} passages{age}{busy}"
        return "; ".join(f"{p['kind']}: {p['detail']}" for p in self.problems)


def _human_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def check_index(directory: Path, corpus: list[str] | None = None, max_age: float | None = None) -> StatusReport:
    report = StatusReport(str(directory))
    report.updating = lock_is_held(directory)
    leftovers = [d for d in staging_dirs(directory) if read_progress(d) is not None]
    if leftovers and not report.updating:
        report.problems.append(
            {
                "kind": "incomplete",
                "detail": f"an interrupted run left a checkpoint in {leftovers[0]}; rerun 'dsearch index' to finish it",
            }
        )
    if not (directory / MANIFEST_FILE).exists():
        report.problems.insert(
            0, {"kind": "missing", "detail": f"{directory}: no index here; build it with 'dsearch index'"}
        )
        return report
    try:
        opened = OpenIndex(directory, verify=True)
    except DsearchError as exc:
        report.problems.insert(0, {"kind": "corrupt", "detail": str(exc)})
        return report
    manifest = opened.manifest
    report.passages = manifest.rows
    report.created_at = manifest.created_at
    created = dt.datetime.fromisoformat(manifest.created_at)
    report.age_seconds = round((dt.datetime.now(dt.UTC) - created).total_seconds(), 1)
    if max_age is not None and report.age_seconds > max_age:
        report.problems.append(
            {
                "kind": "too-old",
                "detail": f"built {_human_age(report.age_seconds)} ago, "
                f"more than the allowed {_human_age(max_age)}; reindex",
            }
        )
    changed = _changed_sources(manifest.corpus.get("sources", []), corpus)
    if changed:
        report.problems.append(
            {
                "kind": "corpus-changed",
                "detail": f"{changed} changed since the index was built; run 'dsearch index --update'",
            }
        )
    return report


def _changed_sources(recorded: list[dict[str, Any]], corpus: list[str] | None) -> str | None:
    """The first corpus path whose files, size or modification time differ from the build's record."""
    by_path = {s["path"]: s for s in recorded if s.get("path") != "-"}
    paths = corpus if corpus is not None else list(by_path)
    for now in describe_sources(paths):
        then = by_path.get(str(now["path"]))
        if then is None:
            return f"{now['path']} (not part of the build)"
        if any(now[k] != then.get(k) for k in ("files", "bytes", "mtime")):
            return str(now["path"])
    return None
