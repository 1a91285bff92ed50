"""Fusing rankings: reciprocal-rank fusion (the default) and a weighted sum of min-max-normalised scores.

Both work on passages (any hashable key), each retriever's list best first. Ties are broken by the key, so
results are repeatable.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

RRF_K = 60  # Cormack, Clarke & Büttcher (2009); the constant Pyserini, Elastic and OpenSearch use


def rrf(rankings: dict[str, Sequence[Hashable]], k: int = RRF_K) -> list[tuple[Hashable, float]]:
    """Reciprocal-rank fusion: a passage scores the sum over retrievers of 1 / (k + its rank there)."""
    fused: dict[Hashable, float] = {}
    for ranking in rankings.values():
        for rank, key in enumerate(ranking, 1):
            fused[key] = fused.get(key, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def weighted(
    scored: dict[str, Sequence[tuple[Hashable, float]]], weights: dict[str, float]
) -> list[tuple[Hashable, float]]:
    """Convex combination: each retriever's scores min-max-normalised over its own candidates, then weighted.

    A passage a retriever did not return gets 0 from it, like its lowest candidate. Normalising makes cosine
    (within [-1, 1]) and BM25 (unbounded) scores comparable per query.
    """
    fused: dict[Hashable, float] = {}
    for name, candidates in scored.items():
        if not candidates:
            continue
        values = [score for _, score in candidates]
        low, high = min(values), max(values)
        span = high - low
        for key, score in candidates:
            norm = (score - low) / span if span > 0 else 1.0
            fused[key] = fused.get(key, 0.0) + weights[name] * norm
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))
