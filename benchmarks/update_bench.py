"""`dsearch index --update` on an unchanged 100k-passage corpus: how long it takes to find nothing to do.

    python benchmarks/update_bench.py [--passages 100000] [--runs 3]

The index is written through dsearch's own segment writer from the corpus as dsearch reads it (so every
content hash matches), with random unit vectors for the bundled model: the update only reads the corpus,
hashes it and compares, so the vectors' values do not matter. Measured whole-process, median of --runs, with
`dsearch status` (stat-only corpus check) beside it.
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
from synthetic import scifact_sentences, write_random_index  # noqa: E402

from dsearch.corpus import read_corpus  # noqa: E402

DSEARCH = str(Path(sys.executable).with_name("dsearch"))


def build(corpus: Path, target: Path) -> None:
    """The index exactly as dsearch would read the corpus, so that every content hash matches."""
    write_random_index(target, read_corpus([str(corpus)]), sources=[str(corpus)])


def timed(args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - started, result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        corpus = tmp / "corpus.jsonl"
        corpus.write_text(
            "".join(
                json.dumps({"id": pid, "title": "SciFact", "text": text, "lang": "en"}) + "\n"
                for pid, text in scifact_sentences(args.passages)
            )
        )
        target = tmp / "idx"
        build(corpus, target)
        update = [
            timed([DSEARCH, "index", str(corpus), "-o", str(target), "--update", "--json"]) for _ in range(args.runs)
        ]
        summary = json.loads(update[-1][1].splitlines()[0])
        status = [timed([DSEARCH, "status", str(target)]) for _ in range(args.runs)]
    print(
        json.dumps(
            {
                "passages": args.passages,
                "update_nothing_changed_median_s": round(statistics.median(s for s, _ in update), 2),
                "unchanged": summary["unchanged"],
                "encoded": summary["encoded"],
                "published": summary["published"],
                "status_median_s": round(statistics.median(s for s, _ in status), 2),
                "status_output": status[-1][1].strip(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
