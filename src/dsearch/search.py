"""Queries in, ranked hits out: read queries, encode them in batches, search, look up the hits' metadata."""

from __future__ import annotations

import json
import logging
import math
import select
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from dsearch.encoder import Encoder
from dsearch.errors import IndexDirError, InputError, ModelError, UsageError, spell
from dsearch.store import OpenIndex
from dsearch.streams import read_waiting

log = logging.getLogger("dsearch")

# Queries encoded and searched together: large enough to amortise each BLAS call and row-group read.
QUERY_BATCH = 256
# Candidates beyond those asked for that a flat index re-scores (see stable_search); a cap on the stored
# vectors gathered at once while doing it (16 MiB of float32).
RESCORE_MARGIN = 8
RESCORE_FLOATS = 1 << 22
# How far a cosine score or a stored vector's norm may stray from what is possible before we call the
# vectors corrupt: float32 rounding of unit vectors stays below 1e-5; a flipped byte moves it far more.
COSINE_TOLERANCE = 1e-3
# How far past the next line stdin's reader reads ahead to see whether a whole query has arrived: without a bound,
# a stream of blank lines after a query (`yes ''`) grew the buffer for ever and the query was never answered.
READ_AHEAD = 1 << 18
T = TypeVar("T")


@dataclass(slots=True)
class Query:
    """One query: its id (``qid`` in every output format) and its text."""

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
    # Lexical and hybrid modes: each retriever's rank of this passage (None: that retriever did not find it).
    retrievers: dict[str, int | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The hit as ``--format jsonl`` prints it: the same fields, names and rounding (README: Output formats)."""
        from dsearch.output import json_safe

        score = round(float(self.score), 6)
        record = {
            "qid": self.qid,
            "query": self.query,
            "rank": self.rank,
            "score": score if math.isfinite(score) else None,
            "id": self.id,
            "title": self.title,
            "text": self.text,
            "source": self.source,
            # Only the user's own fields can hold NaN or infinity (JSON has neither): the rest are texts,
            # whole numbers and the score, so only they are walked (a server builds thousands of these a second).
            "fields": json_safe(self.fields),
            "window": list(self.window) if self.window else None,
        }
        if self.retrievers is not None:
            record["retrievers"] = dict(self.retrievers)
        return record


def queries_from_texts(texts: Iterable[str]) -> Iterator[Query]:
    """Queries without ids are numbered 1, 2, 3… in order; blank ones are skipped."""
    number = 0
    for text in texts:
        text = text.strip()
        if text:
            number += 1
            yield Query(str(number), text)


def check_query_arguments(texts: list[str], what: str = "query argument") -> None:
    """Arguments must be text: Python hands over undecodable bytes as lone surrogates."""
    for number, text in enumerate(texts, 1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{what} {number} is not valid UTF-8; pass it in UTF-8") from None


def decode_lines(lines: Iterable[bytes], where: str, what: str = "queries") -> Iterator[str]:
    """Decode lines strictly as UTF-8, as the queries-file reader does: a leading BOM is dropped, bad bytes
    are an error naming ``where:line`` rather than a query silently made of U+FFFD."""
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{where}:{lineno}", "not valid UTF-8", f"send the {what} in UTF-8") from None
        yield line.lstrip("\ufeff") if lineno == 1 else line


class PipeLines:
    """The lines of a pipe or terminal (``dsearch query``'s stdin), read straight from its file descriptor, with
    ``ready()``: whether another non-blank line can be had without waiting. A batcher takes only those, so a
    script that writes a query and waits for its answer (a coprocess) gets it, instead of the answer waiting for
    255 more queries or the end of the input."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.pos = 0  # start of the next line to hand out
        self.scan = 0  # ready() found only blank lines before this offset
        self.eof = False

    def __iter__(self) -> PipeLines:
        return self

    def __next__(self) -> bytes:
        while True:
            end = self.buffer.find(b"\n", self.pos)
            if end >= 0 or (self.eof and self.pos < len(self.buffer)):
                stop = end + 1 if end >= 0 else len(self.buffer)
                line = bytes(self.buffer[self.pos : stop])
                self.pos = stop
                if self.pos >= 1 << 16:  # drop what was handed out, now and then
                    del self.buffer[: self.pos]
                    self.scan = max(self.scan - self.pos, 0)
                    self.pos = 0
                return line
            if self.eof:
                raise StopIteration
            self._read()

    def _read(self) -> None:
        # A parent may have left the descriptor non-blocking: wait for input as a blocking read would, where the
        # error ended the run before a query had arrived.
        chunk = read_waiting(self.fd, 1 << 16)
        if chunk:
            self.buffer += chunk
        else:
            self.eof = True

    def ready(self) -> bool:
        """Whether the next query can be had without waiting: a whole non-blank line has arrived (or the input
        has ended). Bytes that are not yet a whole line are read, without waiting, but do not count: taking them
        for a query blocked the batch on the rest of the line, or on the next line when they were blank."""
        while True:
            if self.eof:
                return True
            self.scan = max(self.scan, self.pos)
            while (end := self.buffer.find(b"\n", self.scan)) >= 0:
                if not _blank(self.buffer[self.scan : end]):
                    return True
                self.scan = end + 1  # blank lines are skipped, not queries: they do not count
            if len(self.buffer) - self.pos >= READ_AHEAD:  # blank lines without end, or one huge line: stop here
                return False
            try:
                if not select.select([self.fd], [], [], 0)[0]:
                    return False
                self._read()  # select said it would not block
            except (OSError, ValueError):  # not selectable, or a read error that the next line reports: go on
                return True


def _blank(raw: bytes | bytearray) -> bool:
    """Whether a line may be one that ``queries_from_texts`` skips: only whitespace once decoded (Unicode's too:
    a no-break space, U+3000) or a BOM. Such a line is not a query to wait for; a line that does not decode is,
    for its error."""
    if not raw.strip():
        return True
    try:
        return not bytes(raw).decode("utf-8").replace("\ufeff", "").strip()
    except UnicodeDecodeError:
        return False


class ReadyIterator(Generic[T]):
    """An iterator that keeps the ``ready()`` of the source it was made from (see ``PipeLines``)."""

    def __init__(self, items: Iterator[T], ready: Callable[[], bool]) -> None:
        self.items, self.ready = items, ready

    def __iter__(self) -> ReadyIterator[T]:
        return self

    def __next__(self) -> T:
        return next(self.items)


def next_batch(iterator: Iterator[T], size: int, batch: list[T] | None = None) -> list[T]:
    """Up to ``size`` items (appended to ``batch``, when given); past the first, only those the source has ready
    when it says (``ready()``)."""
    ready = getattr(iterator, "ready", None)
    batch = [] if batch is None else batch
    for item in iterator:
        batch.append(item)
        if len(batch) >= size or (ready is not None and not ready()):
            break
    return batch


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in batches (``next_batch``). An error reading an item (a line of stdin that is not UTF-8) comes
    after the batch of the items before it, so that those are answered whatever the timing: dropped with the
    batch, they were answered only when the bad line arrived after their batch had been taken."""
    iterator = iter(items)
    while True:
        batch: list[T] = []
        try:
            next_batch(iterator, size, batch)
        except Exception:
            if batch:
                yield batch
            raise
        if not batch:
            return
        yield batch


def read_query_file(path: str, data: bytes | None = None) -> list[Query]:
    """A query file: BEIR ``queries.jsonl`` (``_id``, ``text``), TSV ``qid<TAB>text``, or one query a line (.txt).

    The extension says which; a name without one of these (``/dev/stdin``, a shell's ``<(jq …)``, ``data`` read
    from stdin) is JSON Lines when its first line is a JSON object, else TSV."""
    p = Path(path)
    try:
        raw_lines = (p.read_bytes() if data is None else data).splitlines()
    except OSError as exc:
        raise InputError(path, f"cannot read the queries file ({exc.strerror or exc})") from None
    queries: list[Query] = []
    first_line: dict[str, int] = {}  # qid -> the line that first used it
    suffix = p.suffix.lower() if data is None else ""
    is_jsonl = suffix in {".jsonl", ".json", ".ndjson"}
    if suffix not in {".jsonl", ".json", ".ndjson", ".txt", ".tsv", ".tab"}:
        first = next((line.strip() for line in raw_lines if line.strip()), b"")
        is_jsonl = first.lstrip(b"\xef\xbb\xbf").startswith(b"{")
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
            # As for corpus ids: text or a number. An empty id broke TREC lines; {} or true printed as Python.
            # NaN and Infinity (which Python's JSON reads) printed "nan" and "inf" as qids.
            not_finite = isinstance(qid, float) and not math.isfinite(qid)
            if isinstance(qid, bool) or not isinstance(qid, str | int | float) or not str(qid).strip() or not_finite:
                problem = f"query id {json.dumps(qid)} is not a non-empty string or number"
                raise InputError(where, problem, "fix the line")
            query = Query(str(qid), text.strip())
        elif suffix == ".txt":
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


@dataclass(slots=True)
class SearchStats:
    """Where a search's time went, for ``-v`` (seconds per stage, summed over batches)."""

    encode: float = 0.0
    search: float = 0.0
    lookup: float = 0.0
    queries: int = 0


def run_search(
    index: OpenIndex,
    encoder: Encoder,
    queries: Iterable[Query],
    k: int,
    exclude_self: bool = False,
    min_score: float | None = None,
    stats: SearchStats | None = None,
    allowed_rows: Any = None,
) -> Iterator[tuple[Query, list[Hit]]]:
    """Yield each query with its hits, best first. Queries are encoded and searched in batches.

    ``exclude_self`` drops a hit whose id is the query's id (BEIR's convention); ``min_score`` drops hits
    scoring below it, so a query may get fewer than ``k`` hits; ``allowed_rows`` (a ``--where`` filter's
    boolean mask over rows) keeps the search to those rows before the top-k.
    """
    stats = stats if stats is not None else SearchStats()
    for batch in batches(queries, QUERY_BATCH):
        started = time.perf_counter()
        vectors = encoder.encode_queries([q.text for q in batch])
        stats.encode += time.perf_counter() - started
        check_query_vectors(vectors, batch)
        yield from _rank(index, batch, vectors, k, min_score, stats, exclude_self=exclude_self, allowed=allowed_rows)


def stable_search(index: OpenIndex, vectors: Any, k: int, allowed_rows: Any = None) -> tuple[Any, Any]:
    """``index.search``, with a flat index's scores independent of the other queries searched with it.

    BLAS picks its kernels by the batch's size and a query's place in it, so one query's float32 scores differ in
    the last bits from batch to batch (measured: up to 5e-5 on 384-d vectors), and two passages that tie swap
    places with the batch-mates. The candidates (a few more than ``k``) are re-scored one query at a time with
    a fixed order of operations (elementwise products, numpy's pairwise sum along each row: it depends on the
    row alone), then ordered by score and row. ANN indexes keep their own scores: FAISS searches each query on
    its own.
    """
    import numpy as np

    from dsearch.store import INDEX_TYPE

    if index.manifest.index_type != INDEX_TYPE or k == 0:
        return index.search(vectors, k, allowed_rows=allowed_rows)
    _, rows = index.search(vectors, min(k + RESCORE_MARGIN, index.rows), allowed_rows=allowed_rows)
    queries = np.asarray(vectors, dtype=np.float32)
    rescored = np.full(rows.shape, -np.inf, dtype=np.float32)
    per = max(1, RESCORE_FLOATS // max(1, rows.shape[1] * queries.shape[1]))  # queries re-scored per gather
    for start in range(0, len(rows), per):
        block = rows[start : start + per]
        valid = block >= 0
        if valid.any():
            owners = np.nonzero(valid)[0] + start  # the query of each valid candidate, in row-major order
            stored = index.vectors_at(block[valid])
            rescored[start : start + per][valid] = (stored * queries[owners]).sum(axis=1)
    key = -rescored
    key[np.isnan(key)] = -np.inf  # a corrupt vector's NaN score goes first, where check_hits sees it
    order = np.lexsort((rows, key), axis=1)[:, :k]
    return np.take_along_axis(rescored, order, 1), np.take_along_axis(rows, order, 1)


def find_rows(index: OpenIndex, ids: Iterable[str]) -> dict[str, int]:
    """The rows of the given passage ids that are in the index (one pass over the id column)."""
    wanted = set(ids)
    found: dict[str, int] = {}
    for row, record in enumerate(index.iter_rows(("id",))):
        if record["id"] in wanted:
            found[record["id"]] = row
            if len(found) == len(wanted):
                break
    return found


def get_passages(index: OpenIndex, ids: list[str]) -> tuple[list[Hit], list[str]]:
    """Stored passages by id, in the order asked (``dsearch get``), and the ids that are not in the index."""
    rows = find_rows(index, ids)
    metadata = index.lookup(rows.values())
    # A split passage's first row carries the whole passage; no window matched anything here.
    passages = [_hit(Query("", ""), 0, 0.0, rows[i], metadata[rows[i]], window=False) for i in ids if i in rows]
    return passages, [i for i in ids if i not in rows]


def like_query(passage_id: str) -> Query:
    """The query a --like search answers: the passage's id as qid, ``like:ID`` as text."""
    return Query(passage_id, f"like:{passage_id}")


def like_search(
    index: OpenIndex,
    passage_id: str,
    k: int,
    min_score: float | None = None,
    stats: SearchStats | None = None,
    allowed_rows: Any = None,
) -> Iterator[tuple[Query, list[Hit]]]:
    """More like this: rank passages by similarity to a stored passage's own vector (no model), without it."""
    import numpy as np

    row = find_rows(index, [passage_id]).get(passage_id)
    if row is None:
        fix = "check the id with " + spell("'dsearch get'", "Searcher.get()")
        raise InputError(passage_id, "no passage with this id in the index", fix)
    vectors = index.vectors_at([row])
    query = like_query(passage_id)
    if not np.isfinite(vectors).all():
        _corrupt(index, row, {row: {"id": passage_id}}, "has a stored vector with NaN or infinite values")
    yield from _rank(
        index, [query], vectors, k, min_score, stats or SearchStats(), exclude_id=passage_id, allowed=allowed_rows
    )


def _rank(
    index: OpenIndex,
    batch: list[Query],
    vectors: Any,
    k: int,
    min_score: float | None,
    stats: SearchStats,
    exclude_self: bool = False,
    exclude_id: str | None = None,
    allowed: Any = None,
) -> Iterator[tuple[Query, list[Hit]]]:
    """Search one batch of query vectors and turn the rows into hits, one per passage.

    A split passage has a row per window: it is ranked by its best window ("MaxP") and its other windows are
    skipped, so more rows than ``k`` may be needed; a query short of ``k`` passages is searched again with more,
    alone, so that no query's hits depend on how deep its batch-mates had to look (an ANN index's answers do).
    """
    passages = index.manifest.passages
    fetch = k + 1 if exclude_self or exclude_id is not None else k  # room for the dropped hit
    if passages < index.rows:
        fetch *= 2  # some rows are further windows of passages already found
    ranked: list[list[Hit]] = [[] for _ in batch]
    todo = list(range(len(batch)))  # queries still short of k passages
    while todo:
        fetch = min(fetch, index.rows)
        started = time.perf_counter()
        queries = [batch[i] for i in todo]
        scores, rows = stable_search(index, vectors if len(todo) == len(batch) else vectors[todo], fetch, allowed)
        stats.search += time.perf_counter() - started
        if min_score is not None:
            rows = rows.copy()
            rows[scores < min_score] = -1  # below the bar: not looked up, not printed
        started = time.perf_counter()
        metadata = index.lookup(rows.ravel())
        stats.lookup += time.perf_counter() - started
        check_hits(index, queries, scores, rows, metadata)
        short = []
        for i, query_scores, query_rows in zip(todo, scores.tolist(), rows.tolist(), strict=True):
            ranked[i] = _passages_hit(batch[i], query_scores, query_rows, metadata, k, exclude_self, exclude_id)
            # A query is done with k passages, or once its candidates ran out (-1: none left, or below --min-score).
            if len(ranked[i]) < k and -1 not in query_rows and fetch < index.rows:
                short.append(i)
        todo = short
        fetch *= 4
    stats.queries += len(batch)
    yield from zip(batch, ranked, strict=True)


def _passages_hit(
    query: Query,
    scores: list[float],
    rows: list[int],
    metadata: dict[int, dict[str, Any]],
    k: int,
    exclude_self: bool,
    exclude_id: str | None,
) -> list[Hit]:
    hits: list[Hit] = []
    seen: set[str] = set()
    for score, row in zip(scores, rows, strict=True):
        if row < 0:
            continue
        passage = metadata[row]["id"]
        if passage in seen or passage == exclude_id or (exclude_self and passage == query.qid):
            continue  # a lower-scoring window of a passage already ranked, or a hit to leave out
        if len(hits) == k:
            break
        seen.add(passage)
        hits.append(_hit(query, len(hits) + 1, score, row, metadata[row]))
    return hits


def _hit(query: Query, rank: int, score: float, row: int, meta: dict[str, Any], window: bool = True) -> Hit:
    fields = json.loads(meta["fields"]) if meta["fields"] else {}
    span = (meta["window_start"], meta["window_end"]) if window and meta.get("window_start") is not None else None
    return Hit(
        query.qid, query.text, rank, score, row, meta["id"], meta["title"], meta["text"], meta["source"], fields, span
    )


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
    directory = index.directory
    check = spell(f"'dsearch status {directory}' or 'dsearch info --verify {directory}'",
                  f"Searcher({str(directory)!r}, verify=True)")  # fmt: skip
    raise IndexDirError(
        f"{directory}: {where} {problem}: the index's vectors are corrupt (check with {check}, then rebuild the index)"
    )
