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
import re
from collections.abc import Iterable
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


class Tokenizer:
    """Lower-case, split on TOKEN_PATTERN, drop stopwords, stem: bm25s.tokenize's steps, shared by build and query."""

    def __init__(self, stopwords: Iterable[str], pattern: str = TOKEN_PATTERN, language: str = STEMMER_LANGUAGE):
        import Stemmer

        self.stopwords = frozenset(stopwords)
        self.pattern = pattern
        self.language = language
        self._split = re.compile(pattern).findall
        self._stem = lru_cache(maxsize=1 << 18)(Stemmer.Stemmer(language).stemWord)

    def __call__(self, text: str) -> list[str]:
        return [self._stem(t) for t in self._split(text.lower()) if t not in self.stopwords]


def has_lexical(index: Any) -> bool:
    """True when every segment of an open index carries a BM25 index (not built with --no-lexical, nor before
    it existed)."""
    return bool(index.segments) and all(LEXICAL_META in seg.segment.files for seg in index.segments)


def document_text(title: str | None, text: str) -> str:
    return f"{title} {text}" if title else text


def build_lexical(segment_dir: Path, passages_file: str) -> list[str]:
    """Write the BM25 files of a segment from its ``passages.parquet``; returns their names.

    Reads only id, title and text, a row group at a time; what it keeps is the token ids of every passage
    (bm25s indexes a list of them) and the vocabulary.
    """
    import bm25s
    import numpy as np
    import pyarrow.parquet as pq
    from bm25s.stopwords import STOPWORDS_EN

    # bm25s sets its logger to DEBUG on import; its "Building index…" lines would reach stderr wherever another
    # library configured the root logger.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    tokenizer = Tokenizer(STOPWORDS_EN)
    vocab: dict[str, int] = {}
    docs: list[list[int]] = []
    first_rows: list[int] = []
    row = 0
    previous = None
    table = pq.ParquetFile(segment_dir / passages_file)
    for batch in table.iter_batches(batch_size=READ_BATCH, columns=["id", "title", "text"]):
        ids, titles, texts = (batch.column(n).to_pylist() for n in ("id", "title", "text"))
        for passage_id, title, text in zip(ids, titles, texts, strict=True):
            if passage_id != previous:  # a split passage's further windows repeat its id and whole text
                tokens = tokenizer(document_text(title, text))
                docs.append([vocab.setdefault(t, len(vocab)) for t in tokens])
                first_rows.append(row)
                previous = passage_id
            row += 1
    retriever = bm25s.BM25()  # Lucene's BM25, k1 = 1.5, b = 0.75
    if docs:
        # bm25s wants one known token at least; an empty corpus (or one of stopwords only) gets a stand-in.
        vocab.setdefault("", len(vocab))
        retriever.index(bm25s.tokenization.Tokenized(ids=docs, vocab=vocab), show_progress=False)
        data, indices, indptr = (retriever.scores[n] for n in ("data", "indices", "indptr"))
    else:
        data, indices, indptr = np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(1, np.int64)
    np.save(segment_dir / "bm25-data.npy", np.asarray(data, np.float32))
    np.save(segment_dir / "bm25-indices.npy", np.asarray(indices, np.int32))
    np.save(segment_dir / "bm25-indptr.npy", np.asarray(indptr, np.int64))
    np.save(segment_dir / "bm25-rows.npy", np.asarray(first_rows, np.int64))
    meta = {
        "library": f"bm25s {bm25s.__version__}",
        "method": retriever.method,
        "k1": retriever.k1,
        "b": retriever.b,
        "documents": len(docs),
        "rows": row,
        "tokenizer": {"pattern": TOKEN_PATTERN, "stemmer": STEMMER_LANGUAGE, "stopwords": sorted(STOPWORDS_EN)},
        "vocab": vocab,
    }
    (segment_dir / LEXICAL_META).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    return list(LEXICAL_FILES)


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

    def scores(self, text: str) -> Any:
        """BM25 score of every passage for the query (repeated query words count again, as in bm25s)."""
        import numpy as np

        ids = [self.vocab[t] for t in self.tokenize(text) if t in self.vocab]
        if not ids or not self.documents:
            return np.zeros(self.documents, np.float32)
        parts = [(int(self.indptr[i]), int(self.indptr[i + 1])) for i in ids]
        docs = np.concatenate([self.indices[a:b] for a, b in parts])
        weights = np.concatenate([self.data[a:b] for a, b in parts])
        return np.bincount(docs, weights=weights, minlength=self.documents).astype(np.float32)
