"""BM25 over whole passages (what dsearch indexes) against BM25 over the --split windows, grouped by passage
(MaxP, as the dense side does), on an index already built from SciFact.

    python benchmarks/bm25_windows.py SCIFACT.idx [--scifact ../shared/eval/scifact]

Both use bm25s with PyStemmer English stemming and English stopwords, title + text, BEIR's self-hit rule, top 100.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bm25s
import ir_measures
import pyarrow.parquet as pq
import Stemmer

from dsearch.evaluate import read_qrels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index", type=Path)
    parser.add_argument("--scifact", type=Path, default=Path(__file__).resolve().parents[2] / "shared/eval/scifact")
    args = parser.parse_args()
    manifest = json.loads((args.index / "manifest.json").read_text())
    table = pq.read_table(args.index / manifest["segments"][0]["path"] / "passages.parquet").to_pylist()
    queries = {json.loads(line)["_id"]: json.loads(line)["text"] for line in open(args.scifact / "queries.jsonl")}
    qrels = read_qrels(str(args.scifact / "qrels" / "test.tsv"))
    judged = sorted(q for q in qrels if q in queries)
    stemmer = Stemmer.Stemmer("english")

    def windows(row: dict) -> str:
        text = row["text"] if row["window_start"] is None else row["text"][row["window_start"] : row["window_end"]]
        return f"{row['title']} {text}" if row["title"] else text

    passages, seen = [], set()
    for row in table:
        if row["id"] not in seen:
            seen.add(row["id"])
            passages.append(row)
    results = {}
    for name, docs, ids in (
        ("whole passages", [f"{r['title']} {r['text']}" if r["title"] else r["text"] for r in passages],
         [r["id"] for r in passages]),
        ("windows, MaxP", [windows(r) for r in table], [r["id"] for r in table]),
    ):
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(docs, stopwords="en", stemmer=stemmer, show_progress=False),
                        show_progress=False)
        tokens = bm25s.tokenize([queries[q] for q in judged], stopwords="en", stemmer=stemmer, show_progress=False)
        hits, scores = retriever.retrieve(tokens, k=1000, show_progress=False, n_threads=1)
        run: dict[str, dict[str, float]] = {}
        for qid, rows, values in zip(judged, hits, scores, strict=True):
            best: dict[str, float] = {}
            for row, score in zip(rows, values, strict=True):
                pid = ids[row]
                if pid != qid and pid not in best:
                    best[pid] = float(score)
            run[qid] = dict(list(best.items())[:100])
        metrics = ir_measures.calc_aggregate([ir_measures.nDCG @ 10, ir_measures.R @ 100], qrels, run)
        results[name] = {"documents": len(docs), **{str(m): round(float(v), 5) for m, v in metrics.items()}}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
