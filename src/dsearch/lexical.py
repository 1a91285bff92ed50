"""The lexical (BM25) index of a segment: built with bm25s at segment close, searched with numpy alone.

One BM25 document per *passage*, not per window: BM25 has no length limit, so a split passage is scored on its
whole text (title + text, BEIR's convention, as the dense side encodes it), which is also how bm25s's published
SciFact figure was made. ``bm25-rows.npy`` maps each BM25 document to the passage's first row, so a lexical hit
is a row like a dense hit and the passages' grouping (a passage = its contiguous rows) is shared by both.

Files, all in the segment directory and listed with checksums in the manifest like the others:

    bm25-data.npy, bm25-indices.npy, bm25-indptr.npy   bm25s's precomputed scores, a CSC matrix (token → docs)
    bm25-rows.npy                                       BM25 document → first row of its passage (int64)
    bm25.json                                           vocabulary, BM25 parameters, and how text was tokenized

Why bm25s (with PyStemmer's English Snowball stemmer and bm25s's English stopwords): it precomputes every
token's BM25 score per document at index time, so a query is a few array slices and one ``bincount`` — no
scipy, no bm25s import on the query path (importing bm25s costs about 0.3 s, half a cold query's budget);
and it matches MTEB's BM25 baseline. The query side tokenizes exactly as the build did from ``bm25.json``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from dsearch.errors import IndexDirError

LEXICAL_META = "bm25.json"
LEXICAL_ARRAYS = ("bm25-data.npy", "bm25-indices.npy", "bm25-indptr.npy", "bm25-rows.npy")
LEXICAL_FILES = (LEXICAL_META, *LEXICAL_ARRAYS)
# scikit-learn's CountVectorizer pattern, bm25s's default: words of two or more word characters.
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
STEMMER_LANGUAGE = "english"
# Passages read from Parquet at once while building.
READ_BATCH = 2000
# (passage, token) pairs scored at once in the build's second pass: about 100 bytes each while they are read,
# sorted and scored (50 MiB); each range re-reads the temporary file of triples (12 bytes a pair).
RANGE_PAIRS = 1 << 19
# The build's temporary folder in the segment: "bm25-" + tempfile's 8 random characters.
TEMP_PREFIX = "bm25-"
_TEMP_NAME = re.compile(r"bm25-[a-z0-9_]{8}")


class Tokenizer:
    """Lower-case, split on TOKEN_PATTERN, drop stopwords, stem: bm25s.tokenize's steps, shared by build and query."""

    def __init__(self, stopwords: Iterable[str], pattern: str = TOKEN_PATTERN, language: str = STEMMER_LANGUAGE):
        import Stemmer

        self.stopwords = frozenset(stopwords)
        self.pattern = pattern
        self.language = language
        self._split = re.compile(pattern).findall
        self._stem = lru_cache(maxsize=1 << 18)(Stemmer.Stemmer(language).stemWord)
        # PyStemmer: "The algorithm has internal state, so must not be called concurrently". A query's words take
        # microseconds to stem, so threads sharing a Searcher simply take turns.
        self._lock = threading.Lock()

    def __call__(self, text: str) -> list[str]:
        words = [t for t in self._split(text.lower()) if t not in self.stopwords]
        with self._lock:
            return [self._stem(t) for t in words]


def has_lexical(index: Any) -> bool:
    """True when every segment of an open index carries a BM25 index (not built with --no-lexical, nor before
    it existed)."""
    return bool(index.segments) and all(LEXICAL_META in seg.segment.files for seg in index.segments)


def document_text(title: str | None, text: str) -> str:
    return f"{title} {text}" if title else text


def build_lexical(
    segment_dir: Path, passages_file: str, read_batch: int = READ_BATCH, range_pairs: int = RANGE_PAIRS
) -> list[str]:
    """Write the BM25 files of a segment from its ``passages.parquet``; returns their names.

    The arrays are bm25s's (``bm25s.BM25().index``: Lucene's BM25, k1 1.5, b 0.75, float32 scores in a CSC
    matrix), byte for byte, but built in bounded memory: bm25s wants every passage's token ids as Python lists
    (about 36 bytes a token, plus its own copies), which grew with the corpus. Here the first pass reads
    ``read_batch`` rows at a time, tokenizes, and appends each passage's (passage, token, count) triples to a
    temporary file while counting document frequencies; the second pass scores the triples of ``range_pairs``
    (passage, token) pairs' worth of tokens at a time, with bm25s's arithmetic, and appends them to the output
    files in bm25s's (token, passage) order. What stays in memory is the vocabulary, a few numbers per token and
    per passage, and one batch or range.
    """
    import bm25s
    import numpy as np
    import pyarrow.parquet as pq
    from bm25s.stopwords import STOPWORDS_EN

    # bm25s sets its logger to DEBUG on import; its "Building index…" lines would reach stderr wherever another
    # library configured the root logger.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    retriever = bm25s.BM25()  # its parameters (Lucene's BM25, k1 = 1.5, b = 0.75); its index() is not used
    tokenizer = Tokenizer(STOPWORDS_EN)
    vocab: dict[str, int] = {}
    lengths: list[Any] = []  # per batch: each passage's number of tokens (int64, as bm25s's mean needs)
    first_rows: list[Any] = []  # per batch: each passage's first row
    batches: list[int] = []  # triples written per batch
    frequencies = np.zeros(0, np.int64)  # passages holding each token
    documents = row = 0
    previous = None
    # A build killed here (SIGKILL, OOM) after a checkpoint leaves its folder of triples in the staged segment,
    # which the resumed run would publish with it: remove such leftovers, by their exact form, first.
    for leftover in segment_dir.glob(f"{TEMP_PREFIX}*"):
        if _TEMP_NAME.fullmatch(leftover.name) and leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX, dir=segment_dir) as tmp, _system_memory_pool():
        triples_path = Path(tmp) / "triples.bin"
        with open(triples_path, "wb") as triples:
            table = pq.ParquetFile(segment_dir / passages_file, pre_buffer=False)
            for batch in table.iter_batches(batch_size=read_batch, columns=["id", "title", "text"]):
                ids, titles, texts = (batch.column(n).to_pylist() for n in ("id", "title", "text"))
                tokens: list[int] = []
                counts: list[int] = []
                starts: list[int] = []
                for passage_id, title, text in zip(ids, titles, texts, strict=True):
                    if passage_id != previous:  # a split passage's further windows repeat its id and whole text
                        words = tokenizer(document_text(title, text))
                        tokens.extend(vocab.setdefault(t, len(vocab)) for t in words)
                        counts.append(len(words))
                        starts.append(row)
                        previous = passage_id
                    row += 1
                if not counts:
                    continue
                per_doc = np.asarray(counts, np.int64)
                docs = np.repeat(np.arange(documents, documents + len(counts), dtype=np.int64), per_doc)
                # One key per (passage, token) occurrence; unique keys are the pairs, sorted by passage then token.
                pairs, tf = np.unique((docs << 32) | np.asarray(tokens, np.int64), return_counts=True)
                token_ids = pairs & 0xFFFFFFFF
                frequencies = np.pad(frequencies, (0, len(vocab) - len(frequencies)))
                frequencies += np.bincount(token_ids, minlength=len(vocab))
                for column in (pairs >> 32, token_ids, tf):
                    # Not tofile: it reports a full disk as "N requested and M written", without the errno.
                    triples.write(column.astype(np.int32).tobytes())
                batches.append(len(pairs))
                lengths.append(per_doc)
                first_rows.append(np.asarray(starts, np.int64))
                documents += len(counts)
        if documents:
            # bm25s wants one known token at least; an empty corpus (or one of stopwords only) gets a stand-in.
            vocab.setdefault("", len(vocab))
        frequencies = np.pad(frequencies, (0, len(vocab) - len(frequencies)))
        indptr = np.zeros(len(vocab) + 1, np.int64)
        np.cumsum(frequencies, out=indptr[1:])
        with _npy_writer(segment_dir / "bm25-data.npy", np.float32, int(indptr[-1])) as data, _npy_writer(
            segment_dir / "bm25-indices.npy", np.int32, int(indptr[-1])
        ) as indices:
            if documents:
                passage_lengths = np.concatenate(lengths)
                _score(
                    triples_path, batches, frequencies, indptr, passage_lengths, retriever.k1, retriever.b,
                    range_pairs, data, indices,
                )  # fmt: skip
    _save(segment_dir / "bm25-indptr.npy", indptr)
    _save(segment_dir / "bm25-rows.npy", np.concatenate(first_rows) if first_rows else np.zeros(0, np.int64))
    meta = {
        "library": f"bm25s {bm25s.__version__}",
        "method": retriever.method,
        "k1": retriever.k1,
        "b": retriever.b,
        "documents": documents,
        "rows": row,
        "tokenizer": {"pattern": TOKEN_PATTERN, "stemmer": STEMMER_LANGUAGE, "stopwords": sorted(STOPWORDS_EN)},
        "vocab": vocab,
    }
    (segment_dir / LEXICAL_META).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    return list(LEXICAL_FILES)


def _score(
    triples_path: Path,
    batches: list[int],
    frequencies: Any,
    indptr: Any,
    passage_lengths: Any,
    k1: float,
    b: float,
    range_pairs: int,
    data: Any,
    indices: Any,
) -> None:
    """The second pass: BM25 scores of every (passage, token) pair, a range of tokens at a time, in CSC order.

    The arithmetic is bm25s's (``scoring._score_idf_lucene``, ``_score_tfc_lucene`` and its float32/float64
    mix), so the scores come out bit for bit the same: idf in Python floats stored as float32, the length
    normalisation in float64, the product cast to float32."""
    import numpy as np

    n_docs = len(passage_lengths)
    avg_len = passage_lengths.mean()  # numpy's float64 mean of the int64 lengths, as bm25s computes it
    idf = np.zeros(len(frequencies), np.float32)
    for token in np.flatnonzero(frequencies):
        df = int(frequencies[token])
        idf[token] = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
    offsets = np.concatenate([[0], np.cumsum(batches)]) * 12  # bytes: a batch is 3 int32 columns of its pairs
    first = 0
    while first < len(frequencies):
        # The tokens whose pairs fit in range_pairs (at least one token, however many passages hold it).
        last = max(first + 1, int(np.searchsorted(indptr, indptr[first] + range_pairs, side="right")) - 1)
        last = min(last, len(frequencies))
        parts: list[tuple[Any, Any, Any]] = []
        for number, count in enumerate(batches):
            block = np.fromfile(triples_path, np.int32, count=3 * count, offset=int(offsets[number]))
            block = block.reshape(3, count)
            keep = (block[1] >= first) & (block[1] < last)
            parts.append((block[0][keep], block[1][keep], block[2][keep]))
        docs, tokens, tf = (np.concatenate([p[i] for p in parts]) for i in range(3))
        # Passages ascend within a token (batches are in passage order); a stable sort by token keeps that.
        order = np.argsort(tokens, kind="stable")
        docs, tokens, tf = docs[order], tokens[order], tf[order].astype(np.float32)
        norm = k1 * ((1 - b) + b * passage_lengths[docs] / avg_len)
        scores = (idf[tokens] * (tf / (norm + tf))).astype(np.float32)
        data.write(scores.tobytes())
        indices.write(docs.astype(np.int32).tobytes())
        first = last


@contextmanager
def _system_memory_pool() -> Iterator[None]:
    """Arrow allocates from the C library's allocator meanwhile, not its default mimalloc pool.

    Reading a 500k-passage file a batch at a time grew the process by 116 MiB under mimalloc, which keeps the
    pages of freed batches, and by 17 MiB with the system allocator and no pre-buffering (100k: 65 and 12 MiB):
    the read is then bounded by the batch, as the rest of the build is."""
    import pyarrow as pa

    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def _save(path: Path, array: Any) -> None:
    """``np.save`` of a 1-D array, through a Python file object: a full disk is then the OSError with its errno
    (np.save writes with tofile, which loses it), so the build's one line names it and the fix."""
    with _npy_writer(path, array.dtype, len(array)) as fh:
        fh.write(array.tobytes())


@contextmanager
def _npy_writer(path: Path, dtype: Any, length: int) -> Iterator[Any]:
    """A file object positioned after the header of a 1-D ``.npy`` of ``length`` items (what ``np.save`` writes),
    to append the items to in order."""
    import numpy as np

    with open(path, "wb") as fh:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)}
        np.lib.format.write_array_header_1_0(fh, header)
        expected = fh.tell() + length * np.dtype(dtype).itemsize
        yield fh
        if fh.tell() != expected:
            raise RuntimeError(f"{path}: wrote {fh.tell()} bytes, expected {expected}")


class LexicalSegment:
    """One segment's BM25 index, memory-mapped; scores are per passage (BM25 document)."""

    def __init__(self, segment_dir: Path) -> None:
        import numpy as np

        try:
            meta = json.loads((segment_dir / LEXICAL_META).read_text(encoding="utf-8"))
            self.data, self.indices, self.indptr, self.first_rows = (
                np.load(segment_dir / name, mmap_mode="r") for name in LEXICAL_ARRAYS
            )
            spec = meta["tokenizer"]
            self.vocab: dict[str, int] = meta["vocab"]
            self.documents = int(meta["documents"])
        except (OSError, ValueError, KeyError) as exc:
            raise IndexDirError(f"{segment_dir}: cannot read the lexical index ({exc}); rebuild the index") from exc
        if len(self.first_rows) != self.documents or len(self.indptr) != max(len(self.vocab), 0) + 1:
            if self.documents:
                raise IndexDirError(f"{segment_dir}: the lexical index's arrays disagree; rebuild the index")
        self.tokenize = Tokenizer(spec["stopwords"], spec["pattern"], spec["stemmer"])
        self.directory = segment_dir

    def damaged(self, what: str) -> IndexDirError:
        """The error for lexical arrays that cannot be right (damage that kept their size: status finds it)."""
        index = self.directory.parent
        return IndexDirError(
            f"{self.directory}: the lexical index is corrupt ({what}); check it with 'dsearch status {index}' and "
            "rebuild the index"
        )

    def scores(self, text: str) -> Any:
        """BM25 score of every passage for the query (repeated query words count again, as in bm25s)."""
        import numpy as np

        # Each word's postings once, weighted by how often the query repeats it: concatenating them once per
        # repeat made 'alpha ' * 150,000 (a 900 KB query) take 7 GB. Weights are summed in float64 either way,
        # where c times a float32 weight is exactly the sum of c copies (BM25 weights span few exponents).
        counts = Counter(self.vocab[t] for t in self.tokenize(text) if t in self.vocab)
        if not counts or not self.documents:
            return np.zeros(self.documents, np.float32)
        parts = [(int(self.indptr[i]), int(self.indptr[i + 1]), count) for i, count in counts.items()]
        if any(not 0 <= a <= b <= len(self.indices) for a, b, _ in parts):
            raise self.damaged("a word's postings lie past its arrays")
        docs = np.concatenate([self.indices[a:b] for a, b, _ in parts])
        weights = np.concatenate([self.data[a:b] * np.float64(count) for a, b, count in parts])
        if len(docs) and (docs.min() < 0 or docs.max() >= self.documents):
            raise self.damaged("a posting names a passage it does not have")
        return np.bincount(docs, weights=weights, minlength=self.documents).astype(np.float32)
