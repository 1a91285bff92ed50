"""ANN index types against the exact flat scan, measured in the same run (issue 11).

    python benchmarks/ann_bench.py --vectors /work/ann-data/scifact_sentences.npy --scale real --work /work/ann-data/b
    python benchmarks/ann_bench.py --vectors /work/ann-data/scifact_sentences.npy --scale 1000000 --types flat,ivf,ivfpq

``--vectors`` is a float32 .npy of real embeddings (encoded once with dsearch's encoder; see RESULTS.md).
A scale above their count is synthesised from them: row i is real row (i mod n) plus gaussian noise of
standard deviation ``--noise`` per dimension, re-normalised (a cosine model's vectors are unit length), so the
synthetic corpus keeps the real one's cluster structure while no two rows are equal.

Per index type it builds a real dsearch index directory (manifest, raw vectors, Parquet passages, ANN file)
through the library's own code (``indexer.build_segment_index``), then measures: build time, size on disk,
recall@10 against exact search on 1,000 of the index's own vectors (own row excluded; what the manifest
records), single-query and batched (256) ms/query in-process, and a cold ``dsearch query`` process's wall time
and peak RSS (``/usr/bin/time``-style, via ``getrusage``). The flat row is the baseline of the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from dsearch.indexer import build_segment_index, library_versions, model_info  # noqa: E402
from dsearch.manifest import Manifest  # noqa: E402
from dsearch.store import FlatVectors, SegmentWriter, file_info  # noqa: E402
from dsearch.vector_index import FlatIndex, exact_truth, measure_recall, sample_rows  # noqa: E402


def synthesise(real: np.ndarray, n: int, noise: float, seed: int = 0) -> np.ndarray:
    """``n`` vectors: the real ones, then noisy re-normalised copies of them (see the module docstring)."""
    if n <= len(real):
        return real[:n]
    rng = np.random.default_rng(seed)
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    out[: len(real)] = real
    for start in range(len(real), n, 65536):
        end = min(n, start + 65536)
        block = real[np.arange(start, end) % len(real)] + rng.normal(0, noise, (end - start, real.shape[1]))
        out[start:end] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def write_index(directory: Path, vectors: np.ndarray, info) -> None:
    """A flat dsearch index of these vectors (passages are placeholders named p<row>)."""
    import datetime as dt

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    writer = SegmentWriter(directory / "seg-bench", vectors.shape[1])
    for start in range(0, len(vectors), 10000):
        chunk = vectors[start : start + 10000]
        rows = [
            {"id": f"p{start + i}", "title": None, "text": f"passage {start + i}", "source": "bench",
             "fields": None, "content_hash": ""}
            for i in range(len(chunk))
        ]
        writer.add(rows, chunk)
    segment = writer.close()
    manifest = Manifest(
        model=info, index_type="IndexFlatIP", rows=segment.rows, segments=[segment],
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), versions=library_versions(),
    )
    (directory / "manifest.json").write_text(manifest.to_json())


def set_type(directory: Path, requested: str, memory: int | None) -> float:
    """Build the ANN file of the index for ``requested`` (the library's reindex path); returns build seconds."""
    from dsearch.manifest import read_manifest

    manifest = read_manifest(directory)
    segment = manifest.segments[0]
    for name in [n for n in segment.files if n.startswith("ann-")]:
        (directory / segment.path / name).unlink()
        del segment.files[name]
    started = time.perf_counter()
    manifest.index_type, manifest.index_params = build_segment_index(
        directory / segment.path, segment, requested, memory
    )
    seconds = time.perf_counter() - started
    segment.files["index.faiss"] = file_info(directory / segment.path / "index.faiss")
    (directory / "manifest.json").write_text(manifest.to_json())
    return seconds


def _holds(directory: Path, n: int, dim: int) -> bool:
    """True when ``directory`` is a bench index of n x dim vectors (``--keep-index``)."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("rows") == n and manifest.get("model", {}).get("dim") == dim


def ms_per_query(index, queries: np.ndarray, batch: int, repeat_s: float = 3.0) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < repeat_s:
        for start in range(0, len(queries), batch):
            index.search(queries[start : start + batch], 10)
            done += len(queries[start : start + batch])
            if time.perf_counter() - started >= repeat_s:
                break
    return (time.perf_counter() - started) * 1000 / done


def cold_query(directory: Path, like: str | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a fresh ``dsearch query`` process, from ``/usr/bin/time`` (median of 3).

    ``like``: query with ``--like ID`` (a stored vector, no model loaded) instead of a text; what an index whose
    dimension is not the bundled model's (the synthesised 768-d sets) allows.
    """
    query = ["--like", like] if like else ["effects of vitamin D on bone density"]
    cmd = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-m", "dsearch", "query", str(directory), *query,
           "-k", "10", "--format", "ids"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    runs = []
    for _ in range(3):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        wall, kb = done.stderr.strip().splitlines()[-1].split()[1:]
        runs.append((float(wall), float(kb) / 1024))
    walls = sorted(r[0] for r in runs)
    return walls[1], max(r[1] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", required=True)
    parser.add_argument("--scale", default="real", help="'real' or a number of vectors")
    parser.add_argument("--types", default="flat,hnsw,ivf,ivfpq")
    parser.add_argument("--noise", type=float, default=0.02)
    parser.add_argument("--memory", default=None, help="--memory for auto/ivfpq, e.g. 2G")
    parser.add_argument("--work", default="/work/ann-data/bench")
    parser.add_argument("--queries", type=int, default=200, help="held-out query vectors for speed")
    parser.add_argument("--json", default=None, help="append one JSON line per row to this file")
    parser.add_argument("--query-vectors", default=None, help="held-out query vectors (.npy) instead of noisy rows")
    parser.add_argument("--keep-index", action="store_true",
                        help="reuse the work directory's index when it already holds these n x dim vectors")
    args = parser.parse_args()

    from dsearch.encoder import load_encoder
    from dsearch.vector_index import parse_memory

    real = np.load(args.vectors, mmap_mode="r")
    n = len(real) if args.scale == "real" else int(args.scale)
    vectors = synthesise(np.asarray(real, dtype=np.float32), n, args.noise)
    # Speed queries: noisy copies of real rows (not rows of the index, so no query finds itself at score 1).
    rng = np.random.default_rng(7)
    picks = rng.choice(len(real), args.queries, replace=False)
    queries = np.asarray(real[picks], dtype=np.float32) + rng.normal(0, 0.05, (args.queries, real.shape[1]))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    if args.query_vectors:
        queries = np.asarray(np.load(args.query_vectors), dtype=np.float32)
    info = model_info(load_encoder(None, "auto"))
    like = None
    if vectors.shape[1] != info.dim:  # synthesised at another dimension: no model can query it; --like can
        info = dataclasses.replace(info, dim=vectors.shape[1])
        like = "p12345"
    directory = Path(args.work) / f"idx-{n}"
    started = time.perf_counter()
    if not (args.keep_index and _holds(directory, n, vectors.shape[1])):
        write_index(directory, vectors, info)
    print(f"# {n} x {vectors.shape[1]} vectors written in {time.perf_counter() - started:.1f} s; "
          f"load {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    del vectors
    memory = parse_memory(args.memory) if args.memory else None
    raw = FlatVectors(directory / "seg-bench" / "index.faiss")
    sample = sample_rows(raw.ntotal, 1000, 1)
    truth = exact_truth(raw, sample)
    flat_single = flat_batched = None
    print("| type | factory, knobs | build s | size on disk MB | recall@10 (own-vector sample) | recall@10 (held-out "
          "queries) | ms/query single | ms/query batch 256 | × flat single | cold query s | query RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.types.split(","):
        seconds = set_type(directory, kind, memory)
        from dsearch.store import OpenIndex

        opened = OpenIndex(directory)
        seg = opened.segments[0]
        index = seg.ann if seg.ann is not None else FlatIndex(seg.vectors)
        from dsearch.vector_index import recall_at_k

        def ranked(scores_rows):
            scores, rows = scores_rows
            order = np.argsort(-scores, axis=1)
            return np.take_along_axis(rows, order, 1)

        held_out = recall_at_k(ranked(FlatIndex(seg.vectors).search(queries, 10)), ranked(index.search(queries, 10)))
        own = measure_recall(index, raw, {}, sample, truth)
        single = ms_per_query(index, queries, 1)
        batched = ms_per_query(index, queries, 256)
        if kind == "flat":
            flat_single, flat_batched = single, batched
        size = sum((directory / "seg-bench" / name).stat().st_size for name in seg.segment.files)
        params = opened.manifest.index_params
        knobs = ", ".join(f"{k} {params[k]}" for k in ("nprobe", "efSearch") if k in params)
        wall, rss = cold_query(directory, like)
        ratio = f"{flat_single / single:.1f}" if flat_single else "–"
        row = {
            "n": n, "dim": raw.d, "type": opened.manifest.index_type, "factory": params.get("factory", "exact"),
            "knobs": knobs, "build_s": round(seconds, 1), "size_mb": round(size / 1e6, 1),
            "recall_own": round(own, 4), "recall_heldout": round(held_out, 4), "ms_single": round(single, 3),
            "ms_batched": round(batched, 4), "x_flat_single": ratio, "cold_s": round(wall, 2),
            "rss_mb": round(rss), "load": round(os.getloadavg()[0], 2),
        }
        print(f"| {row['type']} | {row['factory']}{', ' + knobs if knobs else ''} | {row['build_s']} | "
              f"{row['size_mb']} | {row['recall_own']} | {row['recall_heldout']} | {row['ms_single']} | "
              f"{row['ms_batched']} | {ratio} | {row['cold_s']} | {row['rss_mb']} |", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        del opened, seg, index
    print(f"# flat baseline same run: {flat_single} ms single, {flat_batched} ms batched; "
          f"load at end {os.getloadavg()[0]:.2f}; peak RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
