"""What ``--update`` costs on an ANN index: reusing the trained structure against a full reindex (issue 11).

    python benchmarks/ann_update.py --index /work/ann-data/b768/idx-1000000 --change 0.01

``--index`` is an index directory with an ANN file (what ``ann_bench.py`` leaves behind: its last type). The
script makes the rows an update would publish: ``--change`` of the rows removed, as many re-encoded (their
vectors replaced by noisy versions of other rows) and as many new ones inserted at random places, each
re-normalised — so every row after the first change renumbers, as in a real update. It writes them as a new
raw vector store and builds the ANN file twice with the library's own ``indexer.build_segment_index``:
with the old ANN file as ``previous`` (what ``dsearch index --update`` now does) and without it (a full
``dsearch reindex``: training included). Both figures include the build-time recall measurement and tuning;
neither includes reading the corpus or encoding (the same for both). "Structure" is the part before the
recall measurement: training (full reindex only), adding, writing the file. Recall@10 of each is what the
manifest would record.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from dsearch.indexer import build_segment_index  # noqa: E402
from dsearch.manifest import read_manifest  # noqa: E402
from dsearch.store import FlatIndexFileWriter, FlatVectors  # noqa: E402
from dsearch.vector_index import Previous, ann_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True)
    parser.add_argument("--change", type=float, default=0.01, help="fraction removed, re-encoded and added each")
    parser.add_argument("--work", default=None, help="where the new rows go [default: beside the index]")
    parser.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    args = parser.parse_args()
    directory = Path(args.index)
    manifest = read_manifest(directory)
    segment = manifest.segments[0]
    old = FlatVectors(directory / segment.path / "index.faiss")
    name = ann_file(segment.files)
    assert name is not None, "the index has no ANN file"
    rng = np.random.default_rng(5)
    n, change = old.ntotal, int(old.ntotal * args.change)
    kept = np.sort(rng.choice(n, n - change, replace=False))  # the removed rows are the others
    changed = set(rng.choice(len(kept), change, replace=False).tolist())  # positions in `kept` re-encoded
    inserts = set(rng.choice(n, change, replace=False).tolist())  # before which new position a new row goes
    work = Path(args.work or directory.parent / "update-bench")
    shutil.rmtree(work, ignore_errors=True)
    seg_dir = work / "seg-new"
    seg_dir.mkdir(parents=True)
    writer = FlatIndexFileWriter(seg_dir / "index.faiss", old.d)
    old_rows: list[int] = []

    def fresh(count: int) -> np.ndarray:
        """Vectors like the corpus's: other rows plus noise, re-normalised."""
        block = old.take(np.sort(rng.integers(0, n, count))) + rng.normal(0, 0.05, (count, old.d))
        return (block / np.linalg.norm(block, axis=1, keepdims=True)).astype(np.float32)

    for start in range(0, len(kept), 65536):
        rows = kept[start : start + 65536]
        vectors = old.take(rows)
        source = rows.copy()
        redo = [i for i in range(len(rows)) if start + i in changed]
        if redo:
            vectors[redo] = fresh(len(redo))
            source[redo] = -1
        before = np.array([start + i in inserts for i in range(len(rows))])  # a new row goes before these
        positions = np.arange(len(rows)) + np.cumsum(before)  # where each kept row lands in this block
        block = np.empty((len(rows) + int(before.sum()), old.d), dtype=np.float32)
        block_rows = np.full(len(block), -1, dtype=np.int64)
        block[positions], block_rows[positions] = vectors, source
        new = np.setdiff1d(np.arange(len(block)), positions)
        if len(new):
            block[new] = fresh(len(new))
        writer.add(block)
        old_rows.extend(block_rows.tolist())
    writer.close()
    rows = len(old_rows)
    print(f"# {n} -> {rows} rows: {change} removed, {len(changed)} re-encoded, {len(inserts)} inserted; "
          f"load {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    previous = Previous(
        directory / segment.path / name, manifest.index_type, manifest.index_params, n, np.asarray(old_rows)
    )
    requested = manifest.index_params.get("requested", manifest.index_type)
    print("| path | factory, knobs | reused | seconds | of which structure s | recall@10 (own-vector sample) |")
    print("|---|---|---|---|---|---|")
    results = {}
    for label, prev in (("--update (reuse)", previous), ("full reindex", None)):
        target = SimpleNamespace(rows=rows, files={})
        started = time.perf_counter()
        kind, params = build_segment_index(seg_dir, target, requested, None, prev)
        seconds = time.perf_counter() - started
        knobs = ", ".join(f"{k} {params[k]}" for k in ("nprobe", "efSearch") if k in params)
        reused = "yes" if params.get("reused") else "no"
        print(f"| {label} | {params['factory']}, {knobs} | {reused} | {seconds:.1f} | {params['build_seconds']:.1f} | "
              f"{params['recall_at_10']} |", flush=True)
        results[label] = {"seconds": round(seconds, 1), "structure_s": params["build_seconds"],
                          "recall": params["recall_at_10"], "knobs": knobs,
                          "factory": params["factory"], "reused": bool(params.get("reused"))}
        for file in target.files:
            (seg_dir / file).unlink()
    ratio = results["full reindex"]["seconds"] / results["--update (reuse)"]["seconds"]
    print(f"# full reindex / update: {ratio:.1f}x; load at end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps({"n": n, "rows": rows, "type": manifest.index_type, **results}) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
