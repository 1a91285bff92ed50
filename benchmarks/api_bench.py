"""Issue 14 part 1: what the Searcher's guarantees cost, and what a warm Searcher saves over a process per query.

    python benchmarks/api_bench.py --baseline-src /tmp/base/src [--passages 100000] [--queries 1000]

Builds (once, in a temporary directory) a 100k-passage index for the bundled model at the default precision:
SciFact sentences with random unit vectors, written by dsearch's segment writer (benchmarks/synthetic.py). Then,
in the same run, alternating the two code trees, each measured in its own process:

  * the search core, without the model: ``search.run_search`` (dense) and ``hybrid.run`` (RRF) over fixed query
    vectors (random, seeded by the query text), for this tree and for ``--baseline-src`` (a checkout of the code
    before the Searcher: no exact re-scoring, no per-query deepening). Best of --runs, seconds per query.
  * this tree only: one ``Searcher`` answering --queries real queries one call each (the bundled model's lean
    encoder), p50/p99 per call, with the vectors memory-mapped (the default) and held in memory (``in_memory``),
    each the better of two alternated runs; against whole ``dsearch query DIR "text"`` processes (median of --runs).
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
SRC = HERE.parent / "src"

# Runs in a child process with PYTHONPATH set to one tree: times the search core with fixed query vectors.
CORE = r"""
import json, sys, time, zlib
from pathlib import Path
import numpy as np
from dsearch.store import OpenIndex
from dsearch.search import Query, run_search
from dsearch.hybrid import run as run_mode

directory, count, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

class FixedEncoder:
    # The same unit vector for the same text, in both trees: the search, not the model, is measured.
    def encode_queries(self, texts):
        out = []
        for text in texts:
            v = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(384).astype(np.float32)
            out.append(v / np.linalg.norm(v))
        return np.stack(out)

index = OpenIndex(Path(directory))
queries = [Query(str(i), f"query {i}") for i in range(count)]
result = {}
for name, search in (
    ("dense", lambda: list(run_search(index, FixedEncoder(), queries, 10))),
    ("hybrid", lambda: list(run_mode(index, FixedEncoder(), queries[: count // 5], 10, "hybrid"))),
):
    search()  # warm: page cache, row-group cache, BM25 arrays
    n = count if name == "dense" else count // 5
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        hits = search()
        times.append(time.perf_counter() - started)
    result[name] = {"queries": n, "best_s": min(times), "ms_per_query": 1000 * min(times) / n,
                    "first_ids": [h.id for h in hits[0][1]]}
print(json.dumps(result))
"""

WARM = r"""
import json, statistics, sys, time
import dsearch
directory, texts = sys.argv[1], [line.strip() for line in open(sys.argv[2]) if line.strip()]
started = time.perf_counter()
searcher = dsearch.Searcher(directory, load_encoder=True, in_memory=sys.argv[3] == "in_memory")
opened = time.perf_counter() - started
searcher.search(texts[0], 10)  # first call: the ONNX session's first run
times = []
for text in texts:
    started = time.perf_counter()
    searcher.search(text, 10)
    times.append(time.perf_counter() - started)
times.sort()
print(json.dumps({"open_s": opened, "calls": len(times), "p50_ms": 1000 * times[len(times) // 2],
                  "p99_ms": 1000 * times[int(len(times) * 0.99) - 1], "mean_ms": 1000 * statistics.mean(times)}))
"""


def child(code: str, src: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", type=Path, required=True, help="src/ of the code to compare against")
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scifact", type=Path, help="BEIR SciFact folder [default: ../shared/eval/scifact]")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(SRC))
    import synthetic
    from synthetic import add_lexical, scifact_sentences, write_random_index

    if args.scifact is not None:  # a worktree's ../shared is not the clone's
        synthetic.SCIFACT = args.scifact

    from dsearch.corpus import Passage

    with tempfile.TemporaryDirectory(prefix="api-bench-") as tmp:
        index = Path(tmp) / "idx"
        started = time.perf_counter()
        sentences = scifact_sentences(args.passages)
        write_random_index(index, (Passage(pid, text, None, "scifact") for pid, text in sentences))
        add_lexical(index)  # BM25 for the hybrid figure
        print(f"index of {args.passages:,} passages built in {time.perf_counter() - started:.1f} s", file=sys.stderr)

        core = {"baseline": [], "this": []}
        for _ in range(2):  # alternate the trees, so that machine noise hits both
            for name, src in (("baseline", args.baseline_src), ("this", SRC)):
                core[name].append(child(CORE, src, str(index), str(args.queries), str(args.runs)))
        for name in core:
            for mode in ("dense", "hybrid"):
                best = min(r[mode]["ms_per_query"] for r in core[name])
                print(f"core {mode:6} {name:8}: {best:.3f} ms/query (best of {2 * args.runs} runs)")
        for mode in ("dense", "hybrid"):
            ratio = min(r[mode]["ms_per_query"] for r in core["this"]) / min(
                r[mode]["ms_per_query"] for r in core["baseline"]
            )
            print(f"core {mode}: this / baseline = {ratio:.3f}")

        texts = Path(tmp) / "queries.txt"
        texts.write_text("".join(f"{text}\n" for _, text in sentences[: args.queries]))
        warm = {}
        for variant in ("mapped", "in_memory", "mapped", "in_memory"):  # alternated: the machine is shared
            result = child(WARM, SRC, str(index), str(texts), variant)
            if variant not in warm or result["p50_ms"] < warm[variant]["p50_ms"]:
                warm[variant] = result
        for variant, result in warm.items():
            print(
                f"warm Searcher ({variant}): opened (index + model) in {result['open_s']:.3f} s; {result['calls']} "
                f"calls: p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, mean {result['mean_ms']:.1f} ms"
            )
        dsearch = str(Path(sys.executable).with_name("dsearch"))
        env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
        cold = []
        for text in [sentences[i][1] for i in range(args.runs + 1)]:
            started = time.perf_counter()
            subprocess.run([dsearch, "query", str(index), text], env=env, capture_output=True, check=True)
            cold.append(time.perf_counter() - started)
        cold_median = statistics.median(cold[1:])  # the first run warms the page cache
        print(f"cold dsearch query process: median {cold_median:.3f} s of {len(cold) - 1}")
        for variant, result in warm.items():
            print(f"cold / warm ({variant}) p50 = {cold_median * 1000 / result['p50_ms']:.1f}")


if __name__ == "__main__":
    main()
