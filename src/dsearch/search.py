"""Queries in, ranked hits out: read queries, encode them in batches, search, look up the hits' metadata."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from dsearch.encoder import Encoder
from dsearch.errors import IndexDirError, InputError, ModelError, UsageError
from dsearch.store import OpenIndex

log = logging.getLogger("dsearch")

# Queries encoded and searched together: large enough to amortise each BLAS call and row-group read.
QUERY_BATCH = 256
# How far a cosine score or a stored vector's norm may stray from what is possible before we call the
# vectors corrupt: float32 rounding of unit vectors stays below 1e-5; a flipped byte moves it far more.
COSINE_TOLERANCE = 1e-3


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


def queries_from_texts(texts: Iterable[str]) -> Iterator[Query]:
    """Queries without ids are numbered 1, 2, 3… in order; blank ones are skipped."""
    number = 0
    for text in texts:
        text = text.strip()
        if text:
            number += 1
            yield Query(str(number), text)


def check_query_arguments(texts: list[str]) -> None:
    """Query arguments must be text: Python hands over undecodable bytes as lone surrogates."""
    for number, text in enumerate(texts, 1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(
                f"query argument {number} is not valid UTF-8; pass queries in UTF-8 (or use --queries FILE)"
            ) from None


def decode_lines(lines: Iterable[bytes], where: str) -> Iterator[str]:
    """Decode lines strictly as UTF-8, as the queries-file reader does: a leading BOM is dropped, bad bytes
    are an error naming ``where:line`` rather than a query silently made of U+FFFD."""
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{where}:{lineno}", "not valid UTF-8", "send the queries in UTF-8") from None
        yield line.lstrip("\ufeff") if lineno == 1 else line


def read_query_file(path: str) -> list[Query]:
    """A query file: BEIR ``queries.jsonl`` (``_id``, ``text``), TSV ``qid<TAB>text``, or one query a line (.txt)."""
    p = Path(path)
    try:
        raw_lines = p.read_bytes().splitlines()
    except OSError as exc:
        raise InputError(path, f"cannot read the queries file ({exc.strerror or exc})") from None
    queries: list[Query] = []
    first_line: dict[str, int] = {}  # qid -> the line that first used it
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
            query = Query(str(qid), text.strip())
        elif p.suffix.lower() == ".txt":
            query = Query(str(len(queries) + 1), line.strip())
        else:
            qid, tab, text = line.rstrip("\r\n").partition("\t")
            if not tab or not qid.strip():
                raise InputError(where, "expected 'qid<TAB>query text'", "separate the id and the text with a tab")
            query = Query(qid.strip(), text.strip())
        if query.qid in first_line:
            # Two rankings under one qid make a TREC run that trec_eval would merge: refuse, don't guess.
            raise InputError(
                where,
                f"duplicate query id {query.qid!r} (first on line {first_line[query.qid]})",
                "give each query its own id",
            )
        first_line[query.qid] = lineno
        if not query.text:
            log.warning("%s: query %r has no text; skipped", where, query.qid)
            continue
        queries.append(query)
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
    fetch = k + 1 if exclude_self else k  # room for the dropped self-hit (BEIR convention)
    while batch := list(islice(iterator, QUERY_BATCH)):
        vectors = encoder.encode_queries([q.text for q in batch])
        check_query_vectors(vectors, batch)
        scores, rows = index.search(vectors, fetch)
        metadata = index.lookup(rows.ravel())
        check_hits(index, batch, scores, rows, metadata)
        for query, query_scores, query_rows in zip(batch, scores, rows, strict=True):
            hits: list[Hit] = []
            for score, row in zip(query_scores.tolist(), query_rows.tolist(), strict=True):
                if row < 0:
                    continue
                meta = metadata[row]
                if exclude_self and meta["id"] == query.qid:
                    continue
                if len(hits) == k:
                    break
                fields = json.loads(meta["fields"]) if meta["fields"] else {}
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
                    )
                )
            yield query, hits


def check_query_vectors(vectors: Any, batch: list[Query]) -> None:
    """A query vector with NaN or infinity would rank passages at random: stop instead."""
    import numpy as np

    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        query = batch[int(np.argmin(finite))]
        raise ModelError(f"the model gave query {query.qid!r} a vector with NaN or infinite values; check the model")


def check_hits(index: OpenIndex, batch: list[Query], scores: Any, rows: Any, metadata: dict[int, Any]) -> None:
    """Refuse answers that corrupt vectors make impossible, before any of them is printed.

    What is cheap at query time: every hit's score must be finite and, on a cosine index, within [-1, 1];
    every hit's stored vector must be finite and, on a cosine index, of length 1 (or 0). A corrupt vector
    that never reaches the top k, or one whose damage keeps it finite and of unit length, is not seen here:
    ``dsearch status`` and ``info --verify`` compare every file with its checksum.
    """
    import numpy as np

    valid = rows >= 0
    if not valid.any():
        return
    cosine = index.manifest.model.similarity == "cosine"
    hit_scores, hit_rows = scores[valid], rows[valid]
    bad = ~np.isfinite(hit_scores)
    if cosine:
        bad |= np.abs(np.nan_to_num(hit_scores)) > 1 + COSINE_TOLERANCE
    if bad.any():
        at = int(np.argmax(bad))
        problem = f"scores {float(hit_scores[at])!r}" + (", impossible for a cosine index" if cosine else "")
        _corrupt(index, int(hit_rows[at]), metadata, problem)
    hit_vectors = index.vectors_at(hit_rows.tolist())
    norms = np.linalg.norm(hit_vectors.astype(np.float64), axis=1)
    bad = ~np.isfinite(norms)
    if cosine:
        bad |= (np.abs(np.nan_to_num(norms) - 1) > COSINE_TOLERANCE) & (np.nan_to_num(norms) > COSINE_TOLERANCE)
    if bad.any():
        at = int(np.argmax(bad))
        problem = f"has a stored vector of length {float(norms[at]):.4g}"
        if cosine:
            problem += " (a cosine index holds unit vectors)"
        _corrupt(index, int(hit_rows[at]), metadata, problem)


def _corrupt(index: OpenIndex, row: int, metadata: dict[int, Any], problem: str) -> None:
    passage = metadata.get(row, {}).get("id")
    where = f"row {row}" + (f" (id {passage!r})" if passage is not None else "")
    raise IndexDirError(
        f"{index.directory}: {where} {problem}: the index's vectors are corrupt "
        f"(check with 'dsearch status {index.directory}' or 'dsearch info --verify {index.directory}', "
        "then rebuild the index)"
    )
