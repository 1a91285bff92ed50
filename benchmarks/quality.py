"""Index BEIR SciFact with dsearch and score it; compare with the published MTEB figure for all-MiniLM-L6-v2.

    python benchmarks/quality.py [--model NAME] [--extra "--precision int8"] [--scifact ../shared/eval/scifact]

Prints one JSON object: nDCG@10, R@100, RR@10 (MRR@10), indexing seconds and passages/s, and the gap to the
published nDCG@10 (0.64508, MTEB results for sentence-transformers/all-MiniLM-L6-v2, SciFact test).
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
