"""`dsearch index --ray` against a local build on the same passages, in one run, and the driver's ingest ceiling.

    python benchmarks/ray_bench.py [--passages 5000] [--corpus sentences|abstracts] [--workers 2] [--precision auto]
        [--repeat 2] [--scifact DIR]

1. The same corpus (SciFact sentences, as in the other benchmarks, or whole SciFact documents) indexed by
   `dsearch index` locally and with `--ray --workers N` (Ray Data map_batches over an actor pool), whole process
   each, after one warm-up build that caches the ONNX export; `--repeat` pairs, local then Ray, so that both see
   the same load. The Ray build joins a local cluster with as many CPUs as this machine (benchmarks/ray_cluster.py),
   started before and stopped after each Ray build, so that its idle daemons do not slow the local build.
   Overhead = Ray wall time / local wall time - 1, per pair and for the sums.
2. The driver's ingest rate: the same build in-process with a chunk encoder that returns zero vectors at once, so
   what is timed is everything the driver does besides encoding (reading, hashing, windows, writing FAISS and
   Parquet, checkpoints, publishing). A cluster saturates the driver when its workers together encode faster.
3. The same through Ray Data: the `--ray` executor with workers that return zero vectors, so what is timed is
   the driver's work plus Ray Data's (the actor pool, shipping texts out and vectors back).
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
import synthetic  # noqa: E402
from ray_cluster import local_cluster  # noqa: E402

DSEARCH = [sys.executable, "-m", "dsearch"]


def timed_index(args: list[str], env: dict[str, str] | None = None) -> tuple[float, dict]:
    started = time.perf_counter()
    result = subprocess.run([*DSEARCH, "index", *args, "--json"], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"dsearch index {' '.join(args)} failed: {result.stderr}")
    return seconds, json.loads(result.stdout)


class ZeroVectors:
    """A chunk encoder that encodes nothing: zero vectors, at once."""

    depth = 0
    workers = None

    def submit(self, encoder, texts):
        import numpy as np

        return np.zeros((len(texts), encoder.dim), dtype=np.float32)

    def result(self, handle):
        return handle

    def close(self):
        pass


class ZeroWorker:
    """Ray Data's callable class for the Ray ingest run: no model, zero vectors."""

    def __init__(self, spec) -> None:
        self.dim = spec.dim

    def __call__(self, batch):
        import pyarrow as pa

        sizes = [len(chunk) for chunk in batch["texts"].to_pylist()]
        vectors = [bytes(4 * self.dim * size) for size in sizes]  # float32 zeros, as _Worker sends its vectors
        return pa.table({"chunk": batch["chunk"], "vectors": vectors, "error": [""] * len(sizes)})


def driver_ingest(corpus: Path, target: Path, precision: str, chunk_encoder=None) -> tuple[float, dict]:
    from dsearch.encoder import load_encoder
    from dsearch.indexer import build_index

    encoder = load_encoder(None, precision)  # loaded before the clock starts: the driver loads it once too
    started = time.perf_counter()
    summary = build_index([str(corpus)], target, encoder, chunk_encoder=chunk_encoder or ZeroVectors())
    return time.perf_counter() - started, summary.as_dict()


def ray_ingest(corpus: Path, target: Path, precision: str, workers: int, env: dict[str, str]) -> tuple[float, dict]:
    """``driver_ingest`` through the ``--ray`` executor, its workers encoding nothing (the clock includes joining
    the cluster, as a real build's does)."""
    from dsearch.distributed import RayEncoder

    cpus = os.cpu_count() or 2
    with local_cluster(cpus=cpus, env=env) as address:
        started = time.perf_counter()
        chunks = type("ZeroRay", (RayEncoder,), {"worker_class": ZeroWorker})(address, workers)
        connect_s = time.perf_counter() - started
        try:
            seconds, summary = driver_ingest(corpus, target, precision, chunks)
        finally:
            chunks.close()
    return seconds + connect_s, summary


def report(args: argparse.Namespace, cpus: int, load_before: float, pairs: list, baselines: list[float]) -> float:
    """The local/Ray pairs as a table (with the baseline's Ray build when there is one); one worker's rate."""
    precision = pairs[0][1]["precision"]
    print(f"machine: {cpus} CPUs; {args.passages} SciFact {args.corpus}; precision {precision}")
    print(f"Ray workers' nice value: {args.worker_niceness}; cluster: {'warm' if args.warm_cluster else 'fresh'}")
    print(f"load average (1 min) before the builds: {load_before:.2f}")
    base = f" baseline `--ray` wall s ({' '.join(args.baseline_env) or 'its defaults'}) | baseline vs local |"
    ray = f"`--ray --workers {args.workers}` wall s"
    head = f"| pair | local wall s |{base if baselines else ''} {ray} | Ray vs local |"
    print(f"{head} load average after |")
    print("|---" * (head.count("|") - 1) + "|---|")
    for i, (local_s, _, ray_s, _, load) in enumerate(pairs, 1):
        old = f" {baselines[i - 1]:.1f} | {100 * (baselines[i - 1] / local_s - 1):+.1f}% |" if baselines else ""
        print(f"| {i} | {local_s:.1f} |{old} {ray_s:.1f} | {100 * (ray_s / local_s - 1):+.1f}% | {load:.2f} |")
    local_total, ray_total = sum(p[0] for p in pairs), sum(p[2] for p in pairs)
    print(f"overhead of --ray over all pairs: {100 * (ray_total / local_total - 1):+.1f}% of the local wall time")
    if baselines:
        print(f"overhead of the baseline over all pairs: {100 * (sum(baselines) / local_total - 1):+.1f}%")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (this machine has {cpus} CPUs, shared)")
    return sum(p[3]["passages_per_second"] for p in pairs) / len(pairs) / args.workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=5000)
    parser.add_argument(
        "--corpus",
        choices=["sentences", "abstracts"],
        default="sentences",
        help="the timed builds' passages: SciFact sentences (short, about 25 words: the fixed costs weigh most) or "
        "the first N SciFact documents as they are (about 215 words; the ingest rates always use sentences)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeat", type=int, default=2, help="local/Ray pairs, one after the other")
    parser.add_argument(
        "--worker-niceness",
        type=int,
        default=0,
        help="the Ray workers' nice value (Ray's default is 15, which on a machine shared with other jobs gives "
        "them less CPU than the local build gets at 0)",
    )
    parser.add_argument("--ingest-passages", type=int, default=50_000, help="passages for the driver's ingest rate")
    parser.add_argument("--scifact", type=Path, default=synthetic.SCIFACT, help="BEIR SciFact folder")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="also time, in every pair, a Ray build by the dsearch in this src folder (e.g. the code before a "
        "change, from git archive), against a fresh cluster of its own as well",
    )
    parser.add_argument(
        "--baseline-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment for the baseline's build (e.g. DSEARCH_RAY_ROUND_CHUNKS=8 to force rounds)",
    )
    parser.add_argument(
        "--warm-cluster",
        action="store_true",
        help="before each timed Ray build, run a 64-passage Ray build on the same cluster, as on a cluster that "
        "has run a Ray Data job before (its detached helper actors are up); the default is a fresh cluster",
    )
    parser.add_argument("--no-ingest", action="store_true", help="skip the driver's ingest rates (parts 2 and 3)")
    args = parser.parse_args()
    synthetic.SCIFACT = args.scifact
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        corpus = tmp / "corpus.jsonl"
        passages = synthetic.corpus_rows(args.corpus, args.passages)
        corpus.write_text("".join(passages))
        common = ["--precision", args.precision]
        timed_index([str(corpus), "-o", str(tmp / "warm"), *common])  # caches the ONNX export for both runs
        cpus = os.cpu_count() or 2
        load_before = os.getloadavg()[0]
        niceness = {"RAY_worker_niceness": str(args.worker_niceness)}
        pairs, baselines = [], []
        small = tmp / "small.jsonl"
        small.write_text("".join(passages[:64]))

        def ray_build(name: str, env: dict[str, str] | None = None) -> tuple[float, dict]:
            """One timed Ray build against a cluster started for it (after a small one with --warm-cluster)."""
            # The cluster's workers import dsearch from the cluster's environment: the build's own PYTHONPATH.
            path = {"PYTHONPATH": env["PYTHONPATH"]} if env and "PYTHONPATH" in env else {}
            with local_cluster(cpus=cpus, env={**niceness, **path}) as address:
                ray_args = ["--ray", "--ray-address", address, "--workers", str(args.workers)]
                if args.warm_cluster:
                    timed_index([str(small), "-o", str(tmp / f"{name}-warm"), *common, *ray_args], env)
                return timed_index([str(corpus), "-o", str(tmp / name), *common, *ray_args], env)

        baseline_env = None
        if args.baseline_src:
            baseline_env = {**os.environ, "PYTHONPATH": str(args.baseline_src.resolve())}
            baseline_env.update(item.split("=", 1) for item in args.baseline_env)
        for i in range(args.repeat):
            local_s, local = timed_index([str(corpus), "-o", str(tmp / f"local{i}"), *common])
            if baseline_env is not None:
                baselines.append(ray_build(f"baseline{i}", baseline_env)[0])
            ray_s, ray = ray_build(f"ray{i}")
            pairs.append((local_s, local, ray_s, ray, os.getloadavg()[0]))
        if args.no_ingest:
            report(args, cpus, load_before, pairs, baselines)
            return
        big = tmp / "big.jsonl"
        big.write_text("".join(synthetic.corpus_rows("sentences", args.ingest_passages)))
        ingest_s, ingest = driver_ingest(big, tmp / "ingest", args.precision)
        # Whole abstracts: most are longer than the model's window, so the driver tokenizes and cuts windows.
        abstracts_s, abstracts = driver_ingest(args.scifact / "corpus.jsonl", tmp / "abstracts", args.precision)
        ray_ingest_s, ray_ingested = ray_ingest(big, tmp / "ray-ingest", args.precision, args.workers, niceness)

    per_worker = report(args, cpus, load_before, pairs, baselines)
    driver_rate = ingest["indexed"] / ingest_s
    print(
        f"driver ingest, no encoding: {ingest['indexed']} passages ({ingest['windows']} vectors) in {ingest_s:.1f} s "
        f"= {driver_rate:.0f} passages/s, {ingest['windows'] / ingest_s:.0f} vectors/s"
    )
    print(
        f"driver ingest, no encoding, whole SciFact abstracts: {abstracts['indexed']} passages "
        f"({abstracts['windows']} vectors) in {abstracts_s:.1f} s = {abstracts['indexed'] / abstracts_s:.0f} "
        f"passages/s, {abstracts['windows'] / abstracts_s:.0f} vectors/s"
    )
    print(
        f"driver ingest through Ray Data (--workers {args.workers} returning zero vectors): {ray_ingested['indexed']} "
        f"passages ({ray_ingested['windows']} vectors) in {ray_ingest_s:.1f} s = "
        f"{ray_ingested['windows'] / ray_ingest_s:.0f} vectors/s"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (this machine has {cpus} CPUs, shared)")
    print(
        f"one worker here: {per_worker:.1f} passages/s, so the driver saturates at about "
        f"{driver_rate / per_worker:.0f} such workers"
    )


if __name__ == "__main__":
    main()
