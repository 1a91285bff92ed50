"""Peak memory and time of the lexical (BM25) build against the corpus size: bm25s fed every passage's token ids
(the build before streaming) and dsearch's streamed build, in the same run.

    python benchmarks/lexical_memory.py [--passages 100000,500000] [--scifact ../shared/eval/scifact]

For each size it writes a segment's ``passages.parquet`` of SciFact sentences (repeated with new ids past the
corpus's ~50k, as benchmarks/synthetic.py does) through dsearch's own Parquet writer, then builds the BM25 files
in a fresh process per build: peak RSS is that process's VmHWM, and ``imports`` its RSS after importing what a
build imports (numpy, pyarrow, bm25s, PyStemmer), so ``build`` = peak - imports is what the build itself added.
Both builds' arrays are compared byte for byte.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def rss_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def bm25s_build(segment_dir: Path, passages_file: str) -> None:
    """The build before streaming (dsearch 12a, lexical.build_lexical): token id lists, then bm25s.BM25.index."""
    import bm25s
    import numpy as np
    import pyarrow.parquet as pq
    from bm25s.stopwords import STOPWORDS_EN

    from dsearch.lexical import Tokenizer, document_text

    tokenizer = Tokenizer(STOPWORDS_EN)
    vocab: dict[str, int] = {}
    docs: list[list[int]] = []
    first_rows: list[int] = []
    row = 0
    previous = None
    for batch in pq.ParquetFile(segment_dir / passages_file).iter_batches(batch_size=2000,
                                                                          columns=["id", "title", "text"]):
        ids, titles, texts = (batch.column(n).to_pylist() for n in ("id", "title", "text"))
        for passage_id, title, text in zip(ids, titles, texts, strict=True):
            if passage_id != previous:
                tokens = tokenizer(document_text(title, text))
                docs.append([vocab.setdefault(t, len(vocab)) for t in tokens])
                first_rows.append(row)
                previous = passage_id
            row += 1
    retriever = bm25s.BM25()
    vocab.setdefault("", len(vocab))
    retriever.index(bm25s.tokenization.Tokenized(ids=docs, vocab=vocab), show_progress=False)
    for name, key, dtype in (("data", "data", np.float32), ("indices", "indices", np.int32),
                             ("indptr", "indptr", np.int64)):  # fmt: skip
        np.save(segment_dir / f"bm25-{name}.npy", np.asarray(retriever.scores[key], dtype))
    np.save(segment_dir / "bm25-rows.npy", np.asarray(first_rows, np.int64))


def child(which: str, segment_dir: Path) -> None:
    import bm25s  # noqa: F401
    import numpy  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import Stemmer  # noqa: F401

    from dsearch.lexical import build_lexical

    imports = rss_mib("VmRSS")
    started = time.perf_counter()
    if which == "bm25s":
        bm25s_build(segment_dir, "passages.parquet")
    else:
        build_lexical(segment_dir, "passages.parquet")
    seconds = time.perf_counter() - started
    peak = rss_mib("VmHWM")
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mib": round(peak, 1), "imports_mib": round(imports, 1),
                      "build_mib": round(peak - imports, 1)}))  # fmt: skip


def write_passages(segment_dir: Path, n: int) -> int:
    from synthetic import scifact_sentences

    from dsearch.corpus import Passage
    from dsearch.store import PassageTableWriter, content_hash, passage_row

    writer = PassageTableWriter(segment_dir / "passages.parquet")
    tokens = 0
    for pid, text in scifact_sentences(n):
        writer.add_row(passage_row(Passage(pid, text, None, "scifact-sentences"), content_hash(text)))
        tokens += len(text.split())
    writer.close()
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", default="100000,500000")
    parser.add_argument("--scifact", type=Path, default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    import synthetic

    if args.scifact:
        synthetic.SCIFACT = args.scifact
    results = []
    for n in (int(x) for x in args.passages.split(",")):
        with tempfile.TemporaryDirectory() as name:
            segment = {which: Path(name) / which for which in ("bm25s", "streamed")}
            for path in segment.values():
                path.mkdir()
            words = write_passages(segment["bm25s"], n)
            (segment["streamed"] / "passages.parquet").write_bytes((segment["bm25s"] / "passages.parquet").read_bytes())
            row: dict = {"passages": n, "words": words}
            for which, path in segment.items():
                out = subprocess.run([sys.executable, __file__, "--child", which, str(path)], capture_output=True,
                                     text=True, check=True).stdout  # fmt: skip
                row[which] = json.loads(out)
            row["same_bytes"] = all(
                (segment["bm25s"] / f).read_bytes() == (segment["streamed"] / f).read_bytes()
                for f in ("bm25-data.npy", "bm25-indices.npy", "bm25-indptr.npy", "bm25-rows.npy")
            )
            results.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
