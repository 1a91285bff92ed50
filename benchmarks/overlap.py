"""Top-10 agreement of a precision with fp32 — a quality gate that needs no relevance judgements.

    python benchmarks/overlap.py [--precision auto] [--scifact ../shared/eval/scifact] [--sentences-from 1000]

For each corpus, `dsearch index` builds one index at fp32 and one at the given precision (the bundled model), and
`dsearch query --queries Q -k 10 --format trec` ranks every query against each, each index with its own precision
on the query side too. The figure is the mean over queries of |top-10 ∩ fp32 top-10| / 10. Corpora:

- scifact: SciFact's 5,183 abstracts (title + text) and its 300 test queries;
- sentences: short web-style passages — every sentence of 6 words or more from the first N SciFact abstracts
  (split after ". ", "? " or "! "), one passage each — queried with the same 300 queries.

Prints one JSON object per corpus (passages, queries, mean overlap, minimum, share of queries below 0.9; for
SciFact also nDCG@10 of both indexes, from `dsearch eval` on the test qrels).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCIFACT = ROOT.parent / "shared" / "eval" / "scifact"
DSEARCH = [sys.executable, "-m", "dsearch"]


def dsearch(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*DSEARCH, *args], capture_output=True, text=True, env=env, check=True).stdout


def sentences_corpus(scifact: Path, n_docs: int, out: Path) -> int:
    count = 0
    with open(scifact / "corpus.jsonl") as src, open(out, "w") as dst:
        for line, _ in zip(src, range(n_docs), strict=False):
            doc = json.loads(line)
            for i, sentence in enumerate(re.split(r"(?<=[.?!])\s+", doc["text"])):
                if len(sentence.split()) >= 6:
                    dst.write(json.dumps({"_id": f"{doc['_id']}-{i}", "text": sentence}) + "\n")
                    count += 1
    return count


def top10(index: Path, queries: Path) -> dict[str, list[str]]:
    ranked: dict[str, list[str]] = defaultdict(list)
    for line in dsearch("query", str(index), "--queries", str(queries), "-k", "10", "--format", "trec").splitlines():
        qid, _, doc, *_ = line.split()
        ranked[qid].append(doc)
    return ranked


def ndcg10(index: Path, scifact: Path) -> float:
    qrels = scifact / "qrels" / "test.tsv"
    report = dsearch("eval", str(index), "--queries", str(scifact / "queries.jsonl"), "--qrels", str(qrels), "--json")
    return round(json.loads(report)["metrics"]["nDCG@10"], 5)


def overlap(
    corpus: Path, queries: Path, precision: str, tmp: Path, label: str, scifact: Path | None = None
) -> dict[str, object]:
    runs = {}
    for setting in ("fp32", precision):
        index = tmp / f"{label}-{setting}.idx"
        summary = json.loads(dsearch("index", str(corpus), "-o", str(index), "--precision", setting, "--json", "-q"))
        runs[setting] = (summary, top10(index, queries))
    reference, other = runs["fp32"][1], runs[precision][1]
    shares = [len(set(other[q]) & set(reference[q])) / 10 for q in reference]
    result: dict[str, object] = {
        "corpus": label,
        "precision": f"{precision} (= {runs[precision][0]['precision']})",
        "passages": runs["fp32"][0]["indexed"],
        "queries": len(shares),
        "mean_top10_overlap": round(sum(shares) / len(shares), 4),
        "min": min(shares),
        "share_below_0.9": round(sum(s < 0.9 for s in shares) / len(shares), 4),
    }
    if scifact:  # the judged gate too, from the same two indexes
        result["nDCG@10_fp32"] = ndcg10(tmp / f"{label}-fp32.idx", scifact)
        result[f"nDCG@10_{precision}"] = ndcg10(tmp / f"{label}-{precision}.idx", scifact)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scifact", type=Path, default=DEFAULT_SCIFACT)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--sentences-from", type=int, default=1000, help="abstracts split into sentence passages")
    parser.add_argument("--corpora", default="scifact,sentences")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        test_ids = {line.split("\t")[0] for line in (args.scifact / "qrels" / "test.tsv").read_text().splitlines()[1:]}
        queries = tmp / "queries.tsv"
        with open(args.scifact / "queries.jsonl") as src, open(queries, "w") as dst:
            for line in src:
                q = json.loads(line)
                if q["_id"] in test_ids:
                    dst.write(f"{q['_id']}\t{q['text']}\n")
        if "scifact" in args.corpora:
            result = overlap(args.scifact / "corpus.jsonl", queries, args.precision, tmp, "scifact", args.scifact)
            print(json.dumps(result), flush=True)
        if "sentences" in args.corpora:
            sentences_corpus(args.scifact, args.sentences_from, tmp / "sentences.jsonl")
            print(json.dumps(overlap(tmp / "sentences.jsonl", queries, args.precision, tmp, "sentences")), flush=True)


if __name__ == "__main__":
    main()
