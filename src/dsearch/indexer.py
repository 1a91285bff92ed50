"""Build or update an index: corpus passages → batches → encoder → segment writer → atomic publish.

A build holds the index's lock, checkpoints as it goes (an interrupted run resumes from its last checkpoint),
and with ``update`` re-encodes only the passages whose encoded text changed, reusing every other vector.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import IO, Any, NamedTuple

import xxhash

from dsearch.corpus import CorpusStats, FieldNames, Passage, corpus_files, needs_tokenizer, read_corpus
from dsearch.encoder import Encoder
from dsearch.errors import IndexDirError, UsageError
from dsearch.filters import field_types
from dsearch.lexical import build_lexical, has_lexical
from dsearch.manifest import FORMAT_VERSION, Manifest, ModelInfo, Segment
from dsearch.store import (
    INDEX_TYPE,
    PASSAGES_FILE,
    WINDOW_COLUMNS,
    OpenIndex,
    SegmentWriter,
    Staging,
    check_target,
    content_hash,
    file_info,
    index_lock,
    passage_row,
    publish,
    staging_area,
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


def describe_sources(paths: Iterable[str], exclude: Iterable[str] = ()) -> list[dict[str, object]]:
    """Where the corpus came from, with sizes and times, so ``status`` can tell when it changed.

    A directory counts the files a build reads (``corpus.corpus_files``), never an index inside it, so that
    ``status``, which does not know the index's place, sees what the build saw.
    """
    sources: list[dict[str, object]] = []
    for path in paths:
        if path == "-":
            sources.append({"path": "-"})
            continue
        p = Path(path)
        files = corpus_files(p, None, exclude) if p.is_dir() else [p]
        stats = [f.stat() for f in files if f.exists()]
        sources.append(
            {
                "path": str(p.resolve()),
                "files": len(stats),
                "bytes": sum(s.st_size for s in stats),
                "mtime": max((s.st_mtime for s in stats), default=0.0),
            }
        )
    return sources


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

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def get(self) -> Encoder:
        if self._encoder is None:
            self._encoder = self._source()  # type: ignore[operator]
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
    hint = "; rebuild it in full (without --update)"
    stored_split = manifest.corpus.get("split")
    wanted_split = split.as_dict() if split else None
    if stored_split != wanted_split:
        def describe(value: dict[str, Any] | None) -> str:
            return f"split with an overlap of {value['overlap']} tokens" if value else "not split (--no-split)"

        raise IndexDirError(
            f"the index's long passages were {describe(stored_split)}, not {describe(wanted_split)}{hint}"
        )
    if manifest.format_version != FORMAT_VERSION:
        raise IndexDirError(f"index format version {manifest.format_version} is not the current {FORMAT_VERSION}{hint}")
    if model_name is not None and model_name != manifest.model.name:
        raise IndexDirError(f"the index was built with model {manifest.model.name!r}, not {model_name!r}{hint}")
    if precision not in (None, "auto") and precision != manifest.model.precision:
        raise IndexDirError(f"the index was built at precision {manifest.model.precision}, not {precision}{hint}")


@dataclass
class CorpusSpec:
    """How to read the corpus: which paths, in which format, with which field names."""

    paths: list[str]
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


def _signature(corpus: CorpusSpec, model: str | None, precision: str | None, base: Manifest | None) -> str:
    """What a checkpoint was made from: a resumed run must read the same corpus the same way."""
    if "-" in corpus.paths:
        return f"stdin-{time.time_ns()}"  # stdin cannot be read again: never resume
    parts = {
        "sources": describe_sources(corpus.paths),
        "format": corpus.fmt,
        "names": asdict(corpus.names),
        "skip_bad": corpus.skip_bad,
        "model": model,
        "precision": precision,
        "base": base.created_at if base else None,
    }
    return xxhash.xxh3_128_hexdigest(json.dumps(parts, sort_keys=True).encode())


def build_index(
    paths: list[str],
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
    split: SplitSpec | None = SplitSpec(),
    keep_split: bool = False,
    lexical: bool | None = None,
) -> BuildSummary:
    """Encode the corpus and publish the index at ``target``; nothing is published unless the run completes.

    ``encoder`` is an encoder or a zero-argument function that loads one (called only if something must be
    encoded). ``model_name``/``precision`` are what the user asked for, checked against an index to update.
    ``split`` cuts passages longer than the model's window into overlapping windows (``None``: truncate);
    ``keep_split`` makes an update use whatever the index was built with. ``lexical`` builds the BM25 index
    beside the vectors (``None``: yes for a new index, the index's own choice for an update).
    """
    started = time.perf_counter()
    corpus = CorpusSpec(paths, fmt, names or FieldNames(), skip_bad, stdin, (str(target),))
    lazy = _LazyEncoder(encoder)
    with index_lock(target):
        base = None
        if update:
            if "-" in paths:
                raise UsageError("--update compares the corpus with the index in two passes; give files, not stdin")
            if check_target(target):
                base = OpenIndex(target)
                if keep_split:
                    stored_split = base.manifest.corpus.get("split")
                    split = SplitSpec(**stored_split) if stored_split else None
                _check_compatible(base.manifest, model_name, precision, split)
                if lexical is None:
                    lexical = bool(base.manifest.corpus.get("lexical", False))
            else:
                log.info("no index at %s yet: building it in full", target)
        lexical = True if lexical is None else lexical
        stored = _stored_rows(base) if base else {}
        counts = _Counts()
        stats = CorpusStats()
        if base is not None:
            # First pass: hash and compare only. With nothing changed, nothing is loaded, encoded or written.
            for passage in _read(corpus, stats, lazy):
                hash_ = content_hash(passage.encoder_text)
                _classify(passage, hash_, passage_row(passage, hash_), stored, counts)
            # Nothing changed, and nothing to add: an index from before field types or the lexical index was
            # built gets them on its next update.
            complete = lexical == has_lexical(base) and "field_types" in base.manifest.corpus
            if counts.changes(len(stored)) == 0 and complete:
                passages = int(base.manifest.stats.get("passages", base.rows))
                return _summary(
                    target, base.manifest.model, passages, counts, stats, 0, started, published=False, windows=base.rows
                )
        signature = _signature(corpus, model_name, precision, base.manifest if base else None)
        interval = checkpoint_interval() if checkpoint_seconds is None else checkpoint_seconds
        with staging_area(target, signature, restart) as staging:
            return _build(
                corpus, staging, lazy, base, stored, batch_size, progress, signature, interval, started, split, lexical
            )


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
    split: SplitSpec | None,
    lexical: bool = True,
) -> BuildSummary:
    """Write the new generation in corpus order, reusing stored vectors, checkpointing, then publish it."""
    import numpy as np

    info = base.manifest.model if base else model_info(lazy.get())
    resume = staging.progress or {}
    resumed_at = int(resume.get("passages", resume.get("rows", 0)))
    counts = _Counts(**{k: v for k, v in resume.get("counts", {}).items()})
    if resumed_at:
        log.info("resuming from the checkpoint of an interrupted run: %d passages already done", resumed_at)
    writer = SegmentWriter(
        staging.segment_dir, info.dim, int(resume["rows"]) if staging.progress else None, int(resume.get("parts", 0))
    )
    stats = CorpusStats()
    passages = _read(corpus, stats, lazy, log_skipped=base is None)  # an update's first pass logged them
    for passage in islice(passages, resumed_at):  # done before the interruption: only note which ids were seen
        if passage.id in stored:
            counts.seen_stored.add(passage.id)
    if progress and resumed_at:
        progress(resumed_at)
    last_checkpoint = time.monotonic()
    done = resumed_at  # passages written so far; rows can be more (windows)
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
        if encode:
            encoder = _checked(lazy, info)
            to_encode = [text for _, text in encode]
            if split is None:
                counts.truncated += encoder.count_truncated(to_encode)
            vectors[[new for new, _ in encode]] = encoder.encode_documents(to_encode)
        writer.add(rows, vectors)
        done += len(chunk)
        if progress:
            progress(len(chunk))
        if time.monotonic() - last_checkpoint >= checkpoint_seconds:
            parts = writer.checkpoint()
            saved = {k: v for k, v in asdict(counts).items() if k != "seen_stored"}
            staging.save_progress(
                {"signature": signature, "rows": writer.rows, "passages": done, "parts": parts, "counts": saved}
            )
            last_checkpoint = time.monotonic()
    segment = writer.close()
    if lexical:  # from the closed segment's passages, so an update or a resumed run indexes exactly its rows
        lexical_started = time.perf_counter()
        for name in build_lexical(staging.segment_dir, PASSAGES_FILE):
            segment.files[name] = file_info(staging.segment_dir / name)
        log.info("lexical (BM25) index built in %.2f s", time.perf_counter() - lexical_started)
    seconds = time.perf_counter() - started
    corpus_info = {
        "sources": describe_sources(corpus.paths),
        "format": corpus.fmt,
        "fields": asdict(corpus.names),
        "split": split.as_dict() if split else None,
        "lexical": lexical,
        "field_types": field_types(staging.segment_dir / PASSAGES_FILE),  # for --where and info
    }
    stats_info = {
        "passages": done,
        "skipped_empty": stats.skipped_empty,
        "skipped_bad": stats.skipped_bad,
        "truncated": counts.truncated,
        "seconds": round(seconds, 3),
    }
    manifest = new_manifest(info, segment, corpus_info, stats_info)
    publish(staging, manifest)
    removed = len(stored) - len(counts.seen_stored)
    return _summary(
        staging.target, info, done, counts, stats, resumed_at, started, removed=removed, windows=segment.rows
    )


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


def _checked(lazy: _LazyEncoder, info: ModelInfo) -> Encoder:
    """The loaded encoder, refused if it is not the model that made the index's other vectors."""
    first_load = not lazy.loaded
    encoder = lazy.get()
    if first_load and (encoder.dim != info.dim or encoder.fingerprint != info.fingerprint):
        raise IndexDirError(
            f"model {encoder.name!r} is not the one that built this index (its files changed); "
            "rebuild the index in full (without --update)"
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
) -> BuildSummary:
    seconds = time.perf_counter() - started
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
        passages_per_second=round(counts.encoded / seconds, 2) if seconds > 0 else 0.0,
    )
