"""Issue 14: one Searcher shared by threads — what the locks cost and what sharing gains.

    python benchmarks/threads_bench.py --baseline-src /tmp/base/src [--passages 100000] [--queries 200]

Builds (once, in a temporary directory) a 100k-passage index for the bundled model at the default precision:
SciFact sentences with random unit vectors (benchmarks/synthetic.py), plus BM25. Then, in the same run, each in its
own process, one Searcher (``in_memory=True``, model and BM25 loaded first, 20 warm-up calls) answers the first
--queries SciFact queries, one call each, in dense, lexical and hybrid mode:

  * ``baseline, 1 thread``: ``--baseline-src`` (the code before the Searcher was thread-safe), serially;
  * ``this, N threads, one lock``: this tree, N threads taking turns through one lock around each call — what a
    threaded program had to do before (the Searcher's docs asked for it; without it pyarrow crashed);
  * ``this, N threads``: this tree, N threads calling the shared Searcher freely (1 thread = serial).

Queries per second, the best of --runs for each; the variants alternate twice, so that a shared machine's noise
hits them all.
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
SRC = HERE.parent / "src"

CHILD = r"""
import json, sys, threading, time
import dsearch
directory, queries_file, counts, outer, runs = sys.argv[1:6]
outer, runs = outer == "lock", int(runs)
texts = [line.strip() for line in open(queries_file) if line.strip()]
searcher = dsearch.Searcher(directory, load_encoder=True, load_lexical=True, in_memory=True)
lock = threading.Lock()
result = {}
for mode in ("dense", "lexical", "hybrid"):
    for text in texts[:20]:
        searcher.search(text, 10, mode=mode)
    for n in [int(c) for c in counts.split(",")]:
        def work(chunk):
            for text in chunk:
                if outer:
                    with lock:
                        searcher.search(text, 10, mode=mode)
                else:
                    searcher.search(text, 10, mode=mode)
        best = float("inf")
        for _ in range(runs):
            threads = [threading.Thread(target=work, args=(texts[i::n],)) for i in range(n)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            best = min(best, time.perf_counter() - started)
        result[f"{mode} {n}"] = len(texts) / best
print(json.dumps(result))
"""


def child(src: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", type=Path, required=True, help="src/ of the code to compare against")
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", default="2,4", help="thread counts besides 1 [default: 2,4]")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--scifact", type=Path, help="BEIR SciFact folder [default: ../shared/eval/scifact]")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(SRC))
    import synthetic
    from synthetic import add_lexical, scifact_sentences, write_random_index

    if args.scifact is not None:  # a worktree's ../shared is not the clone's
        synthetic.SCIFACT = args.scifact

    from dsearch.corpus import Passage
    with tempfile.TemporaryDirectory(prefix="threads-bench-") as tmp:
        index = Path(tmp) / "idx"
        started = time.perf_counter()
        sentences = scifact_sentences(args.passages)
        write_random_index(index, (Passage(pid, text, None, "scifact") for pid, text in sentences))
        add_lexical(index)  # BM25 too
        print(f"index of {args.passages:,} passages built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        queries = Path(tmp) / "queries.txt"
        with open(synthetic.SCIFACT / "queries.jsonl") as lines:
            texts = [json.loads(line)["text"] for line in lines][: args.queries]
        queries.write_text("".join(f"{text}\n" for text in texts))

        variants = {
            "baseline, 1 thread": (args.baseline_src, "1", "free"),
            "this, N threads, one lock": (SRC, args.threads, "lock"),
            "this, N threads": (SRC, f"1,{args.threads}", "free"),
        }
        best: dict[str, dict[str, float]] = {}
        for _ in range(2):
            for name, (src, counts, outer) in variants.items():
                for key, rate in child(src, str(index), str(queries), counts, outer, str(args.runs)).items():
                    best.setdefault(name, {})[key] = max(rate, best.get(name, {}).get(key, 0.0))
        print(json.dumps(best, indent=1))
        for mode in ("dense", "lexical", "hybrid"):
            serial = best["this, N threads"][f"{mode} 1"]
            line = [f"{mode:7}: baseline 1 thread {best['baseline, 1 thread'][f'{mode} 1']:.1f} q/s, this 1 thread "
                    f"{serial:.1f} q/s"]
            for n in args.threads.split(","):
                locked, free = best["this, N threads, one lock"][f"{mode} {n}"], best["this, N threads"][f"{mode} {n}"]
                line.append(f"{n} threads: one lock {locked:.1f}, free {free:.1f} q/s ({free / locked:.2f}x)")
            print("; ".join(line))


if __name__ == "__main__":
    main()
