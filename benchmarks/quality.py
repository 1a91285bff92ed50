"""Index BEIR SciFact with dsearch and score it; compare with the published MTEB figure for all-MiniLM-L6-v2.

    python benchmarks/quality.py [--model NAME] [--extra "--precision int8"] [--scifact ../shared/eval/scifact]
    python benchmarks/quality.py --index scifact.idx --mode dense,lexical,hybrid --eval-extra "--alpha 0.5"

Prints one JSON object: nDCG@10, R@100, RR@10 (MRR@10), indexing seconds and passages/s, and the gap to the
published nDCG@10 (0.64508, MTEB results for sentence-transformers/all-MiniLM-L6-v2, SciFact test). With
``--mode`` (one or several, comma-separated) it scores each search mode of the same index, under "modes";
``--index`` scores an index already built instead of building one.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PUBLISHED_NDCG10 = 0.64508
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCIFACT = ROOT.parent / "shared" / "eval" / "scifact"


def dsearch(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("dsearch")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scifact", type=Path, default=DEFAULT_SCIFACT)
    parser.add_argument("--model", default=None)
    parser.add_argument("--extra", default="", help="extra options for 'dsearch index' (and eval)")
    parser.add_argument("--keep", type=Path, default=None, help="build the index here and keep it")
    parser.add_argument("--index", type=Path, default=None, help="score this index instead of building one")
    parser.add_argument("--mode", default=None, help="search modes to score, comma-separated (dense,lexical,hybrid)")
    parser.add_argument("--eval-extra", default="", help="extra options for 'dsearch eval' only (--alpha 0.5)")
    args = parser.parse_args()
    if args.mode or args.index:
        return score_modes(args)
    extra = shlex.split(args.extra)
    model = ["--model", args.model] if args.model else []
    with tempfile.TemporaryDirectory() as tmp:
        target = args.keep or Path(tmp) / "scifact.idx"
        started = time.perf_counter()
        built = dsearch("index", str(args.scifact / "corpus.jsonl"), "-o", str(target), "--json", "-q", *model, *extra)
        wall = time.perf_counter() - started
        summary = json.loads(built.stdout)
        scored = dsearch(
            "eval",
            str(target),
            "--queries",
            str(args.scifact / "queries.jsonl"),
            "--qrels",
            str(args.scifact / "qrels" / "test.tsv"),
            "-k",
            "100",
            "--json",
            "-q",
            *model,
        )
        report = json.loads(scored.stdout)
    result = {
        "model": summary["model"],
        "options": args.extra,
        "passages": summary["indexed"],
        "index_wall_seconds": round(wall, 1),
        "encode_passages_per_second": summary["passages_per_second"],
        "nDCG@10": round(report["metrics"]["nDCG@10"], 5),
        "R@100": round(report["metrics"]["R@100"], 5),
        "MRR@10": round(report["metrics"]["RR@10"], 5),
        "queries": report["queries"],
        "published_nDCG@10": PUBLISHED_NDCG10,
        "gap_to_published": round(report["metrics"]["nDCG@10"] - PUBLISHED_NDCG10, 5),
    }
    print(json.dumps(result, indent=2))


def score_modes(args: argparse.Namespace) -> None:
    """Score each --mode of one index (built here unless --index names one)."""
    with tempfile.TemporaryDirectory() as tmp:
        target = args.index or args.keep or Path(tmp) / "scifact.idx"
        result: dict = {"index": str(target), "eval_options": args.eval_extra, "modes": {}}
        if args.index is None:
            started = time.perf_counter()
            built = dsearch("index", str(args.scifact / "corpus.jsonl"), "-o", str(target), "--json", "-q",
                            *shlex.split(args.extra))
            result["index_wall_seconds"] = round(time.perf_counter() - started, 1)
            result["build"] = json.loads(built.stdout)
        for mode in (args.mode or "dense,lexical,hybrid").split(","):
            started = time.perf_counter()
            scored = dsearch(
                "eval", str(target), "--queries", str(args.scifact / "queries.jsonl"),
                "--qrels", str(args.scifact / "qrels" / "test.tsv"), "-k", "100", "--json", "-q",
                "--mode", mode, *shlex.split(args.eval_extra),
            )
            metrics = json.loads(scored.stdout)["metrics"]
            result["modes"][mode] = {name: round(value, 5) for name, value in metrics.items()}
            result["modes"][mode]["eval_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
