"""Lexical and hybrid search: BM25 and dense retrievers ranking passages, fused before the metadata lookup.

``--mode dense`` keeps to ``search.run_search``; this module answers ``lexical`` and ``hybrid``. Both
retrievers rank *passages*: a split passage's rows are its windows, the dense side ranks it by its best window
(MaxP, as ``search._rank`` does) and the lexical side scores its whole text once. A passage is keyed by its
number in the index (its BM25 document number); ``starts[passage]`` is its first row.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from dsearch.encoder import Encoder
from dsearch.errors import IndexDirError, option
from dsearch.fusion import rrf, weighted
from dsearch.lexical import LexicalSegment, has_lexical
from dsearch.search import (
    QUERY_BATCH,
    Hit,
    Query,
    SearchStats,
    _hit,
    batches,
    check_hits,
    check_query_vectors,
    run_search,
    stable_search,
)
from dsearch.store import OpenIndex

MODES = ("dense", "lexical", "hybrid")
# Dense stays the default: hybrid gained on SciFact but lost on the sample corpus's paraphrased questions, and
# its scores (fused ranks) would change what --min-score and existing pipelines read (README: why).
DEFAULT_MODE = "dense"
# Passages each retriever hands to fusion. Deep enough that fusion can lift a passage one retriever ranks
# low (Pyserini fuses 1,000 per side too); cheap, because only the final k are looked up in Parquet.
CANDIDATES = 1000


class Lexical:
    """The BM25 indexes of all segments, as one: scores per passage, and each passage's first row."""

    def __init__(self, index: OpenIndex) -> None:
        import numpy as np

        if not has_lexical(index):
            raise IndexDirError(
                f"{index.directory}: the index has no lexical (BM25) index (built with {option('lexical', False)} or "
                f"by an older dsearch); search it with {option('mode', 'dense')}, or rebuild it without "
                f"{option('lexical', False)}"
            )
        self.segments = [LexicalSegment(index.directory / seg.segment.path) for seg in index.segments]
        starts = []
        for lex, seg in zip(self.segments, index.segments, strict=True):
            first = np.asarray(lex.first_rows)
            # Each passage's first row: 0 first, rising, inside the segment. Damage that keeps the file's size
            # (found by status's checksums) otherwise surfaced as 'unexpected IndexError' or a passage twice.
            if len(first) and (first[0] != 0 or first[-1] >= seg.segment.rows or (np.diff(first) <= 0).any()):
                raise lex.damaged("its passages' first rows are out of order or past the segment")
            starts.append(first + seg.first_row)
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)

    def scores(self, text: str) -> Any:
        import numpy as np

        parts = [lex.scores(text) for lex in self.segments]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def lexical_ranking(lex: Lexical, text: str, depth: int, allowed: Any = None) -> list[tuple[int, float]]:
    """(passage, BM25 score), best first: passages holding at least one query term, and ``allowed``."""
    import numpy as np

    scores = lex.scores(text)
    if allowed is not None:
        scores = np.where(allowed, scores, 0.0)
    found = np.flatnonzero(scores > 0)
    if len(found) > depth:
        found = found[np.argpartition(-scores[found], depth - 1)[:depth]]
    order = np.lexsort((found, -scores[found]))
    return [(int(found[i]), float(scores[found[i]])) for i in order]


def dense_rankings(
    index: OpenIndex, starts: Any, vectors: Any, depth: int, allowed_rows: Any = None
) -> list[list[tuple[int, float, int]]]:
    """Per query vector, (passage, score, best row), best first: each passage once, by its best window.

    A query whose windows crowd out ``depth`` passages is searched again deeper, alone (as ``search._rank`` does),
    so its ranking never depends on its batch-mates.
    """
    import numpy as np

    passages = max(1, len(starts))
    fetch = depth * max(1, -(-index.rows // passages))  # rows per passage, rounded up
    rankings: list[list[tuple[int, float, int]]] = [[] for _ in range(len(vectors))]
    todo = list(range(len(vectors)))
    while todo:
        fetch = min(fetch, index.rows)
        searched = vectors if len(todo) == len(vectors) else vectors[todo]
        scores, rows = stable_search(index, searched, fetch, allowed_rows)
        short = []
        for i, query_scores, query_rows in zip(todo, scores, rows, strict=True):
            valid = query_rows >= 0  # -1: no more rows (all fetched, or filtered out)
            docs = np.searchsorted(starts, query_rows[valid], side="right") - 1
            _, first = np.unique(docs, return_index=True)
            first = np.sort(first)[:depth]  # each passage at its best window, in score order
            kept_scores, kept_rows = query_scores[valid][first], query_rows[valid][first]
            kept = zip(docs[first], kept_scores, kept_rows, strict=True)
            rankings[i] = [(int(d), float(s), int(r)) for d, s, r in kept]
            if len(first) < depth and valid.all() and fetch < index.rows:
                short.append(i)  # fewer passages than wanted, but rows left: windows of the same passages filled it
        todo = short
        fetch *= 4
    return rankings


def search(
    index: OpenIndex,
    encoder: Encoder | None,
    queries: Iterable[Query],
    k: int,
    mode: str,
    alpha: float | None = None,
    exclude_self: bool = False,
    min_score: float | None = None,
    stats: SearchStats | None = None,
    allowed_rows: Any = None,
    lex: Lexical | None = None,
) -> Iterator[tuple[Query, list[Hit]]]:
    """Yield each query with its hits for ``mode`` lexical or hybrid, best first.

    Hybrid fuses the two rankings by reciprocal rank (RRF, k = 60), or with ``alpha`` by ``alpha`` × the
    min-max-normalised dense score + (1 − ``alpha``) × the normalised BM25 score. ``score`` is the fused score
    (hybrid) or the BM25 score (lexical); ``min_score`` applies to it. Each hit carries each retriever's rank.
    ``lex``: the index's BM25 side already opened (a ``Searcher`` keeps it between searches).
    """
    import numpy as np

    stats = stats if stats is not None else SearchStats()
    started = time.perf_counter()
    lex = lex if lex is not None else Lexical(index)
    allowed = None if allowed_rows is None else np.asarray(allowed_rows)[lex.starts]
    stats.search += time.perf_counter() - started
    depth = max(CANDIDATES, k + 1)
    for batch in batches(queries, QUERY_BATCH):
        dense: list[list[tuple[int, float, int]]] = [[] for _ in batch]
        if mode == "hybrid":
            assert encoder is not None
            started = time.perf_counter()
            vectors = encoder.encode_queries([q.text for q in batch])
            stats.encode += time.perf_counter() - started
            check_query_vectors(vectors, batch)
            started = time.perf_counter()
            dense = dense_rankings(index, lex.starts, vectors, depth, allowed_rows)
            stats.search += time.perf_counter() - started
        started = time.perf_counter()
        fused_all = []
        for query, dense_ranking in zip(batch, dense, strict=True):
            lexical = lexical_ranking(lex, query.text, depth, allowed)
            if mode == "lexical":
                fused = lexical
            elif alpha is None:
                fused = rrf({"dense": [d for d, _, _ in dense_ranking], "lexical": [d for d, _ in lexical]})
            else:
                fused = weighted(
                    {"dense": [(d, s) for d, s, _ in dense_ranking], "lexical": lexical},
                    {"dense": alpha, "lexical": 1.0 - alpha},
                )
            if min_score is not None:
                fused = [(d, s) for d, s in fused if s >= min_score]
            ranks = {
                "dense": {d: rank for rank, (d, _, _) in enumerate(dense_ranking, 1)},
                "lexical": {d: rank for rank, (d, _) in enumerate(lexical, 1)},
            }
            best_row = {d: r for d, _, r in dense_ranking}
            fused_all.append((fused[: k + 1 if exclude_self else k], ranks, best_row, dense_ranking))
        stats.search += time.perf_counter() - started
        started = time.perf_counter()
        rows = [best.get(d, int(lex.starts[d])) for fused, _, best, _ in fused_all for d, _ in fused]
        metadata = index.lookup(rows)
        stats.lookup += time.perf_counter() - started
        for query, (fused, ranks, best, dense_ranking) in zip(batch, fused_all, strict=True):
            if dense_ranking:  # the same cheap checks as a dense search: impossible scores, corrupt vectors
                chosen = {f for f, _ in fused}
                shown = [(s, r) for d, s, r in dense_ranking if d in chosen]
                if shown:
                    check_hits(index, [query], np.array([[s for s, _ in shown]]), np.array([[r for _, r in shown]]),
                               metadata)
            hits: list[Hit] = []
            for doc, score in fused:
                row = best.get(doc, int(lex.starts[doc]))
                meta = metadata[row]
                if exclude_self and meta["id"] == query.qid:
                    continue
                if len(hits) == k:
                    break
                hit = _hit(query, len(hits) + 1, score, row, meta, window=doc in best)
                hit.retrievers = {
                    name: ranks[name].get(doc) for name in (("lexical",) if mode == "lexical" else ("dense", "lexical"))
                }
                hits.append(hit)
            yield query, hits
        stats.queries += len(batch)


def run(
    index: OpenIndex,
    encoder: Encoder | None,
    queries: Iterable[Query],
    k: int,
    mode: str = "dense",
    alpha: float | None = None,
    exclude_self: bool = False,
    min_score: float | None = None,
    stats: SearchStats | None = None,
    allowed_rows: Any = None,
    lex: Lexical | None = None,
) -> Iterator[tuple[Query, list[Hit]]]:
    """Search in any mode: dense through ``search.run_search``, lexical and hybrid here."""
    if mode == "dense":
        assert encoder is not None
        return run_search(index, encoder, queries, k, exclude_self, min_score, stats, allowed_rows)
    return search(index, encoder, queries, k, mode, alpha, exclude_self, min_score, stats, allowed_rows, lex)
