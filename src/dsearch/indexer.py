"""Build or update an index: corpus passages → batches → encoder → segment writer → atomic publish.

A build holds the index's lock, checkpoints as it goes (an interrupted run resumes from its last checkpoint),
and with ``update`` re-encodes only the passages whose encoded text changed, reusing every other vector.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from itertools import chain, islice
from pathlib import Path
from typing import IO, Any, NamedTuple

import xxhash

from dsearch.corpus import (
    CorpusStats,
    FieldNames,
    Passage,
    Records,
    corpus_files,
    dangling_link,
    format_of_name,
    is_index_dir,
    link_above,
    needs_tokenizer,
    read_corpus,
    suffixes_of,
)
from dsearch.distributed import ChunkEncoder, LocalEncoder
from dsearch.encoder import Encoder
from dsearch.errors import DsearchError, IndexDirError, InputError, TooManyRemovedError, UsageError, option, spell
from dsearch.filters import field_types, has_field_columns, write_field_columns
from dsearch.lexical import build_lexical, has_lexical
from dsearch.manifest import FORMAT_VERSION, OLDEST_FORMAT_VERSION, Manifest, ModelInfo, Segment, read_manifest
from dsearch.store import (
    INDEX_TYPE,
    PASSAGES_FILE,
    WINDOW_COLUMNS,
    OpenIndex,
    SegmentWriter,
    Staging,
    check_target,
    content_hash,
    fault_point,
    file_info,
    index_lock,
    passage_row,
    publish,
    read_progress,
    rewrite_manifest,
    save_progress,
    staging_area,
    staging_dirs,
    tidy,
)
from dsearch.windows import DEFAULT_OVERLAP, budget, window_spans

log = logging.getLogger("dsearch")

# Passages handed to the encoder at once. Each call sorts by length, so a few batches' worth per call lets
# similar lengths share a batch without holding much in memory.
BATCHES_PER_CHUNK = 8


def checkpoint_interval() -> float:
    """Seconds between checkpoints: 30, or DSEARCH_CHECKPOINT_SECONDS (tests use 0: after every chunk)."""
    return float(os.environ.get("DSEARCH_CHECKPOINT_SECONDS", "30"))


ProgressCallback = Callable[[int], None]
EncoderSource = Encoder | Callable[[], Encoder]


@dataclass
class BuildSummary:
    """What an index run did; printed on stderr, or as JSON on stdout with ``--json``."""

    index: str
    model: str
    precision: str
    indexed: int  # passages in the published index
    windows: int = 0  # rows (vectors) in the published index: more than passages when long ones were split
    added: int = 0
    updated: int = 0  # encoded text changed: re-encoded
    metadata_only: int = 0  # same encoded text, other fields changed: vector reused
    unchanged: int = 0
    removed: int = 0
    encoded: int = 0
    skipped_empty: int = 0
    skipped_bad: int = 0
    truncated: int = 0
    resumed_at: int = 0  # rows recovered from an interrupted run's checkpoint
    published: bool = True
    seconds: float = 0.0
    passages_per_second: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("dsearch", "faiss-cpu", "sentence-transformers", "torch", "onnxruntime", "pyarrow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


# A folder source records each file's size and time when it has at most this many files, so that `status
# --corpus FILE` can check one file inside it; beyond that only the totals (the manifest is read by every query).
LISTED_FILES = 1000


class _Walk:
    """The corpus files under a folder, in a stable order, skipping what a build skips (hidden entries, index
    directories, ``exclude``, files of no corpus format); with a budget, it stops after that many entries (files
    and folders alike, so that a tree of empty folders is bounded too) and says it did. A link that the build
    refuses (to nothing, or to a folder that holds the corpus, by ``corpus.corpus_files``'s rules for ``fmt``) is
    not followed: the first one's error line is ``problem``, so that ``status`` can say the next build stops."""

    def __init__(
        self, root: Path, budget: int | None = None, exclude: Iterable[str] = (), fmt: str | None = None
    ) -> None:
        self.root = root
        self.budget = budget
        self.excluded = {os.path.realpath(p) for p in exclude}
        self.fmt = fmt
        self.folders = 0
        self.cut_short = False
        self.problem: str | None = None

    def _refused(self, error: InputError | None) -> bool:
        if error is not None and self.problem is None:
            self.problem = error.for_cli()
        return error is not None

    def __iter__(self) -> Iterator[Path]:
        seen = 0
        stack = [self.root]
        root_real = os.path.realpath(self.root)
        visited = {root_real}  # as corpus.corpus_files: linked folders followed, each once
        while stack:
            folder = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            subfolders = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                is_dir = entry.is_dir()
                if not is_dir and not entry.is_file():
                    if entry.is_symlink() and not os.path.exists(entry.path):  # not counted: it leads nowhere
                        self._refused(dangling_link(Path(entry.path), self.fmt))
                    continue
                if not is_dir and format_of_name(entry.name) is None:
                    continue
                real = os.path.realpath(entry.path) if is_dir else ""
                if is_dir and (real in self.excluded or real in visited or is_index_dir(entry.path)):
                    continue
                if is_dir and self._refused(link_above(entry.path, real, root_real)):
                    continue  # never walked: it holds the whole corpus and more
                seen += 1
                if self.budget is not None and seen > self.budget:
                    self.cut_short = True
                    return
                if is_dir:
                    visited.add(real)
                    self.folders += 1
                    subfolders.append(Path(entry.path))
                else:
                    yield Path(entry.path)
            stack.extend(reversed(subfolders))  # walked in sorted order, depth first, as os.walk walks them


def describe_source(
    path: str, budget: int | None = None, exclude: Iterable[str] = (), fmt: str | None = None
) -> dict[str, Any]:
    """Size and times of one corpus path. With ``budget``, a folder is walked no further than that many entries,
    and ``cut_short`` says when the walk stopped early (so the folder differs from the record). ``problem`` is the
    error line of a link in the folder that a build reading ``fmt`` stops on (never in a build's own record: that
    build stopped first)."""
    p = Path(path)
    walk = _Walk(p, budget, exclude, fmt) if p.is_dir() else None
    files = list(walk) if walk is not None else [p]
    stats = {}
    for f in files:
        with suppress(OSError):
            stats[f] = f.stat()
    source: dict[str, Any] = {
        "path": os.path.realpath(p),  # not Path.resolve(): it raises RuntimeError on a symlink loop
        "files": len(stats),
        "bytes": sum(s.st_size for s in stats.values()),
        "mtime": max((s.st_mtime for s in stats.values()), default=0.0),
    }
    if walk is not None:
        source["folders"] = walk.folders
        if walk.cut_short:
            source["cut_short"] = True
        elif len(stats) <= LISTED_FILES:
            source["listing"] = {str(f.relative_to(p)): [s.st_size, s.st_mtime] for f, s in stats.items()}
        if walk.problem is not None:
            source["problem"] = walk.problem
    return source


def describe_sources(
    paths: Iterable[str | Records], exclude: Iterable[str] = (), fmt: str | None = None
) -> list[dict[str, object]]:
    """Where the corpus came from, with sizes and times, so ``status`` can tell when it changed. A folder counts
    the files a build reads, never an index inside it (``exclude``: the one being written). Stdin and passages
    handed over by a program are ``-``: there is nothing to check again."""
    return [
        {"path": "-"} if not isinstance(path, str) or path == "-" else describe_source(path, exclude=exclude, fmt=fmt)
        for path in paths
    ]


def _log_sources(sources: list[dict[str, Any]]) -> None:
    """Under -v, how much of the disk each corpus folder walked: a link to a huge tree shows here."""

    def count(n: int, word: str) -> str:
        return f"{n:,} {word}{'' if n == 1 else 's'}"

    for source in sources:
        if "folders" in source:
            log.info(
                "%s: %s (%s bytes) found walking it and %s below it", source["path"],
                count(source["files"], "corpus file"), f"{source['bytes']:,}", count(source["folders"], "folder"),
            )  # fmt: skip


def count_records(paths: list[str]) -> int | None:
    """A cheap upper bound of the passages to come (line counts), for the progress bar's ETA."""
    total = 0
    for path in paths:
        p = Path(path)
        if path == "-" or p.is_dir() or p.suffix.lower() not in {".jsonl", ".ndjson", ".json", ".tsv", ".csv"}:
            return None
        with open(p, "rb") as fh:
            total += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 22), b""))
    return total


def model_info(encoder: Encoder) -> ModelInfo:
    return ModelInfo(
        name=encoder.name,
        fingerprint=encoder.fingerprint,
        dim=encoder.dim,
        similarity=encoder.similarity,
        max_seq_length=encoder.max_seq_length,
        prompts=dict(encoder.prompts),
        precision=encoder.precision,
    )


def new_manifest(info: ModelInfo, segment: Segment, corpus: dict[str, Any], stats: dict[str, Any]) -> Manifest:
    """The manifest of a one-segment index built now with this dsearch."""
    return Manifest(
        model=info,
        index_type=INDEX_TYPE,
        rows=segment.rows,
        segments=[segment],
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        versions=library_versions(),
        corpus=corpus,
        stats=stats,
    )


class _LazyEncoder:
    """Loads the model on first use, so an update with nothing to encode never imports torch."""

    def __init__(self, source: EncoderSource) -> None:
        self._source = source
        self._encoder: Encoder | None = source if hasattr(source, "encode_documents") else None  # type: ignore
        self.load_seconds = 0.0

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def get(self) -> Encoder:
        if self._encoder is None:
            started = time.perf_counter()
            self._encoder = self._source()  # type: ignore[operator]
            # Loading (and a first run's ONNX export) is not encoding: kept out of passages/s.
            self.load_seconds = time.perf_counter() - started
        return self._encoder


class StoredRow(NamedTuple):
    row: int  # the passage's first row; a split passage's windows follow it
    content_hash: str
    metadata_hash: str  # a hash, not the metadata itself: memory per stored passage stays small
    windows: tuple[tuple[int, int] | None, ...] = (None,)  # the span of each row's window; None: the whole text


def _stored_rows(index: OpenIndex) -> dict[str, StoredRow]:
    """id → where and what each stored passage is (ids, hashes and metadata only; not the text's vectors)."""
    stored: dict[str, StoredRow] = {}
    columns = ("id", "content_hash", "title", "text", "source", "fields", *WINDOW_COLUMNS)
    previous = None
    for row, data in enumerate(index.iter_rows(columns)):
        span = None if data["window_start"] is None else (data["window_start"], data["window_end"])
        if data["id"] == previous:  # the next window of the same passage: rows of one passage are contiguous
            old = stored[previous]
            stored[previous] = old._replace(windows=(*old.windows, span))
            continue
        stored[data["id"]] = StoredRow(row, data["content_hash"], _metadata_hash(data), (span,))
        previous = data["id"]
    return stored


@dataclass(frozen=True)
class SplitSpec:
    """How long passages are cut into windows (``None`` in the manifest: truncated at max_seq_length)."""

    overlap: int = DEFAULT_OVERLAP

    def as_dict(self) -> dict[str, int]:
        return {"overlap": self.overlap}


def _metadata_hash(row: dict[str, Any]) -> str:
    fields = [row["title"], row["text"], row["source"], row["fields"]]
    return xxhash.xxh3_64_hexdigest(json.dumps(fields, ensure_ascii=False).encode())


def _check_compatible(
    manifest: Manifest, model_name: str | None, precision: str | None, split: SplitSpec | None
) -> None:
    """An update must use the index's own model, precision, windows and format; otherwise say to rebuild."""
    hint = f"; rebuild it in full (without {option('update', True)})"
    stored_split = manifest.corpus.get("split")
    wanted_split = split.as_dict() if split else None
    if stored_split != wanted_split:
        def describe(value: dict[str, Any] | None) -> str:
            if not value:
                return option("split", False)
            return spell(f"--split --overlap {value['overlap']}", f"split=True, overlap={value['overlap']}")

        raise IndexDirError(
            f"the index's long passages were cut with {describe(stored_split)}, not {describe(wanted_split)}{hint}"
        )
    if not OLDEST_FORMAT_VERSION <= manifest.format_version <= FORMAT_VERSION:
        raise IndexDirError(f"index format version {manifest.format_version} is not the current {FORMAT_VERSION}{hint}")
    if model_name is not None and model_name != manifest.model.name:
        raise IndexDirError(f"the index was built with model {manifest.model.name!r}, not {model_name!r}{hint}")
    if precision not in (None, "auto") and precision != manifest.model.precision:
        raise IndexDirError(f"the index was built at precision {manifest.model.precision}, not {precision}{hint}")


@dataclass
class CorpusSpec:
    """How to read the corpus: which paths, in which format, with which field names."""

    paths: list[str | Records]
    fmt: str | None = None
    names: FieldNames = field(default_factory=FieldNames)
    skip_bad: bool = False
    stdin: IO[bytes] | None = None
    exclude: tuple[str, ...] = ()  # the index being written, when it sits inside the corpus


def _read(corpus: CorpusSpec, stats: CorpusStats, lazy: _LazyEncoder, log_skipped: bool = True) -> Iterator[Passage]:
    # Only text files need the tokenizer (to cut windows); structured formats never load the model here.
    fmt = corpus.fmt
    needs_tokens = needs_tokenizer(corpus.paths, fmt, corpus.exclude)
    spans = lazy.get().token_spans if needs_tokens else None
    max_tokens = lazy.get().max_text_tokens if needs_tokens else 256
    args = (corpus.paths, fmt, corpus.names, corpus.skip_bad, stats, spans, max_tokens, corpus.stdin)
    return read_corpus(*args, exclude=corpus.exclude, log_skipped=log_skipped)


@dataclass
class _Counts:
    added: int = 0
    updated: int = 0
    metadata_only: int = 0
    unchanged: int = 0
    encoded: int = 0
    truncated: int = 0
    seen_stored: set[str] = field(default_factory=set)

    def changes(self, stored_total: int) -> int:
        return self.added + self.updated + self.metadata_only + (stored_total - len(self.seen_stored))

    def saved(self) -> dict[str, int]:
        """What a checkpoint keeps (``encoded`` is this run's; ``seen_stored`` is rebuilt on resume)."""
        return {k: getattr(self, k) for k in ("added", "updated", "metadata_only", "unchanged", "truncated")}


def _classify(passage: Passage, hash_: str, row: dict[str, Any], stored: dict[str, StoredRow], counts: _Counts) -> bool:
    """Count one passage against the stored index; True when it must be (re-)encoded."""
    old = stored.get(passage.id)
    if old is None:
        counts.added += 1
        return True
    counts.seen_stored.add(passage.id)
    if old.content_hash != hash_:
        counts.updated += 1
        return True
    if old.metadata_hash != _metadata_hash(row):
        counts.metadata_only += 1
    else:
        counts.unchanged += 1
    return False


_STREAM = "stream-"  # the signature of a run whose passages cannot be read again


def _signature(
    corpus: CorpusSpec, model: str | None, precision: str | None, base: Manifest | None, split: SplitSpec | None
) -> tuple[str, dict[str, Any] | None]:
    """What a checkpoint was made from: a resumed run must read the same corpus the same way, and cut it into the
    same windows (a --no-split checkpoint resumed with --split published truncated vectors as windows).

    Also the parts of it that can stop matching every run for good, which the checkpoint records in the open
    (``health.obsolete_checkpoint``): the corpus files as they were, and the index version an update started from.
    """
    if any(not isinstance(p, str) or p == "-" for p in corpus.paths):
        # stdin or a program's passages cannot be read again: never resume
        return f"{_STREAM}{time.time_ns()}", None
    parts = {
        "sources": describe_sources(corpus.paths, fmt=corpus.fmt),
        "format": corpus.fmt,
        "names": asdict(corpus.names),
        "skip_bad": corpus.skip_bad,
        "model": model,
        "precision": precision,
        "base": base.created_at if base else None,
        "split": split.as_dict() if split else None,
    }
    signature = xxhash.xxh3_128_hexdigest(json.dumps(parts, sort_keys=True).encode())
    return signature, {k: parts[k] for k in ("sources", "format", "base")}


@dataclass
class RemovalLimit:
    """How many of an index's passages one run may remove (``--max-remove N`` or ``P%``); default: half.

    A cron job fed an empty, truncated or unmounted corpus would otherwise publish an empty index and exit 0.
    """

    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> RemovalLimit:
        if text is None:
            return cls()
        try:
            if text.endswith("%"):
                percent = float(text[:-1])
                if 0 <= percent <= 100:
                    return cls(percent=percent)
            elif int(text) >= 0:
                return cls(count=int(text))
        except ValueError:
            pass
        given = spell(f"--max-remove {text!r}", f"max_remove={text!r}")
        raise UsageError(f"{given} is not a number of passages (5000) or a percentage (0-100%)")

    def allowed(self, existing: int) -> int:
        if self.count is not None:
            return self.count
        return int(existing * (self.percent if self.percent is not None else 50) // 100)

    def check(self, target: Path, existing: int, remaining: int, removed: int, why: str = "") -> None:
        """Refuse (exit 9) before anything is published when ``removed`` is over the limit."""
        if removed <= self.allowed(existing):
            return
        allowed = self.allowed(existing)
        chosen = self.count is not None or self.percent is not None
        limit = f"{spell('--max-remove', 'max_remove')} allows {allowed:,}" if chosen else (
            f"the default limit is {allowed:,} (half)"
        )
        raise TooManyRemovedError(
            f"{target}: refusing to remove {removed:,} of the index's {existing:,} passages, leaving {remaining:,}"
            f"{why}; {limit}; nothing was published (if that is intended, rerun with {option('max_remove', removed)} "
            f"or {option('max_remove', '100%')})"
        )


def _no_passages(corpus: CorpusSpec, stats: CorpusStats) -> str:
    where = ", ".join(map(str, corpus.paths))
    folders = [p for p in corpus.paths if isinstance(p, str) and p != "-" and os.path.isdir(p)]
    empty = [p for p in folders if not corpus_files(p, corpus.fmt, corpus.exclude)]
    if empty:  # an empty or unmounted folder, or one without files of the formats read
        kinds = " ".join(suffixes_of(corpus.fmt))
        return f"{where} gave no passages: no corpus files in {', '.join(empty)} (read: {kinds}, each also .gz)"
    return f"{where} gave no passages: {stats.skipped_empty} empty and {stats.skipped_bad} bad skipped"


_DISK_FIXES = {
    errno.ENOSPC: "free some space or write the index elsewhere with -o",
    errno.EDQUOT: "free some space or write the index elsewhere with -o",
    errno.EACCES: "check its permissions or choose another -o",
    errno.EPERM: "check its permissions or choose another -o",
    errno.EROFS: "the file system is read-only: choose another -o",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another -o",
    errno.EFBIG: "a file reached the size limit (ulimit -f, or the file system's): raise it or choose another -o",
    errno.ENAMETOOLONG: "a name in the path is too long: choose another -o",
    errno.ELOOP: "a symlink in the path leads back to itself: fix the link or choose another -o",
}


def build_index(
    paths: list[str | Records],
    target: Path,
    encoder: EncoderSource,
    *,
    fmt: str | None = None,
    names: FieldNames | None = None,
    skip_bad: bool = False,
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
    stdin: IO[bytes] | None = None,
    update: bool = False,
    restart: bool = False,
    model_name: str | None = None,
    precision: str | None = None,
    checkpoint_seconds: float | None = None,
    max_remove: RemovalLimit | None = None,
    on_resume: ProgressCallback | None = None,
    split: SplitSpec | None = SplitSpec(),
    keep_split: bool = False,
    chunk_encoder: ChunkEncoder | None = None,
    lexical: bool | None = None,
    index_type: str | None = None,
    memory: int | None = None,
) -> BuildSummary:
    """Encode the corpus and publish the index at ``target``; nothing is published unless the run completes.

    ``encoder`` is an encoder or a zero-argument function that loads one (called only if something must be
    encoded). ``model_name``/``precision`` are what the user asked for, checked against an index to update.
    ``max_remove`` bounds how many existing passages the run may drop; ``on_resume`` hears how many passages an
    interrupted run's checkpoint already holds (``progress`` then hears only this run's).
    ``split`` cuts passages longer than the model's window into overlapping windows (``None``: truncate);
    ``keep_split`` makes an update use whatever the index was built with.
    ``chunk_encoder`` encodes each chunk's texts (default: here, with ``encoder``; ``distributed.RayEncoder``: on
    a Ray cluster); everything else happens here either way, so the index comes out the same. ``lexical`` builds
    the BM25 index beside the vectors (``None``: yes for a new index, the index's own choice for an update).
    """
    try:
        return _locked_build(
            CorpusSpec(paths, fmt, names or FieldNames(), skip_bad, stdin, (str(target),)),
            target,
            _LazyEncoder(encoder),
            batch_size=batch_size,
            progress=progress,
            update=update,
            restart=restart,
            model_name=model_name,
            precision=precision,
            checkpoint_seconds=checkpoint_interval() if checkpoint_seconds is None else checkpoint_seconds,
            limit=max_remove or RemovalLimit(),
            on_resume=on_resume,
            split=split,
            keep_split=keep_split,
            chunk_encoder=chunk_encoder or LocalEncoder(),
            lexical=lexical,
            ann=(index_type, memory),
        )
    except OSError as exc:
        error = disk_error(exc, target)
        if error is None:
            raise
        raise error from exc


def disk_error(exc: OSError, target: Path) -> IndexDirError | None:
    """The one line for an OSError that is the user's to fix (disk full, no permission, read-only) while writing
    the index at ``target``, naming the path; None for any other OSError (a bug report)."""
    fix = _DISK_FIXES.get(exc.errno or 0)
    if fix is None:
        return None
    where = Path(exc.filename) if exc.filename else target
    if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOTDIR) and not _within(where, target):
        # A corpus file, not the index: another -o would not help.
        not_dir = exc.errno == errno.ENOTDIR
        fix = "a part of the path is a file, not a folder" if not_dir else "check its permissions"
    return IndexDirError(f"{where}: {exc.strerror}; nothing was published ({fix})")


def _within(path: Path, directory: Path) -> bool:
    try:
        return path.resolve().is_relative_to(directory.resolve()) or directory.resolve().is_relative_to(path.resolve())
    except OSError:
        return True


def _locked_build(
    corpus: CorpusSpec,
    target: Path,
    lazy: _LazyEncoder,
    *,
    batch_size: int,
    progress: ProgressCallback | None,
    update: bool,
    restart: bool,
    model_name: str | None,
    precision: str | None,
    checkpoint_seconds: float,
    limit: RemovalLimit,
    on_resume: ProgressCallback | None,
    split: SplitSpec | None,
    keep_split: bool,
    chunk_encoder: ChunkEncoder,
    lexical: bool | None,
    ann: tuple[str | None, int | None] = (None, None),
) -> BuildSummary:
    started = time.perf_counter()
    if update and "-" in corpus.paths:
        raise UsageError(
            f"{option('update', True)} compares the corpus with the index in two passes; give files, not stdin"
        )
    check_target(target)  # before the lock, so that not even a lock file goes into a directory that is not ours
    with index_lock(target):
        # Everything that can refuse the run is checked here, before any passage is encoded.
        replacing = check_target(target)
        base = None
        existing: int | None = None  # passages of the valid index this run replaces; None: there is none
        if update and replacing:
            try:
                base = OpenIndex(target)
            except IndexDirError as exc:
                reason = exc.template.removesuffix("; rebuild the index")
                update = option("update", True)
                raise IndexDirError(
                    f"{reason}; {update} cannot use it: rebuild it in full (without {update})"
                ) from None
            if keep_split:
                stored_split = base.manifest.corpus.get("split")
                split = SplitSpec(**stored_split) if stored_split else None
            _check_compatible(base.manifest, model_name, precision, split)
            if lexical is None:
                lexical = bool(base.manifest.corpus.get("lexical", False))
            existing = _passages_of(base.manifest)
        elif update:
            log.info("no index at %s yet: building it in full", target)
        elif replacing:
            try:
                existing = _passages_of(read_manifest(target))
            except IndexDirError as exc:  # existing stays None: a corrupt index has nothing to protect
                log.warning("replacing a corrupt index: %s", exc)  # a rebuild is the repair
        lexical = True if lexical is None else lexical
        stored = _stored_rows(base) if base else {}
        counts = _Counts()
        stats = CorpusStats()
        if base is not None:
            # First pass: hash and compare only. With nothing changed, nothing is loaded, encoded or written.
            for passage in _read(corpus, stats, lazy):
                hash_ = content_hash(passage.encoder_text)
                _classify(passage, hash_, passage_row(passage, hash_), stored, counts)
            removed = len(stored) - len(counts.seen_stored)
            remaining = len(counts.seen_stored) + counts.added
            why = f" ({_no_passages(corpus, stats)})" if remaining == 0 else ""
            limit.check(target, len(stored), remaining, removed, why)
            # Nothing changed, and nothing to add: an index from before field types, fields.parquet or the
            # lexical index gets them on its next update.
            complete = (
                lexical == has_lexical(base) and "field_types" in base.manifest.corpus and has_field_columns(base)
            )
            if counts.changes(len(stored)) == 0 and complete:
                _settle_checkpoints(target, base.manifest, restart)
                tidy(target)  # nothing to publish, but what a crashed run left is still ours to collect
                _record_sources(target, base.manifest, corpus)
                passages = _passages_of(base.manifest)
                return _summary(
                    target, base.manifest.model, passages, counts, stats, 0, started, published=False, windows=base.rows
                )
        signature, made_from = _signature(corpus, model_name, precision, base.manifest if base else None, split)
        guard = _Guard(limit, existing, update=base is not None)
        # The ANN type: as asked, else what the updated index was asked for, else auto (vector_index.plan_index).
        requested = ann[0] or (base.manifest.index_params.get("requested", "auto") if base else "auto")
        with staging_area(target, signature, restart) as staging:
            try:
                return _build(
                    corpus, staging, lazy, base, stored, batch_size, progress, signature, checkpoint_seconds,
                    started, guard, on_resume, split, chunk_encoder, lexical, (requested, ann[1]), made_from,
                )  # fmt: skip
            except KeyboardInterrupt:
                if staging.published:  # past the point of no return: the new index is live
                    return staging.result  # type: ignore[no-any-return]
                raise
            except (DsearchError, OSError) as exc:
                if not staging.encoded or staging.published:
                    raise
                raise _encoding_kept(exc, target) from exc


_KEPT = "; the encoded vectors are kept: a rerun finishes without encoding them again"


def _encoding_kept(exc: DsearchError | OSError, target: Path) -> BaseException:
    """The error of a run that failed after encoding everything, saying that the rerun resumes from its vectors
    (``staging_area`` keeps them). An OSError that is not the user's to fix stays a bug report."""
    error = disk_error(exc, target) if isinstance(exc, OSError) else exc
    if error is None:
        return exc
    error.args = (error.template + _KEPT,)
    return error


def _settle_checkpoints(target: Path, published: Manifest, restart: bool) -> None:
    """After an update that found nothing to do: the checkpoints that failed or interrupted runs kept.

    One that no run can resume any more (its corpus changed since, or it was an update of an index version that
    is no longer published: ``health.obsolete_checkpoint``) is removed, and with ``restart`` every one is. One
    that a rerun of the run that made it would still resume (a failed rebuild's, the corpus unchanged) is kept,
    but marked: this update found the index complete and current, so ``status`` stops reporting an unfinished run
    (exit 6) night after night, while that rerun still finishes without encoding again.
    """
    from dsearch.health import obsolete_checkpoint  # health builds on this module

    for root in staging_dirs(target):
        progress = read_progress(root)
        if progress is None:
            continue  # no checkpoint: tidy() removes it
        why = "the run starts over (restart)" if restart else obsolete_checkpoint(progress, published)
        if why:
            log.info("removed the checkpoint in %s: %s", root, why)
            shutil.rmtree(root, ignore_errors=True)
        elif "passed_over" not in progress:
            save_progress(root, {**progress, "passed_over": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})


def _record_sources(target: Path, manifest: Manifest, corpus: CorpusSpec) -> None:
    """After an update that found no passage to change: record the corpus files as they are now (a `touch`, a
    copy that kept the bytes), so that `status` stops reporting a corpus change that no update could ever clear.
    The index, and its publish time, stay as they are."""
    sources = describe_sources(corpus.paths, corpus.exclude, corpus.fmt)
    _log_sources(sources)
    if sources != manifest.corpus.get("sources"):
        manifest.corpus["sources"] = sources
        rewrite_manifest(target, manifest)


def _passages_of(manifest: Manifest) -> int:
    """Passages in an index: its rows, unless long passages were split into several rows each."""
    return manifest.passages


@dataclass
class _Guard:
    """The removal limit of a run, checked when the corpus turns out empty and again before publishing."""

    limit: RemovalLimit
    existing: int | None  # passages in the index being replaced or updated (None for a new or corrupt one)
    update: bool

    def empty_corpus(self, target: Path, corpus: CorpusSpec, stats: CorpusStats) -> None:
        if self.existing is None:
            raise IndexDirError(f"{_no_passages(corpus, stats)}; nothing to index, nothing was written")
        self.limit.check(target, self.existing, 0, self.existing, f" ({_no_passages(corpus, stats)})")

    def before_publish(self, target: Path, passages: int, removed: int) -> None:
        # A rebuild does not track ids: what it removes is what the index shrinks by.
        if self.existing is not None:
            shrink = removed if self.update else max(0, self.existing - passages)
            self.limit.check(target, self.existing, passages, shrink)


def _build(
    corpus: CorpusSpec,
    staging: Staging,
    lazy: _LazyEncoder,
    base: OpenIndex | None,
    stored: dict[str, StoredRow],
    batch_size: int,
    progress: ProgressCallback | None,
    signature: str,
    checkpoint_seconds: float,
    started: float,
    guard: _Guard,
    on_resume: ProgressCallback | None,
    split: SplitSpec | None,
    chunk_encoder: ChunkEncoder,
    lexical: bool = True,
    ann: tuple[str, int | None] = ("auto", None),
    made_from: dict[str, Any] | None = None,
) -> BuildSummary:
    """Write the new generation in corpus order, reusing stored vectors, checkpointing, then publish it."""
    import numpy as np

    resume = staging.progress or {}
    resumed_at = int(resume.get("passages", resume.get("rows", 0)))  # passages; rows may be more (windows)
    counts = _Counts(**{k: v for k, v in resume.get("counts", {}).items()})
    counts.encoded = 0  # `encoded` and passages/s describe this run's work, not the checkpoint's
    stats = CorpusStats()
    passages = _read(corpus, stats, lazy, log_skipped=base is None)  # an update's first pass logged them
    first = next(passages, None)  # an empty corpus is refused here, before the model loads (for most formats)
    if first is None:
        guard.empty_corpus(staging.target, corpus, stats)
    else:
        passages = chain([first], passages)
    info = base.manifest.model if base else model_info(lazy.get())
    _check_factory(ann[0], info.dim)
    if staging.progress and staging.progress.get("fingerprint", info.fingerprint) != info.fingerprint:
        # The same model name, other weights (a local model retrained in place): its vectors are not this model's.
        log.info("the checkpoint was made with another model (%s): starting over", info.name)
        shutil.rmtree(staging.segment_dir)
        staging.progress, resume, resumed_at, counts = None, {}, 0, _Counts()
    if resumed_at:
        log.info("resuming from the checkpoint of an interrupted run: %d passages already done", resumed_at)
    writer = SegmentWriter(
        staging.segment_dir, info.dim, int(resume["rows"]) if staging.progress else None, int(resume.get("parts", 0))
    )
    for passage in islice(passages, resumed_at):  # done before the interruption: only note which ids were seen
        if passage.id in stored:
            counts.seen_stored.add(passage.id)
    if resumed_at:
        (on_resume or progress or (lambda n: None))(resumed_at)
    last_checkpoint = time.monotonic()
    done = resumed_at  # passages written so far; rows can be more (windows)
    next_row = writer.rows  # the new row of the next chunk's first row
    moved: list[tuple[Any, Any]] = []  # (new rows, stored rows) of reused vectors: lets the ANN index be reused
    # Chunks whose texts are being encoded (elsewhere, with --ray), written back in corpus order. A checkpoint
    # covers written chunks only, so a resumed run re-sends whatever was in flight.
    pending: deque[_Pending] = deque()

    def checkpoint(saved_counts: dict[str, Any]) -> None:
        """Make every row written so far durable, and record where a resumed run picks up."""
        parts = writer.checkpoint()
        if signature.startswith(_STREAM):
            return  # stdin or a program's passages: no rerun can resume, so no checkpoint is recorded (nor kept)
        record: dict[str, Any] = {"signature": signature, "rows": writer.rows, "passages": done, "parts": parts}
        record.update(dim=info.dim, fingerprint=info.fingerprint, counts=saved_counts, made_from=made_from)
        staging.save_progress(record)

    def write_oldest() -> None:
        nonlocal done, last_checkpoint
        item = pending.popleft()
        if item.handle is not None:
            item.vectors[item.encode_rows] = chunk_encoder.result(item.handle)
        writer.add(item.rows, item.vectors)
        done += item.passages
        if progress:
            progress(item.passages)
        if time.monotonic() - last_checkpoint >= checkpoint_seconds:
            # The counts as they were when this chunk was read: chunks still in flight are not in the checkpoint.
            checkpoint(item.counts)
            fault_point("checkpointed")
            last_checkpoint = time.monotonic()

    for chunk in iter(lambda: list(islice(passages, batch_size * BATCHES_PER_CHUNK)), []):
        rows: list[dict[str, Any]] = []
        reuse: list[tuple[int, int]] = []  # (new row, stored row) whose vector is copied
        encode: list[tuple[int, str]] = []  # (new row, text to encode)
        for passage in chunk:
            hash_ = content_hash(passage.encoder_text)
            row = passage_row(passage, hash_)
            if _classify(passage, hash_, row, stored, counts):
                counts.encoded += 1
                for span, text in _windows_of(passage, lazy, info, split):
                    encode.append((len(rows), text))
                    rows.append(_with_window(row, span))
            else:  # unchanged text: the same windows, so the stored vectors of every window are reused
                old = stored[passage.id]
                for offset, span in enumerate(old.windows):
                    reuse.append((len(rows), old.row + offset))
                    rows.append(_with_window(row, span))
        vectors = np.empty((len(rows), info.dim), dtype=np.float32)
        if reuse:
            assert base is not None
            vectors[[new for new, _ in reuse]] = base.vectors_at([old for _, old in reuse])
            moved.append((next_row + np.array([new for new, _ in reuse]), np.array([old for _, old in reuse])))
        next_row += len(rows)
        handle = None
        if encode:
            encoder = _checked(lazy, info)
            to_encode = [text for _, text in encode]
            if split is None:
                counts.truncated += encoder.count_truncated(to_encode)
            handle = chunk_encoder.submit(encoder, to_encode)
        pending.append(_Pending(len(chunk), rows, vectors, [new for new, _ in encode], handle, counts.saved()))
        while len(pending) > chunk_encoder.depth:
            write_oldest()
    while pending:
        write_oldest()
    removed = len(stored) - len(counts.seen_stored)
    guard.before_publish(staging.target, done, removed)  # a refused run keeps nothing: its corpus was wrong
    # The costly part is done: make every vector durable, so that a failure from here on (an ANN index FAISS
    # cannot train, a full disk, Ctrl-C while it trains) leaves the rerun nothing to encode again.
    checkpoint(counts.saved())
    # Unless the passages came from stdin or a program: no rerun can resume from them, so none are kept.
    staging.encoded = not signature.startswith(_STREAM)
    segment = writer.close()
    if lexical:  # from the closed segment's passages, so an update or a resumed run indexes exactly its rows
        lexical_started = time.perf_counter()
        for name in build_lexical(staging.segment_dir, PASSAGES_FILE):
            segment.files[name] = file_info(staging.segment_dir / name)
        log.info("lexical (BM25) index built in %.2f s", time.perf_counter() - lexical_started)
    types = field_types(staging.segment_dir / PASSAGES_FILE)  # for --where and info
    # The fields as typed columns, so that a --where condition reads no JSON and needs no DuckDB (filters.py).
    columns = write_field_columns(staging.segment_dir, PASSAGES_FILE, types)
    segment.files[columns] = file_info(staging.segment_dir / columns)
    sources = describe_sources(corpus.paths, corpus.exclude, corpus.fmt)
    _log_sources(sources)
    corpus_info = {
        "sources": sources,
        "format": corpus.fmt,
        "fields": asdict(corpus.names),
        "split": split.as_dict() if split else None,
        "lexical": lexical,
        "field_types": types,
    }
    stats_info = {
        "passages": done,
        "skipped_empty": stats.skipped_empty,
        "skipped_bad": stats.skipped_bad,
        "truncated": counts.truncated,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if chunk_encoder.workers is not None:  # a Ray build: how many workers encoded it
        stats_info["workers"] = chunk_encoder.workers
    worker_precision = getattr(chunk_encoder, "precision_used", None)
    if worker_precision is not None and worker_precision != info.precision:  # fp16 on GPU workers
        info = replace(info, precision=worker_precision)
    manifest = new_manifest(info, segment, corpus_info, stats_info)
    previous = _previous_ann(base, segment.rows, moved)
    manifest.index_type, manifest.index_params = build_segment_index(staging.segment_dir, segment, *ann, previous)
    staging.result = _summary(
        staging.target, info, done, counts, stats, resumed_at, started, removed=removed, windows=segment.rows,
        load_seconds=lazy.load_seconds,
    )  # fmt: skip
    publish(staging, manifest)
    return staging.result  # type: ignore[no-any-return]


class _Pending(NamedTuple):
    """A chunk read and classified, waiting for its encoded vectors before it is written."""

    passages: int
    rows: list[dict[str, Any]]
    vectors: Any  # np.ndarray: reused vectors filled in, encoded rows still empty
    encode_rows: list[int]
    handle: Any  # what chunk_encoder.submit returned; None when nothing in the chunk is encoded
    counts: dict[str, int]  # the run's counts up to and including this chunk, for its checkpoint


def _windows_of(
    passage: Passage, lazy: _LazyEncoder, info: ModelInfo, split: SplitSpec | None
) -> list[tuple[tuple[int, int] | None, str]]:
    """(span, text to encode) per window of the passage; one whole-text window when it fits or is not split."""
    if split is None:
        return [(None, passage.encoder_text)]
    encoder = _checked(lazy, info)
    room = budget(encoder.max_text_tokens, passage.title, encoder.token_spans)
    spans = window_spans(passage.text, encoder.token_spans, room, split.overlap)
    if len(spans) == 1:
        return [(None, passage.encoder_text)]
    lead = f"{passage.title} " if passage.title else ""  # every window is led by the title, as the passage is
    return [((start, end), lead + passage.text[start:end]) for start, end in spans]


def _with_window(row: dict[str, Any], span: tuple[int, int] | None) -> dict[str, Any]:
    start, end = span if span is not None else (None, None)
    return {**row, "window_start": start, "window_end": end}



def _previous_ann(base: OpenIndex | None, rows: int, moved: list[tuple[Any, Any]]) -> Any:
    """What an update may reuse of the index it replaces: its ANN file and the old row of each new row.

    Rows renumber on every update (the new segment is written in corpus order), so the old ANN structure cannot
    be extended in place; the mapping lets ``vector_index.build_ann`` put reused vectors back where they were.
    None when there is nothing to reuse (a flat or multi-segment index) or the file is not what the manifest lists.
    """
    import numpy as np

    from dsearch.vector_index import Previous, ann_file

    if base is None or len(base.segments) != 1 or base.segments[0].ann is None:
        return None
    seg = base.segments[0]
    name = ann_file(seg.segment.files)
    assert name is not None
    path = base.directory / seg.segment.path / name
    if file_info(path) != seg.segment.files[name]:
        log.warning("%s does not match its checksum: the ANN index is built afresh", path)
        return None
    old_rows = np.full(rows, -1, dtype=np.int64)
    for new, old in moved:
        old_rows[new] = old - seg.first_row
    params = base.manifest.index_params
    return Previous(path, base.manifest.index_type, params, seg.segment.rows, old_rows)


def _check_factory(requested: str, dim: int) -> None:
    """Refuse a FAISS factory string that FAISS cannot parse for this dimension before anything is encoded."""
    from dsearch.vector_index import INDEX_TYPES, factory_plan

    if requested.lower() not in INDEX_TYPES:
        try:
            factory_plan(requested, dim)
        except ValueError as exc:
            raise UsageError(f"cannot build the index: {exc}; choose another {option('index_type')}") from None


def build_segment_index(
    segment_dir: Path, segment: Segment, requested: str, memory: int | None, previous: Any = None
) -> tuple[str, dict[str, Any]]:
    """Choose and build the segment's ANN file (if any) from its stored vectors; adds it to ``segment.files``.

    ``previous`` (``vector_index.Previous``, from an ``--update``): the replaced ANN index, reused when it can be.
    """
    from dsearch.store import INDEX_FILE, FlatVectors, file_info
    from dsearch.vector_index import FLAT, build_ann, default_memory, plan_index

    budget = memory if memory is not None else default_memory()
    raw = FlatVectors(segment_dir / INDEX_FILE)
    try:
        plan = plan_index(requested, segment.rows, raw.d, budget)
    except ValueError as exc:
        raise UsageError(f"cannot build the index: {exc}") from None
    log.info("index type %s (%s): %s", plan.index_type, plan.factory or "exact", plan.reason)
    params: dict[str, Any] = {"requested": requested, "reason": plan.reason}
    if plan.index_type == FLAT:
        return FLAT, params
    try:
        name, built = build_ann(segment_dir, raw, plan, previous=previous)
    except ValueError as exc:  # a factory string FAISS accepts but cannot train on these vectors
        raise UsageError(f"cannot build the index: {exc}; choose another {option('index_type')}") from None
    segment.files[name] = file_info(segment_dir / name)
    return plan.index_type, {**params, **built}


def _checked(lazy: _LazyEncoder, info: ModelInfo) -> Encoder:
    """The loaded encoder, refused if it is not the model that made the index's other vectors."""
    first_load = not lazy.loaded
    encoder = lazy.get()
    if first_load and (encoder.dim != info.dim or encoder.fingerprint != info.fingerprint):
        raise IndexDirError(
            f"model {encoder.name!r} is not the one that built this index (its files changed); "
            f"rebuild the index in full (without {option('update', True)})"
        )
    return encoder


def _summary(
    target: Path,
    info: ModelInfo,
    rows: int,
    counts: _Counts,
    stats: CorpusStats,
    resumed_at: int,
    started: float,
    published: bool = True,
    removed: int = 0,
    windows: int | None = None,
    load_seconds: float = 0.0,
) -> BuildSummary:
    seconds = time.perf_counter() - started
    encoding_seconds = seconds - load_seconds
    return BuildSummary(
        index=os.fspath(target),
        model=info.name,
        precision=info.precision,
        indexed=rows,
        windows=rows if windows is None else windows,
        added=counts.added,
        updated=counts.updated,
        metadata_only=counts.metadata_only,
        unchanged=counts.unchanged,
        removed=removed,
        encoded=counts.encoded,
        skipped_empty=stats.skipped_empty,
        skipped_bad=stats.skipped_bad,
        truncated=counts.truncated,
        resumed_at=resumed_at,
        published=published,
        seconds=round(seconds, 3),
        # This run's encoding only: a resumed run's checkpointed passages are not its work.
        # and loading the model (a first run's ONNX export) is not encoding either.
        passages_per_second=round(counts.encoded / encoding_seconds, 2) if encoding_seconds > 0 else 0.0,
    )
