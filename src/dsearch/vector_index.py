"""Approximate (ANN) and compressed FAISS indexes beside each segment's exact vectors.

A segment's ``index.faiss`` (an exact ``IndexFlatIP``, float32, memory-mapped) stays the raw vector store and
the source of truth: ``--update`` reuses its vectors, compressed indexes re-rank their candidates exactly from
it, and ``dsearch reindex`` rebuilds the ANN file from it without the model. An ANN segment adds one file,
``ann-<token>.faiss``, listed in the manifest with its checksum like every other file.

Everything here imports faiss lazily: ``dsearch --help`` and flat queries never load it.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import threading
import time
import uuid
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dsearch.errors import IndexDirError, option

log = logging.getLogger("dsearch")

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")
FLAT = "IndexFlatIP"  # the manifest's name for an exact index: format 1's only type, kept for flat
ANN_PREFIX = "ann-"
KNOWN_TYPES = (FLAT, "hnsw", "ivf", "ivfpq", "factory")  # what a manifest's index_type may say
# Below this many passages an exact scan costs about 1 ms a query at 384-d here (MEASUREMENTS.md): no ANN.
FLAT_BELOW = 100_000
RECALL_TARGET = 0.95
RECALL_SAMPLE = 1000  # own vectors used as queries to measure recall@10 at build time
RECALL_K = 10
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80  # MEASUREMENTS.md: HNSW32/efC 80 reaches 0.985-0.998 top-10 overlap
# FAISS prints a warning (on stderr, unconditionally) below 39 training points per centroid: stay above it.
MIN_POINTS_PER_CENTROID = 39
MAX_TRAIN = 200_000  # training points read at most: 200k x 384 floats is 300 MB
ADD_CHUNK = 65_536  # vectors added to the ANN index at a time: bounds the build's extra memory
RERANK_FACTOR = 10  # compressed indexes fetch this many times k candidates, re-ranked exactly
# A --where keeping at most this many of a segment's rows is searched exactly when the ANN index finds fewer than
# k of them (an IVF's unprobed lists hold the rest, a 4-bit fast scan drops scores <= 0): one gather of their
# vectors, 100 MB at 384-d. Past it, an ANN search may return fewer than k of the matching passages.
EXACT_FILTER_ROWS = 65_536
NPROBE_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
EF_STEPS = (16, 32, 64, 128, 256, 512, 1024)


# --- choosing ----------------------------------------------------------------------------------------


@dataclass
class IndexPlan:
    """What to build: the manifest's ``index_type``, the FAISS factory string, and why."""

    index_type: str  # FLAT, "hnsw", "ivf", "ivfpq" or "factory"
    factory: str | None
    reason: str
    requested: str
    estimated_bytes: int

    @property
    def compressed(self) -> bool:
        return self.factory is not None and lossy(self.factory)


def lossy(factory: str) -> bool:
    """Whether a factory's index scores with something other than the exact vectors: codes (PQ, SQ, LSH,
    RaBitQ, the additive RQ and LSQ, ZnLattice) or a transform that changes them (PCA, OPQ, ITQ, L2norm). Its
    candidates are re-ranked exactly from the raw store, else it would print approximate scores as cosines, and
    --min-score would read those."""
    return bool(re.search(r"PQ|SQ|LSH|RaBitQ|RQ|LSQ|ZnLattice|PCA|ITQ|L2norm", factory))


def parse_memory(text: str) -> int:
    """``2G``, ``512M``, ``1.5G``, ``300000K`` or a plain byte count → bytes; ValueError when it is none of these."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 2G, 512M, 1.5G)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
    value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return value


def default_memory() -> int:
    """Half of this machine's RAM: the other half stays for the page cache, the model and other processes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):
        return 4 << 30


def ivf_lists(n: int) -> int:
    """autofaiss's rule of thumb, about 4·sqrt(n) lists (a power of two), with enough training points per list."""
    lists = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return max(1, min(lists, n // MIN_POINTS_PER_CENTROID))


def pq_bits(n: int) -> int:
    """8-bit PQ codes, fewer on a tiny corpus so that each code book has enough training points."""
    return max(1, min(8, int(math.log2(max(2, n // MIN_POINTS_PER_CENTROID)))))


def _pq_choices(dim: int) -> list[int]:
    """Sub-quantizer counts that divide ``dim`` (even, as fast-scan wants), from dim/4 down to 4."""
    return [m for m in range(dim // 4, 3, -1) if dim % m == 0 and m % 2 == 0] or [1]


def pq_codes(n: int, m: int) -> tuple[str, float]:
    """The PQ part of the factory string and its bytes a vector.

    4-bit fast-scan codes (``x4fs``): MEASUREMENTS.md found IVF-PQ48x4fs with an exact re-rank at 0.95-0.98
    recall@10 and 19-25x the flat scan on real 384-d embeddings, and they train in a fraction of 8-bit PQ's
    time. A tiny corpus cannot train 16 centroids a sub-quantizer and gets fewer bits instead.
    """
    if n >= 16 * MIN_POINTS_PER_CENTROID:
        return f"PQ{m}x4fs", m / 2
    bits = pq_bits(n)
    return f"PQ{m}x{bits}", m * bits / 8


def estimate_bytes(kind: str, n: int, dim: int, m: int = 0) -> int:
    """Resident memory of a searched index (FAISS's own structures; the raw store is paged in only for re-rank)."""
    if kind == FLAT:
        return n * dim * 4
    if kind == "hnsw":
        return n * (dim * 4 + HNSW_M * 2 * 4 + 16)  # vectors + level-0 links (+ a few upper levels)
    nlist = ivf_lists(n)
    if kind == "ivf":
        return n * (dim * 4 + 8) + nlist * dim * 4
    # ivfpq: codes + ids + centroids + code books
    return int(n * (pq_codes(n, m)[1] + 8)) + nlist * dim * 4 + 256 * dim * 4


def plan_index(requested: str, n: int, dim: int, budget: int) -> IndexPlan:
    """Pick the index for ``n`` vectors of ``dim`` within ``budget`` bytes; ValueError when none fits.

    ``auto`` follows autofaiss's shape: exact while small; IVF when it fits the budget (its inverted lists
    memory-map, so a cold query reads only the lists it probes; HNSW's graph must be loaded whole and takes
    minutes to build on two cores); IVF-PQ with the largest codes that fit when the vectors do not.
    """
    kind = requested.strip()
    lower = kind.lower()
    nlist = ivf_lists(n)
    smallest_m = min(_pq_choices(dim) or [dim])
    floor = estimate_bytes("ivfpq", n, dim, smallest_m)
    if lower == "auto":
        if n < FLAT_BELOW and estimate_bytes(FLAT, n, dim) <= budget:
            return IndexPlan(FLAT, None, f"{n} passages: an exact scan is fast enough", kind, n * dim * 4)
        if estimate_bytes("ivf", n, dim) <= budget:
            size = estimate_bytes("ivf", n, dim)
            why = f"{n} passages: IVF with {nlist} lists fits the memory budget ({_gib(size)} of {_gib(budget)})"
            return IndexPlan("ivf", f"IVF{nlist},Flat", why, kind, size)
        lower = "ivfpq"
    if lower == "flat":
        return _fits(IndexPlan(FLAT, None, "asked for", kind, estimate_bytes(FLAT, n, dim)), budget, floor)
    if lower == "hnsw":
        plan = IndexPlan("hnsw", f"HNSW{HNSW_M}", "asked for", kind, estimate_bytes("hnsw", n, dim))
        return _fits(plan, budget, floor)
    if lower == "ivf":
        plan = IndexPlan("ivf", f"IVF{nlist},Flat", "asked for", kind, estimate_bytes("ivf", n, dim))
        return _fits(plan, budget, floor)
    if lower == "ivfpq":
        fitting = [m for m in _pq_choices(dim) if estimate_bytes("ivfpq", n, dim, m) <= budget]
        if not fitting:
            raise ValueError(
                f"{_gib(budget)} cannot hold {n} vectors of dimension {dim} even compressed to "
                f"{pq_codes(n, smallest_m)[1]:g} bytes each (needs {_gib(floor)})"
            )
        # dim/8 bytes a vector (48 at 384-d) re-ranks to about 0.95 recall (MEASUREMENTS.md); more if it fits.
        m = max(m for m in fitting if m <= max(dim // 8, min(fitting)))
        size = estimate_bytes("ivfpq", n, dim, m)
        codes, per_vector = pq_codes(n, m)
        why = (
            f"{n} x {dim}-d vectors ({_gib(n * dim * 4)}) compressed to {per_vector:g} bytes each "
            f"(budget {_gib(budget)}), re-ranked exactly from the stored vectors"
        )
        return IndexPlan("ivfpq", f"IVF{nlist},{codes}", why, kind, size)
    return factory_plan(kind, dim)


def _fits(plan: IndexPlan, budget: int, floor: int) -> IndexPlan:
    if plan.estimated_bytes > budget:
        hint = f"; use {option('index_type', 'ivfpq')} or auto" if floor <= budget else ""
        raise ValueError(
            f"a {plan.index_type} index of these vectors needs about {_gib(plan.estimated_bytes)}, more than "
            f"the memory budget of {_gib(budget)}{hint}"
        )
    return plan


def factory_plan(factory: str, dim: int) -> IndexPlan:
    """An expert's FAISS factory string, checked by FAISS itself (the indexer does it before encoding anything;
    whether FAISS can also train it on the vectors shows only once they are encoded)."""
    if not looks_like_factory(factory):
        choices = ", ".join(INDEX_TYPES)
        raise ValueError(f"unknown index type {factory!r}; choose one of {choices} or a FAISS factory string")
    import faiss

    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except Exception as exc:  # faiss raises RuntimeError with a C++ message
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"FAISS cannot build {factory!r} ({detail[:120]})") from None
    return IndexPlan("factory", factory, "FAISS factory string", factory, 0)


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB" if size >= 1 << 28 else f"{size / (1 << 20):.1f} MiB"


# --- searching ---------------------------------------------------------------------------------------


class VectorIndex(Protocol):
    """One segment's vectors, searched: per query the best ``k`` (scores, local rows), in no particular order."""

    def search(
        self, queries: Any, k: int, params: dict[str, Any] | None = None, allowed_rows: Any = None
    ) -> tuple[Any, Any]: ...


class FlatIndex:
    """The exact scan over the raw store (numpy, no faiss import): what a flat segment is searched with."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def search(
        self, queries: Any, k: int, params: dict[str, Any] | None = None, allowed_rows: Any = None
    ) -> tuple[Any, Any]:
        import numpy as np

        if allowed_rows is None:
            return self.raw.search(queries, k)
        allowed = np.asarray(allowed_rows, dtype=np.int64)
        if len(allowed) == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores = queries @ self.raw.take(allowed).T
        keep = min(k, len(allowed))
        top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        return np.take_along_axis(scores, top, 1), allowed[top]


@dataclass
class FaissIndex:
    """An ANN file searched by FAISS; compressed types re-rank ``RERANK_FACTOR``·k candidates from the raw store."""

    index: Any
    raw: Any  # store.FlatVectors of the same segment
    defaults: dict[str, Any] = field(default_factory=dict)  # nprobe / efSearch chosen at build time
    rerank: bool = False
    path: Path | None = None  # the ANN file, named when it turns out corrupt
    # An IVF inside a wrapper that cannot pass parameters down (_ivf_params: OPQ16,IVF256,PQ16 and IVF,PQ,RFlat
    # can) takes nprobe as a setting on the shared index: searches that set it take turns (_wrapped_ivf).
    _knob_lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    def search(
        self, queries: Any, k: int, params: dict[str, Any] | None = None, allowed_rows: Any = None
    ) -> tuple[Any, Any]:
        import faiss
        import numpy as np

        knobs = {**self.defaults, **{key: v for key, v in (params or {}).items() if v is not None}}
        effort = float(knobs.pop("effort", 1.0) or 1.0)
        fetch = min(self.index.ntotal, k * RERANK_FACTOR if self.rerank else k)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        wrapped = _wrapped_ivf(faiss, self.index)
        with self._knob_lock if wrapped is not None else nullcontext():
            search_params = self._params(faiss, knobs, effort, allowed_rows)
            if search_params is not None:
                scores, rows = self.index.search(queries, fetch, params=search_params)
            else:
                scores, rows = self.index.search(queries, fetch)
        self._check_rows(rows)
        if self.rerank:
            scores, rows = self._rerank(queries, rows, k)
        rows = rows.astype(np.int64)
        if allowed_rows is not None and len(allowed_rows) <= EXACT_FILTER_ROWS:
            scores, rows = self._exact_where_short(queries, k, scores, rows, allowed_rows)
        return scores, rows

    def _exact_where_short(self, queries: Any, k: int, scores: Any, rows: Any, allowed: Any) -> tuple[Any, Any]:
        """The queries that got fewer than k of the allowed rows (while there are more) searched exactly over
        them: a filter's k hits must not depend on which IVF lists were probed."""
        import numpy as np

        wanted = min(k, len(allowed))
        short = np.flatnonzero((rows >= 0).sum(axis=1) < wanted)
        if len(short) == 0:
            return scores, rows
        exact_scores, exact_rows = FlatIndex(self.raw).search(queries[short], k, allowed_rows=allowed)
        width = max(rows.shape[1], exact_rows.shape[1])
        out_scores = np.full((len(rows), width), -np.inf, dtype=np.float32)
        out_rows = np.full((len(rows), width), -1, dtype=np.int64)
        out_scores[:, : rows.shape[1]], out_rows[:, : rows.shape[1]] = scores, rows
        out_scores[short], out_rows[short] = -np.inf, -1
        out_scores[short, : exact_rows.shape[1]] = exact_scores
        out_rows[short, : exact_rows.shape[1]] = exact_rows
        return out_scores, out_rows

    def _check_rows(self, rows: Any) -> None:
        """Rows past the segment (a damaged id list in the ANN file) would index the raw store out of range."""
        bad = (rows >= self.raw.ntotal) | (rows < -1)
        if bad.any():
            where = self.path or "the ANN index file"
            directory = self.path.parent.parent if self.path is not None else "DIR"
            raise IndexDirError(
                f"{where}: returned row {int(rows[bad][0])} of a segment of {self.raw.ntotal} rows (the file is "
                f"corrupt); rebuild it from the stored vectors with 'dsearch reindex {directory}'"
            )

    def _params(self, faiss: Any, knobs: dict[str, Any], effort: float, allowed_rows: Any) -> Any:
        """FAISS search parameters: the query-time knobs (scaled by effort) and an allowed-rows selector."""
        import numpy as np

        selector = None
        if allowed_rows is not None:
            selector = faiss.IDSelectorBatch(np.asarray(allowed_rows, dtype=np.int64))
        ivf = _ivf_of(faiss, self.index)
        if ivf is not None:
            nprobe = max(1, min(ivf.nlist, round(int(knobs.get("nprobe", 1)) * effort)))
            params = _ivf_params(faiss, self.index, faiss.SearchParametersIVF(nprobe=nprobe, sel=selector))
            if params is not None:
                return params
            ivf.nprobe = nprobe  # another wrapper: set on the IVF inside (under FaissIndex._knob_lock)
        hnsw = _hnsw_of(faiss, self.index)
        if hnsw is not None:
            # Capped at the rows there are (beyond, HNSW visits nothing more): a huge --ef overflowed FAISS's int,
            # and 2,000,000,000 allocated 16 GB of search heaps on an 18k-row index.
            ef = max(1, round(min(float(knobs.get("efSearch", 16)) * effort, self.index.ntotal)))
            # _hnsw_of looks inside exactly the wrappers that _ivf_params passes parameters through
            return _ivf_params(faiss, self.index, faiss.SearchParametersHNSW(efSearch=ef, sel=selector))
        if selector is not None:
            return faiss.SearchParameters(sel=selector)
        return None

    def _rerank(self, queries: Any, candidates: Any, k: int) -> tuple[Any, Any]:
        """Exact inner products of each query's candidates, from the raw store: printed scores are exact."""
        import numpy as np

        n = len(queries)
        keep = min(k, candidates.shape[1])
        out_scores = np.full((n, keep), -np.inf, dtype=np.float32)
        out_rows = np.full((n, keep), -1, dtype=np.int64)
        for i in range(n):
            rows = candidates[i][candidates[i] >= 0]
            if len(rows) == 0:
                continue
            exact = self.raw.take(np.sort(rows)) @ queries[i]
            rows = np.sort(rows)
            order = np.lexsort((rows, -exact))[:keep]
            out_scores[i, : len(order)] = exact[order]
            out_rows[i, : len(order)] = rows[order]
        return out_scores, out_rows


def _ivf_of(faiss: Any, index: Any) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except Exception:  # not an IVF index
        return None


def _ivf_params(faiss: Any, index: Any, ivf_params: Any) -> Any:
    """``ivf_params`` (nprobe or efSearch, the allowed rows) as ``index`` takes them for the IVF or HNSW it is or
    wraps: inside each wrapper's own parameters (a transform such as OPQ or PCA, a refine stage); None for another
    wrapper. FAISS's IVF refuses parameters of any other type ("IndexIVF params have incorrect type"), and so do
    a refine stage and HNSW (which would otherwise search with its build-time efSearch)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIVF) or hasattr(index, "hnsw"):  # (SWIG wrappers: isinstance, never `is`)
        return ivf_params
    if isinstance(index, faiss.IndexPreTransform):
        inner = _ivf_params(faiss, index.index, ivf_params)
        params = faiss.SearchParametersPreTransform()
        if inner is not None:
            params.index_params = inner
    elif isinstance(index, faiss.IndexRefine):
        inner = _ivf_params(faiss, index.base_index, ivf_params)
        params = faiss.IndexRefineSearchParameters()
        if inner is not None:
            params.k_factor = index.k_factor  # the index's own, as a search without parameters uses
            params.base_index_params = inner
    else:
        return None
    if inner is None:
        return None
    params.referenced_objects = [inner]  # SWIG keeps no reference to the inner parameters: Python must
    return params


def _wrapped_ivf(faiss: Any, index: Any) -> Any:
    """The IVF inside ``index`` when its nprobe must be set on it, not passed per call (``_ivf_params``)."""
    ivf = _ivf_of(faiss, index)
    if ivf is None or _ivf_params(faiss, index, faiss.SearchParametersIVF()) is not None:
        return None
    return ivf


def _hnsw_of(faiss: Any, index: Any) -> Any:
    """The HNSW index ``index`` is, or wraps in a transform (``PCA32,HNSW16``) or a refine stage; else None."""
    index = faiss.downcast_index(index)
    if hasattr(index, "hnsw"):
        return index
    if isinstance(index, faiss.IndexPreTransform):
        return _hnsw_of(faiss, index.index)
    if isinstance(index, faiss.IndexRefine):
        return _hnsw_of(faiss, index.base_index)
    return None


def ann_file(files: dict[str, Any]) -> str | None:
    """The name of a segment's ANN file among its manifest-listed files, if it has one."""
    return next((name for name in sorted(files) if name.startswith(ANN_PREFIX)), None)


def open_ann(path: Path, raw: Any, params: dict[str, Any]) -> FaissIndex:
    """Open an ANN file memory-mapped: IVF lists stay on disk and a query reads only the lists it probes."""
    import faiss

    try:
        try:
            # Zero-copy mapping: searching an IVF index mapped this way ran as fast as one read into memory
            # (1.2 ms a query at 110k, nprobe 32), where plain IO_FLAG_MMAP took 3.7-6 ms; HNSW's vectors map too.
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # a structure FAISS cannot map zero-copy
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except Exception as exc:
        raise IndexDirError(
            f"{path}: the ANN index file is corrupt or unreadable; rebuild it from the stored vectors with "
            f"'dsearch reindex {path.parent.parent}'"
        ) from exc
    if index.ntotal != raw.ntotal or index.d != raw.d:
        raise IndexDirError(
            f"{path}: the ANN index holds {index.ntotal} x {index.d} vectors, the segment {raw.ntotal} x {raw.d}; "
            f"rebuild it with 'dsearch reindex {path.parent.parent}'"
        )
    defaults = {key: params[key] for key in ("nprobe", "efSearch") if key in params}
    # lossy(): an index built before PCA counted as lossy has "rerank": false in its manifest
    rerank = bool(params.get("rerank")) or lossy(str(params.get("factory", "")))
    return FaissIndex(index, raw, defaults, rerank, path)


# --- measuring recall --------------------------------------------------------------------------------


def recall_at_k(truth: Any, found: Any, k: int = RECALL_K) -> float:
    """Mean over queries of |found's first k ∩ truth's first k| / |truth's first k| (rows < 0 are padding)."""
    total, counted = 0.0, 0
    for true_rows, found_rows in zip(truth, found, strict=True):
        expected = {int(r) for r in list(true_rows)[:k] if r >= 0}
        if not expected:
            continue
        got = {int(r) for r in list(found_rows)[:k] if r >= 0}
        total += len(expected & got) / len(expected)
        counted += 1
    return total / counted if counted else 1.0


def _without_self(sample: Any, scores: Any, rows: Any, k: int) -> Any:
    """Each query's rows best first, its own row dropped, cut to k (ties by row, as queries break them)."""
    import numpy as np

    out = np.full((len(sample), k), -1, dtype=np.int64)
    for i, own in enumerate(sample):
        order = np.lexsort((rows[i], -scores[i]))
        ranked = [int(r) for r in rows[i][order] if r >= 0 and r != own][:k]
        out[i, : len(ranked)] = ranked
    return out


def sample_rows(n: int, size: int, seed: int = 0) -> Any:
    """A uniform sample of rows without replacement, in row order (sequential reads of the memmap)."""
    import numpy as np

    if n <= size:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


def measure_recall(index: VectorIndex, raw: Any, params: dict[str, Any], sample: Any, truth: Any) -> float:
    """recall@10 of ``index`` (with ``params``) against the exact top-10 ``truth`` of the sample rows."""
    queries = raw.take(sample)
    scores, rows = index.search(queries, RECALL_K + 1, params)
    return recall_at_k(truth, _without_self(sample, scores, rows, RECALL_K), RECALL_K)


def exact_truth(raw: Any, sample: Any) -> Any:
    """The exact top-10 of each sample row's own vector, its own row excluded."""
    scores, rows = raw.search(raw.take(sample), min(raw.ntotal, RECALL_K + 1))
    return _without_self(sample, scores, rows, RECALL_K)


def tune(index: FaissIndex, raw: Any, sample: Any, truth: Any) -> tuple[dict[str, Any], float]:
    """The smallest nprobe / efSearch whose recall@10 on the sample reaches RECALL_TARGET (else the largest tried)."""
    import faiss

    ivf = _ivf_of(faiss, index.index)
    if ivf is not None:
        knob, steps = "nprobe", [s for s in NPROBE_STEPS if s < ivf.nlist] + [ivf.nlist]
    elif _hnsw_of(faiss, index.index) is not None:
        knob, steps = "efSearch", list(EF_STEPS)
    else:
        return {}, measure_recall(index, raw, {}, sample, truth)
    recall = 0.0
    for position, value in enumerate(steps):
        recall = measure_recall(index, raw, {knob: value}, sample, truth)
        log.debug("recall@10 with %s=%d: %.4f", knob, value, recall)
        if recall >= RECALL_TARGET:
            # One step more as the default: real queries lie farther from the corpus than its own vectors.
            # On SciFact, nprobe 16 (0.96 on own vectors) lost 0.045 nDCG@10 to the exact index; 32 lost 0.0002.
            if position + 1 < len(steps):
                value = steps[position + 1]
                recall = measure_recall(index, raw, {knob: value}, sample, truth)
            break
    return {knob: value}, recall


# --- building ----------------------------------------------------------------------------------------


@dataclass
class Previous:
    """The ANN file that an ``--update`` replaces, and where its rows went: what ``build_ann`` may reuse."""

    path: Path
    index_type: str
    params: dict[str, Any]  # the old manifest's index_params
    rows: int  # rows of the old index
    old_rows: Any  # np.ndarray, per new row: the old row whose vector it reuses, or -1 (new, re-encoded, resumed)


# Retrain an IVF structure once the index holds 4x the rows it was trained on (or a quarter): FAISS's and
# autofaiss's guidance sizes the lists at about 4*sqrt(n) (ivf_lists), so at 4x the rows a fresh build would
# have twice the lists, and each probe of the old ones scans 4x the vectors it was sized for (search cost per
# probe grows linearly with list length); the centroids also drift from data they never saw. Within that
# range, reusing the trained centroids and codebooks keeps recall (re-measured and recorded at every update)
# and skips k-means, the largest part of a build.
RETRAIN_GROWTH = 4


def reuse_plan(plan: IndexPlan, previous: Previous | None, n: int) -> str | None:
    """Why the previous ANN structure can be reused for ``plan`` at ``n`` rows, or None when it must be rebuilt."""
    if previous is None or plan.factory is None or previous.index_type != plan.index_type:
        return None
    old = str(previous.params.get("factory", ""))
    if plan.index_type == "hnsw":
        # A graph is built on row numbers: it can grow only when every old row kept its number (appends only).
        appended = n >= previous.rows and bool((previous.old_rows[: previous.rows] == _arange(previous.rows)).all())
        return "rows were only appended: the graph grows in place" if old == plan.factory and appended else None
    old_ivf, new_ivf = re.fullmatch(r"IVF(\d+),(.+)", old), re.fullmatch(r"IVF(\d+),(.+)", plan.factory)
    if plan.index_type == "factory":
        same = old == plan.factory
    else:  # nlist follows n; the rest of the factory string (codes) must be the same
        same = bool(old_ivf and new_ivf and old_ivf.group(2) == new_ivf.group(2))
    if not same or not old_ivf:
        return None
    trained = int(previous.params.get("trained_rows", previous.rows))
    if not trained / RETRAIN_GROWTH <= n <= trained * RETRAIN_GROWTH:
        return None
    return f"reusing the centroids and codes trained on {trained} rows ({n} now, retrain beyond x{RETRAIN_GROWTH})"


def _arange(n: int) -> Any:
    import numpy as np

    return np.arange(n, dtype=np.int64)


def _reuse(faiss: Any, raw: Any, plan: IndexPlan, previous: Previous) -> Any:
    """The previous index, emptied and refilled with this segment's rows, without training.

    IVF: the old file gives the trained centroids (and PQ/SQ codebooks) and each old row's list, so a reused
    vector goes back into its list without the coarse search (``add_core`` with precomputed lists); only new
    rows are assigned. Fast-scan IVF cannot take precomputed lists here, so it re-assigns every row (still no
    training). HNSW (rows only appended): the old graph, with the new rows added.
    """
    import numpy as np

    index = faiss.read_index(str(previous.path))  # whole, writable: it becomes the new index
    if index.ntotal != previous.rows or index.d != raw.d:
        raise ValueError("the previous ANN file does not match its manifest")
    if plan.index_type == "hnsw":
        for start in range(previous.rows, raw.ntotal, ADD_CHUNK):
            index.add(raw.rows(start, ADD_CHUNK))
        return index
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    lists = np.full(previous.rows, -1, dtype=np.int64)
    invlists = ivf.invlists
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size:
            lists[faiss.rev_swig_ptr(invlists.get_ids(list_no), size)] = list_no
    index.reset()  # keeps the trained quantizer and codebooks; drops the codes and ids
    top = faiss.downcast_index(index)
    if not isinstance(top, faiss.IndexIVF) or isinstance(top, faiss.IndexIVFFastScan):  # (SWIG wrappers: no `is`)
        for start in range(0, raw.ntotal, ADD_CHUNK):
            index.add(raw.rows(start, ADD_CHUNK))
        return index
    old_rows = previous.old_rows
    for start in range(0, raw.ntotal, ADD_CHUNK):
        chunk = np.ascontiguousarray(raw.rows(start, ADD_CHUNK))
        olds = old_rows[start : start + len(chunk)]
        assign = np.where(olds >= 0, lists[np.maximum(olds, 0)], -1)
        fresh = np.flatnonzero(assign < 0)
        if len(fresh):  # new or re-encoded rows: the coarse quantizer finds their lists
            assign[fresh] = top.quantizer.assign(chunk[fresh], 1).ravel()
        top.add_core(len(chunk), faiss.swig_ptr(chunk), None, faiss.swig_ptr(np.ascontiguousarray(assign)))
    return index


def build_ann(
    segment_dir: Path, raw: Any, plan: IndexPlan, seed: int = 0, previous: Previous | None = None
) -> tuple[str, dict[str, Any]]:
    """Build the ANN file of one segment from its raw vectors; returns its file name and the manifest params.

    The training set is a uniform sample of the stored rows (the vectors are already on disk when this runs,
    so a sample of rows is the reservoir sample without its bookkeeping); vectors are added ADD_CHUNK at a time.
    Peak memory: the training sample (at most MAX_TRAIN vectors) plus the index being built, which FAISS holds
    whole until it is written (about ``plan.estimated_bytes``). With ``previous`` (an ``--update``), the old
    structure is reused instead of trained when ``reuse_plan`` allows; recall is measured again either way.
    """
    import faiss

    started = time.perf_counter()
    assert plan.factory is not None
    reason = reuse_plan(plan, previous, raw.ntotal)
    index = None
    if reason is not None:
        assert previous is not None
        try:
            index = _reuse(faiss, raw, plan, previous)
        except Exception as exc:  # unreadable or mismatched: a fresh build is always correct
            log.warning("could not reuse the previous ANN index (%s); building it afresh", exc)
        else:
            log.info("%s: %s", plan.factory, reason)
    if index is None:
        reason = None
        try:
            index = _trained(faiss, raw, plan, seed)
            for start in range(0, raw.ntotal, ADD_CHUNK):
                index.add(raw.rows(start, ADD_CHUNK))
        except RuntimeError as exc:  # FAISS's own checks, e.g. fewer vectors than a factory's PQ centroids
            problem = _reason(exc)
            raise ValueError(f"FAISS cannot build {plan.factory!r} from {raw.ntotal} vectors ({problem})") from None
    factory = previous.params["factory"] if reason is not None and previous is not None else plan.factory
    trained_rows = int(previous.params.get("trained_rows", previous.rows)) if reason and previous else raw.ntotal
    name = f"{ANN_PREFIX}{uuid.uuid4().hex[:12]}.faiss"  # the form store.ANN_NAME collects when no manifest lists it
    _write_index(faiss, index, segment_dir / name)
    built = time.perf_counter() - started
    del index
    opened = open_ann(segment_dir / name, raw, {"rerank": plan.compressed})
    sample = sample_rows(raw.ntotal, RECALL_SAMPLE, seed + 1)
    truth = exact_truth(raw, sample)
    # A reused structure is tuned like a new one: nprobe rises until the target (at nprobe = nlist IVF-Flat is
    # exhaustive), so centroids that fit the new rows less well cost query time, not recall; the 4x rule above
    # bounds how far they drift. No retraining on a miss: on tied or duplicate vectors a fresh build misses too.
    knobs, recall = tune(opened, raw, sample, truth)
    if recall < RECALL_TARGET:
        log.warning(
            "%s reaches recall@10 %.3f at most on a sample of its own vectors (target %.2f)",
            factory,
            recall,
            RECALL_TARGET,
        )
    params = {
        "factory": factory,
        **knobs,
        "rerank": plan.compressed,
        "recall_at_10": round(recall, 4),
        "recall_sample": len(sample),
        "build_seconds": round(built, 3),
        "trained_rows": trained_rows,
        "reused": reason or False,  # why the previous structure was reused (an --update), else false
    }
    log.info("built %s in %.1f s: recall@10 %.4f with %s", factory, built, recall, knobs or "defaults")
    return name, params


# What FAISS's "write error in FILE: 9599 != 12928 (File too large)" ends with, for the errors that are the user's.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO)


def _write_index(faiss: Any, index: Any, path: Path) -> None:
    """``faiss.write_index``, leaving no half-written file behind, and a full disk as the OSError it is (FAISS
    reports it as a RuntimeError naming strerror), so that the caller's one line names the path and the fix."""
    try:
        faiss.write_index(index, str(path))
    except RuntimeError as exc:
        path.unlink(missing_ok=True)
        for code in _WRITE_ERRNOS:
            if f"({os.strerror(code)})" in str(exc):
                raise OSError(code, os.strerror(code), str(path)) from None
        raise


def _listed(target: Path, path: Path) -> bool:
    """Whether the manifest now in ``target`` lists ``path`` (True when it cannot be read: then keep the file,
    for the next run's tidy() to decide)."""
    from dsearch.manifest import read_manifest

    try:
        manifest = read_manifest(target)
    except Exception:  # noqa: BLE001 (any failure to read means: do not delete)
        return True
    return any(path == target / segment.path / name for segment in manifest.segments for name in segment.files)


def _reason(exc: Exception) -> str:
    """What a FAISS C++ error says, without its source location: "Error in f() at file.cpp:66: Error: 'x' failed:
    Number of training points (200) should be ..." gives the part after the last "failed:" or "Error:"."""
    text = " ".join(str(exc).split())
    for marker in ("failed:", "Error:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1].strip()
            break
    return text[:200] or type(exc).__name__


def _trained(faiss: Any, raw: Any, plan: IndexPlan, seed: int) -> Any:
    """A new, empty index of ``plan.factory``, trained on a sample of the raw rows."""
    import numpy as np

    index = faiss.index_factory(raw.d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    hnsw = _hnsw_of(faiss, index)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    inner = _ivf_of(faiss, index)
    if inner is not None:
        inner = faiss.downcast_index(inner)
        # FAISS prints a warning on stderr below 39 points a centroid; ivf_lists/pq_codes size for that already,
        # and a tiny corpus (fewer passages than that) is still searched correctly: keep stderr for our messages.
        inner.cp.min_points_per_centroid = 1
        if hasattr(inner, "pq"):
            inner.pq.cp.min_points_per_centroid = 1
        if hasattr(inner, "do_polysemous_training"):
            # The factory turns on polysemous training, which tripled 8-bit PQ's training time; search never uses it.
            inner.do_polysemous_training = False
    if not index.is_trained:
        ivf = _ivf_of(faiss, index)
        lists = ivf.nlist if ivf is not None else 1
        wanted = min(raw.ntotal, max(64 * lists, 256 * MIN_POINTS_PER_CENTROID), MAX_TRAIN)
        train = raw.take(sample_rows(raw.ntotal, wanted, seed))
        log.info("training %s on %d sampled vectors", plan.factory, len(train))
        index.train(np.ascontiguousarray(train))
        del train
    return index


# --- reindexing --------------------------------------------------------------------------------------


def reindex(target: Path, requested: str, memory: int | None) -> Any:
    """Rebuild every segment's ANN file from its stored vectors (no model, no encoding); swap the manifest.

    Under the index's write lock. The old ANN files are not opened (they may be the corrupt thing being
    replaced); the raw vectors are checked against their checksums first. The new files get new names, the
    manifest is replaced in one rename, and only then are the old files removed: a reader sees the old index
    or the new one, and one that opened the old files keeps them (POSIX). A run that fails before the swap
    (a full disk) removes the files it wrote; only a kill leaves them, for the next run's tidy().
    """
    try:
        return _reindex(target, requested, memory)
    except OSError as exc:  # disk full, read-only: one line naming the path and the fix
        from dsearch.indexer import disk_error

        error = disk_error(exc, target)
        if error is None:
            raise
        raise error from exc


def _reindex(target: Path, requested: str, memory: int | None) -> Any:
    from dsearch.indexer import build_segment_index
    from dsearch.manifest import FORMAT_VERSION, MANIFEST_FILE, read_manifest
    from dsearch.store import INDEX_FILE, _fsync_dir, _write_file, fault_point, file_info, index_lock, tidy

    with index_lock(target):
        tidy(target)  # what crashed runs left, the ANN file of a killed reindex among it
        manifest = read_manifest(target)
        old_files: list[Path] = []
        new_files: list[Path] = []
        index_type, params = manifest.index_type, manifest.index_params
        try:
            for segment in manifest.segments:
                seg_dir = target / segment.path
                raw_path = seg_dir / INDEX_FILE
                if not raw_path.exists() or file_info(raw_path) != segment.files.get(INDEX_FILE):
                    raise IndexDirError(
                        f"{raw_path}: the stored vectors are missing or corrupt, so the ANN index cannot be "
                        "rebuilt from them; rebuild the index with 'dsearch index'"
                    )
                for name in [n for n in segment.files if n.startswith(ANN_PREFIX)]:
                    del segment.files[name]
                    old_files.append(seg_dir / name)
                there = set(seg_dir.glob(f"{ANN_PREFIX}*"))
                try:
                    index_type, params = build_segment_index(seg_dir, segment, requested, memory)
                finally:  # what this build wrote, listed yet or not (a failure may come after the write)
                    new_files += [p for p in seg_dir.glob(f"{ANN_PREFIX}*") if p not in there and not p.is_symlink()]
            manifest.index_type, manifest.index_params = index_type, params
            manifest.format_version = FORMAT_VERSION
            fault_point("ann-written")  # a kill here leaves the new ANN files unlisted: the next tidy() takes them
            _write_file(target / MANIFEST_FILE, manifest.to_json().encode("utf-8"), atomic=True)
        except BaseException:
            # Not published: the files this run wrote are nobody's (a kill, which runs no code, leaves them).
            # Unless the manifest was swapped just before the failure (a Ctrl-C right after the rename): the
            # manifest on disk decides, and a file it lists stays.
            for path in [*new_files, target / f".{MANIFEST_FILE}.tmp"]:
                if not _listed(target, path):
                    with suppress(OSError):
                        path.unlink()
            raise
        _fsync_dir(target)
        for path in old_files:
            path.unlink(missing_ok=True)
        return manifest


def looks_like_factory(text: str) -> bool:
    """A plausible FAISS factory string (checked fully by FAISS once the dimension is known)."""
    return bool(re.fullmatch(r"[A-Za-z0-9_,.x=]+", text)) and bool(
        re.search(r"IVF|HNSW|PQ|SQ|Flat|LSH|NSG", text)
    )


def minimum_bytes(n: int) -> int:
    """The least memory any index type could search ``n`` vectors in: its 8-byte ids alone."""
    return n * 8
