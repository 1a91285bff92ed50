"""Queries in, ranked hits out: read queries, encode them in batches, search, look up the hits' metadata."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from dsearch.encoder import Encoder
from dsearch.errors import InputError
from dsearch.store import OpenIndex

# Queries encoded and searched together: large enough to amortise each BLAS call and row-group read.
QUERY_BATCH = 256


@dataclass(slots=True)
class Query:
    qid: str
    text: str


@dataclass(slots=True)
class Hit:
    """One ranked result. ``row`` is the FAISS position; ``id`` is the user's passage id."""

    qid: str
    query: str
    rank: int
    score: float
    row: int
    id: str
    title: str | None
    text: str
    source: str
    fields: dict[str, Any] = field(default_factory=dict)
    window: tuple[int, int] | None = None  # the span of ``text`` that matched, when the passage was split


def queries_from_texts(texts: Iterable[str]) -> Iterator[Query]:
    """Queries without ids are numbered 1, 2, 3… in order; blank ones are skipped."""
    number = 0
    for text in texts:
        text = text.strip()
        if text:
            number += 1
            yield Query(str(number), text)


def read_query_file(path: str) -> list[Query]:
    """A query file: BEIR ``queries.jsonl`` (``_id``, ``text``), TSV ``qid<TAB>text``, or one query a line (.txt)."""
    p = Path(path)
    try:
        raw_lines = p.read_bytes().splitlines()
    except OSError as exc:
        raise InputError(path, f"cannot read the queries file ({exc.strerror or exc})") from None
    queries: list[Query] = []
    is_jsonl = p.suffix.lower() in {".jsonl", ".json", ".ndjson"}
    for lineno, raw in enumerate(raw_lines, 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8").lstrip("\ufeff") if lineno == 1 else raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(where, "not valid UTF-8", "re-encode the file as UTF-8") from None
        if not line.strip():
            continue
        if is_jsonl:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(where, f"not valid JSON ({exc.msg})", "fix the line") from None
            if not isinstance(record, dict):
                raise InputError(where, "a JSON line must be an object with '_id' and 'text'")
            qid = record.get("_id", record.get("id", record.get("qid")))
            text = record.get("text", record.get("query"))
            if qid is None or not isinstance(text, str):
                raise InputError(where, "a query needs '_id' and 'text' fields")
            queries.append(Query(str(qid), text))
        elif p.suffix.lower() == ".txt":
            queries.append(Query(str(len(queries) + 1), line.strip()))
        else:
            qid, tab, text = line.rstrip("\r\n").partition("\t")
            if not tab or not qid.strip():
                raise InputError(where, "expected 'qid<TAB>query text'", "separate the id and the text with a tab")
            queries.append(Query(qid.strip(), text.strip()))
    if not queries:
        raise InputError(path, "no queries in the file")
    return queries


def run_search(
    index: OpenIndex,
    encoder: Encoder,
    queries: Iterable[Query],
    k: int,
    exclude_self: bool = False,
) -> Iterator[tuple[Query, list[Hit]]]:
    """Yield each query with its hits, best first. Queries are encoded and searched in batches."""
    iterator = iter(queries)
    while batch := list(islice(iterator, QUERY_BATCH)):
        vectors = encoder.encode_queries([q.text for q in batch])
        yield from zip(batch, search_vectors(index, batch, vectors, k, exclude_self), strict=True)


def search_vectors(
    index: OpenIndex, batch: list[Query], vectors: Any, k: int, exclude_self: bool = False
) -> list[list[Hit]]:
    """The top ``k`` passages per query vector; a split passage counts once, ranked by its best window (MaxP)."""
    passages = int(index.manifest.stats.get("passages", index.rows))
    fetch = k + 1 if exclude_self else k  # room for the dropped self-hit (BEIR convention)
    if passages < index.rows:
        fetch *= 2  # some rows are further windows of passages already found
    while True:
        fetch = min(fetch, index.rows)
        scores, rows = index.search(vectors, fetch)
        metadata = index.lookup(rows.ravel())
        results = [
            _hits(query, query_scores, query_rows, metadata, k, exclude_self)
            for query, query_scores, query_rows in zip(batch, scores.tolist(), rows.tolist(), strict=True)
        ]
        # Windows of one passage take several of the fetched rows: fetch more until k passages are found.
        if fetch >= index.rows or all(len(hits) == k for hits in results):
            return results
        fetch *= 4


def _hits(
    query: Query, scores: list[float], rows: list[int], metadata: dict[int, dict[str, Any]], k: int, exclude_self: bool
) -> list[Hit]:
    hits: list[Hit] = []
    seen: set[str] = set()
    for score, row in zip(scores, rows, strict=True):
        if row < 0:
            continue
        meta = metadata[row]
        if (exclude_self and meta["id"] == query.qid) or meta["id"] in seen:
            continue  # the self-hit, or a lower-scoring window of a passage already ranked
        if len(hits) == k:
            break
        seen.add(meta["id"])
        fields = json.loads(meta["fields"]) if meta["fields"] else {}
        window = None if meta.get("window_start") is None else (meta["window_start"], meta["window_end"])
        hits.append(
            Hit(
                query.qid,
                query.text,
                len(hits) + 1,
                score,
                row,
                meta["id"],
                meta["title"],
                meta["text"],
                meta["source"],
                fields,
                window,
            )
        )
    return hits
