"""The Python API: open an index and search it (``Searcher``), or build one (``build_index``).

The command line stands on these same calls (``dsearch query``, ``eval``, ``get``, ``info``, ``index``), so a
program gets the CLI's results, errors and guarantees without starting a process per question. Errors are the
typed ones of ``dsearch.errors``; their messages say what is wrong and name options as this API's parameters
(``max_remove=``), where the CLI prints the same error with its flags (``--max-remove``, ``errors.option``).

Heavy libraries are imported when first needed, as everywhere in dsearch: a lexical-only Searcher never loads a
model (nor torch), and ``import dsearch`` imports none of this module until a name from it is used.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from dsearch.errors import DsearchError, IndexDirError, ModelError, UsageError, spell
from dsearch.search import Hit, Query, ReadyIterator, SearchStats

if TYPE_CHECKING:
    import numpy as np

    from dsearch.corpus import Passage
    from dsearch.distributed import ChunkEncoder
    from dsearch.encoder import Encoder
    from dsearch.hybrid import Lexical
    from dsearch.indexer import BuildSummary, RemovalLimit
    from dsearch.manifest import Manifest, ModelInfo
    from dsearch.store import OpenIndex

log = logging.getLogger("dsearch")

# --where masks kept per Searcher: a server sees the same few filters again and again; each mask is a byte a row.
WHERE_CACHE = 16


class EncoderLoader(Protocol):
    """How a ``Searcher`` loads a model: by name (a ``model=`` override) or an index's own model (query side).

    The default loads real models; the CLI passes its injected one (tests use a tiny hashing encoder).
    """

    def load_encoder(self, name: str | None, **options: Any) -> Encoder: ...

    def query_encoder(self, model: ModelInfo, **options: Any) -> Encoder: ...


class _DefaultLoader:
    def load_encoder(self, name: str | None, **options: Any) -> Encoder:
        from dsearch.encoder import load_encoder

        return load_encoder(name, **options)

    def query_encoder(self, model: ModelInfo, **options: Any) -> Encoder:
        from dsearch.encoder import load_query_encoder

        return load_query_encoder(model, **options)


def check_precision(precision: str | None) -> None:
    """Refuse a precision dsearch does not know (``None`` and ``auto`` are always fine)."""
    from dsearch.encoder import PRECISIONS

    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def check_batch_size(batch_size: int) -> None:
    """Refuse a batch size that is not a whole number of at least 1."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a whole number of at least 1, not {batch_size!r}")


def manifest_version(manifest: Manifest) -> str:
    """A short stamp of one published version of an index: it changes with every publish (new segments,
    checksums and creation time), and is the same for every reader of the same version."""
    return hashlib.sha256(manifest.to_json().encode("utf-8")).hexdigest()[:16]


def index_version(directory: str | os.PathLike[str]) -> str:
    """The version stamp of the index published at ``directory`` now (cheap: reads the manifest only).

    Compare it with ``Searcher.version`` to tell that a new version was published since the Searcher opened.
    """
    from dsearch.manifest import read_manifest

    return manifest_version(read_manifest(Path(directory)))


class Searcher:
    """An opened index, ready to answer queries: what ``dsearch query`` does, without a process per question.

    ``Searcher(DIR)`` opens the published index at DIR and keeps it open (the files of that version stay
    readable even when a new version is published; open a new Searcher for it). The model is the one that built
    the index, loaded on the first dense or hybrid search (``load_encoder=True``: now; ``False``: never, for
    lexical-only use). ``model=``/``precision=`` override the index's model and precision for queries; a model
    whose vectors have another dimension is refused (``ModelError``), another fingerprint or similarity only
    warned about. ``encoder=`` reuses an encoder already loaded (checked the same way). ``loader=`` decides how
    models are loaded (the CLI passes its own). ``verify=True`` also checks every file's checksum on opening.
    ``load_lexical=True`` opens the BM25 index now rather than at the first lexical or hybrid search (a server
    does, so that the version it opened stays searchable after a newer publish has removed its files).
    ``in_memory=True`` reads a flat index's vectors into memory now (their size on disk): a long-lived Searcher
    then scans them in place, several times faster a query than from the mapped file.

    Thread-safe: any number of threads may call ``search``, ``iter_search``, ``like``, ``get`` and the others on one
    Searcher at once, in any mode, and each gets exactly the answer it would get alone (tested). The model loads
    once, BM25 opens once, ``where`` masks are shared, and ANN knobs stay per call. The parts that are not safe to
    share take turns under a lock: the BM25 stemmer (microseconds a query), the Parquet reads of the hits'
    passages (pyarrow's reader crashed when shared), and a search on a FAISS index that wraps its IVF in something
    other than a transform or a refine stage (OPQ, PCA, RFlat take nprobe per call; in others it is a setting).
    Encoding (ONNX Runtime) and the vector search itself (numpy, FAISS) run in parallel, outside any lock.
    ``close()`` only once the other threads are done with the Searcher.
    """

    directory: Path
    version: str
    rows: int
    passages: int

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        model: str | None = None,
        precision: str | None = None,
        trust_remote_code: bool = False,
        batch_size: int = 32,
        encoder: Encoder | None = None,
        load_encoder: bool | None = None,
        loader: EncoderLoader | None = None,
        verify: bool = False,
        load_lexical: bool = False,
        in_memory: bool = False,
    ) -> None:
        from dsearch.store import OpenIndex

        self.directory = Path(directory)
        check_precision(precision)
        check_batch_size(batch_size)
        started = time.perf_counter()
        self._index: OpenIndex | None = OpenIndex(self.directory, verify=verify)
        log.info("load index: %s, %d passages (%.3f s)", directory, self._index.rows, time.perf_counter() - started)
        manifest = self._index.manifest
        self.version = manifest_version(manifest)
        self.rows = self._index.rows
        self.passages = manifest.passages
        self._model = model
        self._precision = precision
        self._options = {"precision": precision, "trust_remote_code": trust_remote_code, "batch_size": batch_size}
        self._loader: EncoderLoader = loader if loader is not None else _DefaultLoader()
        self._may_load = load_encoder is not False
        self._encoder: Encoder | None = None
        # One model load, one BM25 open, however many threads ask at once; each has its own lock, so that a model
        # loading (seconds) holds up neither a lexical search nor a where mask (nor the masks' cache, self._lock).
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._lexical_lock = threading.Lock()
        self._lexical: Lexical | None = None
        self._masks: OrderedDict[str, Any] = OrderedDict()
        if encoder is not None:
            self._encoder = self._checked(encoder)
        elif load_encoder:
            _ = self.encoder
        if in_memory:
            for segment in self._index.segments:
                if segment.ann is None:  # an ANN index is FAISS's to hold
                    segment.vectors.load()
        if load_lexical:
            from dsearch.lexical import has_lexical

            if has_lexical(self._index):
                self._lexical_side()

    # --- the model ---------------------------------------------------------------------------------------

    @property
    def encoder(self) -> Encoder:
        """The query encoder, loaded on first use (``ModelError`` when it does not fit the index)."""
        if self._encoder is None:
            with self._model_lock:
                if self._encoder is None:
                    if not self._may_load:
                        raise UsageError(
                            f"{self.directory}: this Searcher was opened with load_encoder=False; dense and hybrid "
                            "search need the model (search in lexical mode, or open it without load_encoder=False)"
                        )
                    self._encoder = self._checked(self._load())
        return self._encoder

    @property
    def encoder_loaded(self) -> bool:
        """Whether the model is loaded (a lexical-only user never loads one)."""
        return self._encoder is not None

    def _load(self) -> Encoder:
        info = self._open().manifest.model
        started = time.perf_counter()
        if self._model:
            encoder = self._loader.load_encoder(
                self._model, **{**self._options, "precision": self._precision or info.precision}
            )
        else:
            encoder = self._loader.query_encoder(info, **self._options)
        log.info(
            "load model: %s, precision %s (%.3f s)",
            encoder.name,
            getattr(encoder, "precision", self._precision or info.precision),
            time.perf_counter() - started,
        )
        return encoder

    def _checked(self, encoder: Encoder) -> Encoder:
        """The encoder, if its vectors fit the index; a different model or similarity is only warned about."""
        info = self._open().manifest.model
        if encoder.dim != info.dim:
            raise ModelError(
                f"model {encoder.name!r} makes {encoder.dim}-d vectors but the index holds {info.dim}-d ones "
                f"(built with {info.name!r}); query with that model or rebuild the index"
            )
        if encoder.fingerprint != info.fingerprint:
            log.warning(
                "model %s differs from the one that built the index (fingerprint %s, index has %s); "
                "scores may be meaningless",
                encoder.name,
                encoder.fingerprint[:12],
                info.fingerprint[:12],
            )
        if encoder.similarity != info.similarity:
            log.warning("model similarity %s differs from the index's %s", encoder.similarity, info.similarity)
        return encoder

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Query vectors, one row per text, for ``search(..., vectors=)``; a text's vector does not depend on the
        other texts of the call (the encoders are batch-independent), so a caller may batch freely."""
        from dsearch.search import check_query_vectors

        if isinstance(texts, str):  # one text, as search() takes it (a str is also a sequence of letters)
            texts = [texts]
        texts = [_query_text(t, i) for i, t in enumerate(texts)]
        vectors = self.encoder.encode_queries(texts)
        check_query_vectors(vectors, [Query(str(i + 1), t) for i, t in enumerate(texts)])
        return vectors

    # --- describing --------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What ``dsearch info --json`` prints: model, dimension, similarity, passages, size, index type…"""
        from dsearch.lexical import has_lexical

        index = self._open()
        m = index.manifest
        return {
            "path": str(index.directory),
            "model": m.model.name,
            "model_fingerprint": m.model.fingerprint,
            "dim": m.model.dim,
            "similarity": m.model.similarity,
            "normalized": m.model.similarity == "cosine",
            "max_seq_length": m.model.max_seq_length,
            "precision": m.model.precision,
            "prompts": m.model.prompts,
            "passages": m.passages,
            "rows": m.rows,
            "split": m.corpus.get("split"),
            "lexical": has_lexical(index),
            "fields": m.corpus.get("field_types") or {},
            "index_type": m.index_type,
            "index_params": m.index_params,
            "recall_at_10": m.index_params.get("recall_at_10", 1.0 if m.index_type == "IndexFlatIP" else None),
            "segments": len(m.segments),
            "size_bytes": index.size_on_disk(),
            "created_at": m.created_at,
            "format": m.format,
            "format_version": m.format_version,
            "versions": m.versions,
            "stats": m.stats,
        }

    def iter_ids(self) -> Iterator[str]:
        """Every passage id in the index, in row order (a split passage's id once per window)."""
        for record in self._open().iter_rows(("id",)):
            yield record["id"]

    # --- searching ---------------------------------------------------------------------------------------

    def resolve_mode(self, mode: str | None = None, alpha: float | None = None) -> str:
        """The mode a search with these options runs in: ``mode``; else hybrid when ``alpha`` weighs its two sides;
        else dense. Refuses an unknown mode, a bad ``alpha``, and lexical/hybrid on an index without BM25."""
        from dsearch.hybrid import DEFAULT_MODE, MODES, Lexical
        from dsearch.lexical import has_lexical

        if mode is not None and mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if alpha is not None:
            if isinstance(alpha, bool) or not isinstance(alpha, int | float):
                raise UsageError(f"alpha must be a number between 0 and 1, not {alpha!r}")
            if not 0 <= alpha <= 1:
                raise UsageError(f"alpha {alpha} is not a weight between 0 and 1")
            if mode in ("dense", "lexical"):
                raise UsageError(f"alpha weighs the two retrievers of hybrid mode; it does not go with mode {mode}")
        resolved = mode if mode is not None else DEFAULT_MODE if alpha is None else "hybrid"
        if resolved != "dense" and not has_lexical(self._open()):
            Lexical(self._open())  # raises the error that says what to do
        return resolved

    def search(
        self,
        queries: str | Sequence[str] | Sequence[Query],
        k: int = 10,
        *,
        mode: str | None = None,
        alpha: float | None = None,
        where: str | None = None,
        min_score: float | None = None,
        nprobe: int | None = None,
        ef: int | None = None,
        effort: float | None = None,
        vectors: np.ndarray | None = None,
        exclude_self: bool = False,
    ) -> list[list[Hit]]:
        """The ``k`` best passages for each query, best first: one list per query, in the order given.

        ``queries``: a text (one query), texts (numbered ``1``, ``2``… as ``qid``), or ``Query`` objects.
        ``mode``: ``dense`` (default), ``lexical`` (BM25) or ``hybrid`` (both fused: reciprocal ranks, or with
        ``alpha`` a weighted sum). ``where``: an SQL condition on the passages' fields, id, title and source,
        applied before the top-k. ``min_score`` drops weaker hits (a query may get fewer than ``k``).
        ``nprobe``/``ef``/``effort``: an ANN index's search knobs for this call. ``vectors``: the queries'
        dense vectors already encoded (row i for query i, as ``encode_queries`` makes them), so the model is not
        run again. ``exclude_self`` drops a hit whose id is its query's id (BEIR's convention).
        A query's hits never depend on the other queries of the call.
        """
        batch = _as_queries(queries)
        if vectors is not None:
            vectors = self._check_vectors(vectors, len(batch))
        options = {"mode": mode, "alpha": alpha, "where": where, "min_score": min_score, "nprobe": nprobe, "ef": ef}
        results = self._run(batch, k, **options, effort=effort, vectors=vectors, exclude_self=exclude_self)
        return [hits for _, hits in results]

    def iter_search(
        self,
        queries: Iterable[Query | str],
        k: int = 10,
        *,
        mode: str | None = None,
        alpha: float | None = None,
        where: str | None = None,
        min_score: float | None = None,
        nprobe: int | None = None,
        ef: int | None = None,
        effort: float | None = None,
        exclude_self: bool = False,
        stats: SearchStats | None = None,
    ) -> Iterator[tuple[Query, list[Hit]]]:
        """Like ``search``, lazily: each query with its hits as soon as its batch is answered, reading ``queries``
        only as far as needed (a stdin pipeline gets each answer as its query arrives). Options are checked
        before the first query is read. ``stats`` (``search.SearchStats``) adds up where the time went."""
        numbered: Iterator[Query] = (_as_query(q, i) for i, q in enumerate(queries))
        ready = getattr(queries, "ready", None)
        if ready is not None:  # a stream that says what it has ready: batches take only that (search.PipeLines)
            numbered = ReadyIterator(numbered, ready)
        return self._run(
            numbered, k, mode=mode, alpha=alpha, where=where, min_score=min_score, nprobe=nprobe, ef=ef,
            effort=effort, exclude_self=exclude_self, stats=stats,
        )  # fmt: skip

    def _run(
        self,
        queries: Iterable[Query],
        k: int,
        *,
        mode: str | None,
        alpha: float | None,
        where: str | None,
        min_score: float | None,
        nprobe: int | None,
        ef: int | None,
        effort: float | None,
        vectors: Any = None,
        exclude_self: bool = False,
        stats: SearchStats | None = None,
    ) -> Iterator[tuple[Query, list[Hit]]]:
        """Check every option, settle the mode, filter and model, then hand back the lazy search."""
        from dsearch.hybrid import run

        _check_k(k)
        _check_min_score(min_score)
        mode = self.resolve_mode(mode, alpha)
        index = self._tuned(nprobe, ef, effort)
        allowed = self.allowed_rows(where)
        encoder: Any = None
        if mode != "lexical":
            encoder = _GivenVectors(vectors) if vectors is not None else self.encoder
        lex = self._lexical_side() if mode != "dense" else None
        return run(index, encoder, queries, k, mode, alpha, exclude_self, min_score, stats, allowed, lex)

    def like(
        self,
        passage_id: str,
        k: int = 10,
        *,
        where: str | None = None,
        min_score: float | None = None,
        stats: SearchStats | None = None,
    ) -> list[Hit]:
        """More like this: the passages most similar to a stored passage (by its stored vector, no model),
        itself left out. An id not in the index is an ``InputError``."""
        from dsearch.search import like_search

        if not isinstance(passage_id, str):
            raise UsageError(f"the passage id must be a text, not {type(passage_id).__name__}")
        _check_k(k)
        _check_min_score(min_score)
        index = self._open()
        allowed = self.allowed_rows(where)
        return [hits for _, hits in like_search(index, passage_id, k, min_score, stats, allowed)][0]

    def get(self, ids: Sequence[str]) -> tuple[list[Hit], list[str]]:
        """Stored passages by id, in the order asked (``rank`` 0, ``score`` 0), and the ids not in the index."""
        from dsearch.search import get_passages

        if isinstance(ids, str):
            ids = [ids]
        return get_passages(self._open(), list(ids))

    def allowed_rows(self, where: str | None) -> Any:
        """The boolean row mask of a ``where`` condition (None: no filter); masks are kept for reuse."""
        if where is None:
            return None
        if not isinstance(where, str):
            raise UsageError(f"where must be a text (an SQL condition), not {type(where).__name__}")
        with self._lock:
            mask = self._masks.get(where)
            if mask is not None:
                self._masks.move_to_end(where)
                return mask
        from dsearch.filters import allowed_rows

        index = self._open()
        started = time.perf_counter()
        try:
            mask = allowed_rows(index, where)
        except IndexDirError as exc:
            raise self._replaced(exc) from exc
        mask.flags.writeable = False  # shared between searches
        kept = int(mask.sum())
        log.info("--where kept %d of %d rows (%.3f s)", kept, index.rows, time.perf_counter() - started)
        if not kept:
            log.info("--where matched no passage: no hits")
        with self._lock:
            self._masks[where] = mask
            while len(self._masks) > WHERE_CACHE:
                self._masks.popitem(last=False)
        return mask

    def _tuned(self, nprobe: int | None, ef: int | None, effort: float | None) -> OpenIndex:
        """The index with this call's ANN knobs: a shallow copy, so concurrent searches keep their own."""
        index = self._open()
        for name, value in (("nprobe", nprobe), ("ef", ef)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{name} must be a whole number of at least 1, not {value!r}")
        if effort is not None and not (isinstance(effort, int | float) and math.isfinite(effort) and effort > 0):
            raise UsageError(f"effort must be a positive number, not {effort!r}")
        if nprobe is None and ef is None and effort is None:
            return index
        tuned = copy.copy(index)
        tuned.search_params = {"nprobe": nprobe, "efSearch": ef, "effort": effort}
        return tuned

    def _lexical_side(self) -> Lexical:
        if self._lexical is None:
            from dsearch.hybrid import Lexical

            with self._lexical_lock:
                if self._lexical is None:
                    try:
                        self._lexical = Lexical(self._open())
                    except IndexDirError as exc:
                        raise self._replaced(exc) from exc
        return self._lexical

    def _replaced(self, exc: IndexDirError) -> IndexDirError:
        """``exc`` (files that could not be read), or, when a newer publish has removed this version's files,
        the error that says so: the index is fine, this Searcher is out of date."""
        try:
            now = index_version(self.directory)
        except DsearchError:
            return exc
        if now == self.version:
            return exc
        again = spell("run the command again", "open a new Searcher (load_lexical=True keeps BM25 open from the start)")
        return IndexDirError(
            f"{self.directory}: version {now} was published after version {self.version} opened here, and removed "
            f"files this search needs; {again}"
        )

    def _check_vectors(self, vectors: Any, count: int) -> Any:
        import numpy as np

        try:
            array = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"vectors must be an array of numbers ({exc})") from None
        dim = self._open().manifest.model.dim
        if array.shape != (count, dim):
            raise UsageError(f"vectors has shape {array.shape}; {count} queries of this index need ({count}, {dim})")
        return np.ascontiguousarray(array)

    # --- life cycle --------------------------------------------------------------------------------------

    def _open(self) -> OpenIndex:
        if self._index is None:
            raise DsearchError(f"{self.directory}: this Searcher is closed; open a new one")
        return self._index

    def close(self) -> None:
        """Let go of the index's files (the model stays with whoever else holds it). Searching after is an error."""
        index, self._index = self._index, None
        self._lexical = None
        self._masks.clear()
        if index is not None:
            for segment in index.segments:
                closer: Callable[[], None] | None = getattr(segment.table, "close", None)
                if closer is not None:
                    closer()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._index is None else f"{self.passages} passages"
        return f"Searcher({str(self.directory)!r}, version {self.version}, {state})"


class _GivenVectors:
    """Stands in for the encoder when the caller encoded the queries: hands out their rows in order."""

    def __init__(self, vectors: Any) -> None:
        self.vectors = vectors
        self.next = 0

    def encode_queries(self, texts: list[str]) -> Any:
        rows = self.vectors[self.next : self.next + len(texts)]
        self.next += len(texts)
        return rows


def _query_text(text: Any, position: int) -> str:
    if not isinstance(text, str):
        raise UsageError(f"query {position + 1} is a {type(text).__name__}, not a text")
    if not text.strip():
        raise UsageError(f"query {position + 1} is empty; give every query some text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"query {position + 1} is not valid Unicode text (a lone surrogate)") from None
    return text.strip()


def _as_queries(queries: str | Sequence[str] | Sequence[Query]) -> list[Query]:
    """A text, texts or Query objects → Query objects; texts are numbered 1, 2… by position."""
    if isinstance(queries, str | Query):
        queries = [queries]  # type: ignore[list-item]
    return [_as_query(q, i) for i, q in enumerate(queries)]


def _as_query(query: Query | str, position: int) -> Query:
    """A text as the Query numbered by its position; a Query checked as texts are (its text kept as given)."""
    if not isinstance(query, Query):
        return Query(str(position + 1), _query_text(query, position))
    if not isinstance(query.qid, str):
        raise UsageError(f"query {position + 1}'s qid is a {type(query.qid).__name__}, not a text")
    _query_text(query.text, position)
    return query


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"k must be a whole number of at least 1, not {k!r}")


def _check_min_score(min_score: float | None) -> None:
    if min_score is not None and not (isinstance(min_score, int | float) and math.isfinite(min_score)):
        raise UsageError(f"min_score {min_score!r} is not a finite number")


# --- building ----------------------------------------------------------------------------------------------


def build_index(
    directory: str | os.PathLike[str],
    passages: Iterable[Mapping[str, Any] | Passage] | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    model: str | None = None,
    update: bool = False,
    precision: str | None = None,
    batch_size: int = 32,
    trust_remote_code: bool = False,
    fmt: str | None = None,
    id_field: str | None = None,
    text_field: str | None = None,
    title_field: str | None = None,
    skip_bad: bool = False,
    split: bool | None = None,
    overlap: int | None = None,
    lexical: bool | None = None,
    index_type: str | None = None,
    memory: int | None = None,
    max_remove: int | str | RemovalLimit | None = None,
    restart: bool = False,
    encoder: Encoder | None = None,
    loader: EncoderLoader | None = None,
    progress: Callable[[int], None] | None = None,
    on_resume: Callable[[int], None] | None = None,
    stdin: IO[bytes] | None = None,
    chunk_encoder: ChunkEncoder | None = None,
) -> BuildSummary:
    """Encode passages and publish them as the index at ``directory``: what ``dsearch index`` does, with the
    same locking, checkpoints, atomic publish, removal limit and summary.

    ``passages``: an iterable of mappings (``{"id": …, "text": …, "title": …, other fields…}``, read as a JSON
    Lines record is: ``_id``/``id``/``docid``… for the id, ``text``/``contents``… for the text, or the fields
    named by ``id_field``/``text_field``/``title_field``) or of ``Passage`` objects; or a corpus path (or a list
    of them; ``-`` is ``stdin``), read as the CLI reads it (``fmt`` overrides the format). A bad passage raises
    ``InputError`` naming it (``passages[N]``), unless ``skip_bad`` counts it instead.
    ``update=True`` encodes only new and changed passages and drops those gone (a generator is kept in a
    temporary file for the second pass). ``model``/``precision`` choose the model (default: the bundled model,
    or on update the index's own); ``encoder`` uses one already loaded. ``split``: cut long passages into
    windows (default; ``False`` truncates; ``None`` keeps an updated index's choice) with ``overlap`` tokens.
    ``lexical``: also build the BM25 index (default yes; on update the index's choice). ``index_type``/``memory``
    (bytes): the ANN structure. ``max_remove``: how many existing passages a run may drop (a number, ``"P%"``;
    default half), else ``TooManyRemovedError``. ``progress(n)`` hears of each chunk of passages written.
    """
    from dsearch.corpus import FieldNames, Records
    from dsearch.encoder import canonical_model_name
    from dsearch.indexer import RemovalLimit, SplitSpec
    from dsearch.indexer import build_index as build

    target = Path(directory)
    check_precision(precision)
    check_batch_size(batch_size)  # 0 encoded nothing and published an empty index
    if index_type is not None:
        from dsearch.vector_index import INDEX_TYPES, looks_like_factory

        if index_type.lower() not in INDEX_TYPES and not looks_like_factory(index_type):
            raise UsageError(
                f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)} or a FAISS factory "
                "string such as IVF4096,PQ64"
            )
    if split is False and overlap is not None:
        raise UsageError("overlap sets how split passages are cut; it cannot go with split=False")
    limit = max_remove if isinstance(max_remove, RemovalLimit) else RemovalLimit.parse(
        None if max_remove is None else str(max_remove)
    )
    if isinstance(passages, str | os.PathLike):
        paths: list[Any] = [os.fspath(passages)]
    elif isinstance(passages, list | tuple) and passages and all(isinstance(p, str | os.PathLike) for p in passages):
        paths = [os.fspath(p) for p in passages]
    else:
        paths = [Records(passages, spool=update)]
    source: Any = encoder if encoder is not None else model_loader(target, model, precision, update, {
        "trust_remote_code": trust_remote_code, "batch_size": batch_size}, loader)  # fmt: skip
    try:
        return build(
            paths,
            target,
            source,
            fmt=fmt,
            names=FieldNames(id_field, text_field, title_field),
            skip_bad=skip_bad,
            batch_size=batch_size,
            progress=progress,
            stdin=stdin,
            update=update,
            restart=restart,
            # What the user asked for, to check an index being updated against (None: whatever built it).
            model_name=canonical_model_name(model) if model is not None else None,
            precision=precision,
            split=None if split is False else SplitSpec() if overlap is None else SplitSpec(overlap),
            keep_split=split is None and overlap is None,
            max_remove=limit,
            on_resume=on_resume,
            chunk_encoder=chunk_encoder,
            lexical=lexical,
            index_type=index_type,
            memory=memory,
        )
    finally:
        for path in paths:
            if isinstance(path, Records):
                path.close()


def model_loader(
    directory: Path,
    model: str | None,
    precision: str | None,
    update: bool,
    options: dict[str, Any],
    loader: EncoderLoader | None = None,
) -> Callable[[], Encoder]:
    """How a build loads its model, when (if ever) it needs it: ``model`` at ``precision``; on an update without
    a model, the index's own model (read from its manifest) at its precision."""

    def load() -> Encoder:
        from dsearch.manifest import MANIFEST_FILE, read_manifest

        name, chosen = model, precision or "auto"
        if update and name is None and (directory / MANIFEST_FILE).exists():
            info = read_manifest(directory).model
            name, chosen = info.name, precision or info.precision
        return (loader or _DefaultLoader()).load_encoder(name, precision=chosen, **options)

    return load
