"""Issue 12: the streamed BM25 build writes bm25s's own index, byte for byte, in bounded memory."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest

from dsearch.lexical import LEXICAL_META, Tokenizer, build_lexical, document_text
from dsearch.store import OpenIndex


def bm25s_arrays(segment_dir: Path) -> dict[str, np.ndarray]:
    """The index as bm25s builds it from every passage's token ids held in lists (the build before streaming)."""
    import bm25s
    import pyarrow.parquet as pq
    from bm25s.stopwords import STOPWORDS_EN

    tokenizer = Tokenizer(STOPWORDS_EN)
    vocab: dict[str, int] = {}
    docs, first_rows, previous = [], [], None
    table = pq.read_table(segment_dir / "passages.parquet", columns=["id", "title", "text"]).to_pylist()
    for row, passage in enumerate(table):
        if passage["id"] != previous:
            tokens = tokenizer(document_text(passage["title"], passage["text"]))
            docs.append([vocab.setdefault(t, len(vocab)) for t in tokens])
            first_rows.append(row)
            previous = passage["id"]
    vocab.setdefault("", len(vocab))
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenization.Tokenized(ids=docs, vocab=vocab), show_progress=False)
    return {
        "bm25-data.npy": np.asarray(retriever.scores["data"], np.float32),
        "bm25-indices.npy": np.asarray(retriever.scores["indices"], np.int32),
        "bm25-indptr.npy": np.asarray(retriever.scores["indptr"], np.int64),
        "bm25-rows.npy": np.asarray(first_rows, np.int64),
        "vocab": vocab,
    }


def assert_same_as_bm25s(segment_dir: Path) -> None:
    expected = bm25s_arrays(segment_dir)
    for name in ("bm25-data.npy", "bm25-indices.npy", "bm25-indptr.npy", "bm25-rows.npy"):
        buffer = io.BytesIO()
        np.save(buffer, expected[name])
        assert (segment_dir / name).read_bytes() == buffer.getvalue(), name  # the very bytes np.save writes
    assert json.loads((segment_dir / LEXICAL_META).read_text())["vocab"] == expected["vocab"]


def segment_of(index: Path) -> Path:
    return index / OpenIndex(index).manifest.segments[0].path


def test_sample_corpus_index_is_bm25s_byte_for_byte(sample_index):
    assert_same_as_bm25s(segment_of(sample_index))


@pytest.mark.parametrize(("read_batch", "range_pairs"), [(7, 50), (64, 1), (1000, 1 << 22)])
def test_streamed_in_small_pieces_it_is_still_bm25s(tmp_path, cli, read_batch, range_pairs):
    """Many batches and many token ranges (one token each, at range_pairs 1), split passages whose windows
    cross batches, empty and stopword-only passages, repeated words: the same bytes as bm25s."""
    rng = random.Random(read_batch)
    words = [f"w{i}" for i in range(300)] + ["the", "and", "running", "runs", "ran"]
    rows = []
    for number in range(400):
        length = rng.choice([0, 1, 3, 10, 40, 700])  # 700 words: split into windows
        text = " ".join(rng.choice(words[: rng.choice([20, 305])]) for _ in range(length)) or "the and"
        rows.append({"_id": f"p{number}", "title": rng.choice([None, "Title w1", "the"]), "text": text})
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("index", corpus, "-o", tmp_path / "idx", "--split").exit_code == 0
    segment = segment_of(tmp_path / "idx")
    assert OpenIndex(tmp_path / "idx").rows > 400  # some passages were split
    build_lexical(segment, "passages.parquet", read_batch=read_batch, range_pairs=range_pairs)
    assert not [p for p in segment.iterdir() if p.name.startswith("bm25-") and p.is_dir()]  # temporary files gone
    assert_same_as_bm25s(segment)


def test_rebuilding_in_tiny_batches_gives_the_same_bytes(sample_index):
    segment = segment_of(sample_index)
    before = {name: (segment / name).read_bytes() for name in ("bm25-data.npy", "bm25-indices.npy")}
    build_lexical(segment, "passages.parquet", read_batch=3, range_pairs=10)
    assert {name: (segment / name).read_bytes() for name in before} == before


def test_empty_segment_writes_empty_arrays(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": pa.array([], pa.string()), "title": pa.array([], pa.string()),
                             "text": pa.array([], pa.string())}), tmp_path / "passages.parquet")  # fmt: skip
    build_lexical(tmp_path, "passages.parquet")
    assert np.load(tmp_path / "bm25-indptr.npy").tolist() == [0]
    assert len(np.load(tmp_path / "bm25-data.npy")) == len(np.load(tmp_path / "bm25-rows.npy")) == 0
    assert json.loads((tmp_path / LEXICAL_META).read_text())["documents"] == 0

