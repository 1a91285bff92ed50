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
    fetch = k + 1 if exclude_self else k  # room for the dropped self-hit (BEIR convention)
    while batch := list(islice(iterator, QUERY_BATCH)):
        vectors = encoder.encode_queries([q.text for q in batch])
        scores, rows = index.search(vectors, fetch)
        metadata = index.lookup(rows.ravel())
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
