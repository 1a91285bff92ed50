"""Build an index: corpus passages → batches → encoder → segment writer → atomic publish."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import IO

from dsearch.corpus import CorpusStats, FieldNames, Passage, read_corpus
from dsearch.encoder import Encoder
from dsearch.manifest import Manifest, ModelInfo
from dsearch.store import INDEX_TYPE, SegmentWriter, content_hash, publish, staging_area

# Passages handed to the encoder at once. sentence-transformers sorts each call by length, so a few
# batches' worth per call lets similar lengths share a batch without holding much in memory.
BATCHES_PER_CHUNK = 8

ProgressCallback = Callable[[int], None]


@dataclass
class BuildSummary:
    """What an index run did; printed on stderr, or as JSON on stdout with ``--json``."""

    index: str
    model: str
    indexed: int
    skipped_empty: int
    skipped_bad: int
    truncated: int
    seconds: float
    passages_per_second: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("dsearch", "faiss-cpu", "sentence-transformers", "torch", "pyarrow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def describe_sources(paths: Iterable[str]) -> list[dict[str, object]]:
    """Where the corpus came from, with sizes and times, so ``status`` can tell when it changed."""
    sources: list[dict[str, object]] = []
    for path in paths:
        if path == "-":
            sources.append({"path": "-"})
            continue
        p = Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        stats = [f.stat() for f in files]
        sources.append(
            {
                "path": str(p.resolve()),
                "files": len(files),
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


def _chunks(items: Iterator[Passage], size: int) -> Iterator[list[Passage]]:
    while chunk := list(islice(items, size)):
        yield chunk


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


def build_index(
    paths: list[str],
    target: Path,
    encoder: Encoder,
    *,
    fmt: str | None = None,
    names: FieldNames | None = None,
    skip_bad: bool = False,
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
    stdin: IO[bytes] | None = None,
) -> BuildSummary:
    """Encode every passage of ``paths`` and publish the index at ``target``; nothing is published on error."""
    started = time.perf_counter()
    names = names or FieldNames()
    stats = CorpusStats()
    truncated = 0
    passages = read_corpus(paths, fmt, names, skip_bad, stats, encoder.token_spans, encoder.max_text_tokens, stdin)
    with staging_area(target) as staging:
        writer = SegmentWriter(staging.segment_dir, encoder.dim)
        for chunk in _chunks(passages, batch_size * BATCHES_PER_CHUNK):
            texts = [p.encoder_text for p in chunk]
            truncated += encoder.count_truncated(texts)
            writer.add(chunk, encoder.encode_documents(texts), [content_hash(t) for t in texts])
            if progress:
                progress(len(chunk))
        segment = writer.close()
        seconds = time.perf_counter() - started
        manifest = Manifest(
            model=model_info(encoder),
            index_type=INDEX_TYPE,
            rows=segment.rows,
            segments=[segment],
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            versions=library_versions(),
            corpus={
                "sources": describe_sources(paths),
                "format": fmt,
                "fields": asdict(names),
            },
            stats={
                "skipped_empty": stats.skipped_empty,
                "skipped_bad": stats.skipped_bad,
                "truncated": truncated,
                "seconds": round(seconds, 3),
            },
        )
        publish(staging, manifest)
    return BuildSummary(
        index=os.fspath(target),
        model=encoder.name,
        indexed=segment.rows,
        skipped_empty=stats.skipped_empty,
        skipped_bad=stats.skipped_bad,
        truncated=truncated,
        seconds=round(seconds, 3),
        passages_per_second=round(segment.rows / seconds, 2) if seconds > 0 else 0.0,
    )
