"""Lexical build cost, cold query latency per --mode, and --where speed, on a synthetic 100k-passage index.

    python benchmarks/hybrid_bench.py [--passages 100000] [--runs 5]

The index holds SciFact sentences (ids made unique) with random unit vectors (benchmarks/synthetic.py) and a
field ``bucket`` = passage number mod 100, so ``--where "bucket = 7"`` keeps 1% of the rows. It times, in the
same run: building the BM25 index and inferring field types from the segment's passages.parquet (what ``dsearch
index`` adds at segment close); cold ``dsearch query`` processes (median of --runs) in dense, lexical and hybrid
mode, each unfiltered and with the 1% filter; and 1,000 queries from a file in each, unfiltered and filtered.
"""

from __future__ import annotations

import argparse
import compileall
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import synthetic  # noqa: E402
from query_bench import DSEARCH, QUERY, median_of, timed  # noqa: E402
from synthetic import scifact_sentences, write_random_index  # noqa: E402

import dsearch  # noqa: E402
from dsearch.corpus import Passage  # noqa: E402
from dsearch.filters import field_types, write_field_columns  # noqa: E402
from dsearch.lexical import build_lexical  # noqa: E402
from dsearch.manifest import read_manifest  # noqa: E402
from dsearch.store import PASSAGES_FILE, file_info  # noqa: E402

FILTER = "bucket = 7"
DUCKDB_FILTER = "bucket = 7 AND TRUE"  # the same rows; a bare TRUE is outside the fast path's subset


def build(index: Path, n: int) -> dict[str, float]:
    passages = (
        Passage(pid, text, None, "scifact-sentences", {"bucket": number % 100})
        for number, (pid, text) in enumerate(scifact_sentences(n))
    )
    write_random_index(index, passages)
    manifest = read_manifest(index)
    segment = manifest.segments[0]
    seg_dir = index / segment.path
    started = time.perf_counter()
    for name in build_lexical(seg_dir, PASSAGES_FILE):
        segment.files[name] = file_info(seg_dir / name)
    lexical_s = time.perf_counter() - started
    started = time.perf_counter()
    manifest.corpus["field_types"] = field_types(seg_dir / PASSAGES_FILE)
    types_s = time.perf_counter() - started
    started = time.perf_counter()
    name = write_field_columns(seg_dir, PASSAGES_FILE, manifest.corpus["field_types"])
    segment.files[name] = file_info(seg_dir / name)
    columns_s = time.perf_counter() - started
    manifest.corpus["lexical"] = True
    (index / "manifest.json").write_text(manifest.to_json())
    return {"lexical_build_s": round(lexical_s, 2), "field_types_s": round(types_s, 2),
            "fields_parquet_s": round(columns_s, 2)}  # fmt: skip


def alternated(runs: int, variants: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Cold processes of each variant in turn, ``runs`` rounds after a warm-up round: medians, mins, peak RSS.
    Alternating keeps a change in the machine's load from landing on one variant only."""
    for args in variants.values():
        timed(args)
    samples: dict[str, list[tuple[float, int]]] = {label: [] for label in variants}
    for _ in range(runs):
        for label, args in variants.items():
            samples[label].append(timed(args))
    return {
        label: {
            "median_s": round(statistics.median(s for s, _ in got), 3),
            "min_s": round(min(s for s, _ in got), 3),
            "peak_rss_mib": round(statistics.median(r for _, r in got) / 1024, 1),
        }
        for label, got in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scifact", type=Path, default=synthetic.SCIFACT)
    parser.add_argument("--index", type=Path, default=None, help="reuse (or keep) the synthetic index here")
    parser.add_argument("--no-batch", action="store_true", help="skip the 1,000-query runs")
    args = parser.parse_args()
    synthetic.SCIFACT = args.scifact  # scifact_sentences reads it
    # Bytecode for dsearch's modules, as an installed package has: with PYTHONDONTWRITEBYTECODE set (as on the
    # shared machines) every timed process would otherwise compile them from source, and a filtered query
    # compiles filters.py on top (about 10 ms).
    compileall.compile_dir(str(Path(dsearch.__file__).parent), quiet=1)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        index = args.index or tmp / "idx"
        built = build(index, args.passages) if not index.exists() else "reused"
        results: dict = {"passages": args.passages, "build": built, "cold_query": {}}
        queries = tmp / "queries.tsv"
        texts = [json.loads(line)["text"] for line in open(args.scifact / "queries.jsonl")]
        queries.write_text("".join(f"q{i}\t{texts[i % len(texts)]}\n" for i in range(1000)))
        for mode in ("dense", "lexical", "hybrid"):
            base = [DSEARCH, "query", str(index), QUERY, "--mode", mode, "-f", "jsonl"]
            variants = {
                mode: base,
                f"{mode} --where 1%": [*base, "--where", FILTER],
                f"{mode} --where 1% via DuckDB": [*base, "--where", DUCKDB_FILTER],
            }
            results["cold_query"].update(alternated(args.runs, variants))
        results["1000_queries"] = {}
        for mode in () if args.no_batch else ("dense", "lexical", "hybrid"):
            base = [DSEARCH, "query", str(index), "--queries", str(queries), "--mode", mode, "-f", "trec"]
            for label, extra in (("", []), (" --where 1%", ["--where", FILTER])):
                batch = median_of(max(3, args.runs // 2), [*base, *extra])
                batch["queries_per_s"] = round(1000 / batch["median_s"], 1)
                results["1000_queries"][mode + label] = batch
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
