"""`dsearch index --ray` against a local build on the same passages, in one run, and the driver's ingest ceiling.

    python benchmarks/ray_bench.py [--passages 5000] [--workers 2] [--precision auto] [--scifact DIR]

1. A local Ray cluster with as many CPUs as this machine (benchmarks/ray_cluster.py).
2. The same corpus (SciFact sentences, as in the other benchmarks) indexed by `dsearch index` locally and with
   `--ray --workers N`, whole process each, after one warm-up build that caches the ONNX export. Overhead = Ray
   wall time / local wall time - 1.
3. The driver's ingest rate: the same build in-process with a chunk encoder that returns zero vectors at once, so
   what is timed is everything the driver does besides encoding (reading, hashing, windows, writing FAISS and
   Parquet, checkpoints, publishing). A cluster saturates the driver when its workers together encode faster.
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


def timed_index(args: list[str]) -> tuple[float, dict]:
    started = time.perf_counter()
    result = subprocess.run([*DSEARCH, "index", *args, "--json"], capture_output=True, text=True)
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


def driver_ingest(corpus: Path, target: Path, precision: str) -> tuple[float, dict]:
    from dsearch.encoder import load_encoder
    from dsearch.indexer import build_index

    encoder = load_encoder(None, precision)  # loaded before the clock starts: the driver loads it once too
    started = time.perf_counter()
    summary = build_index([str(corpus)], target, encoder, chunk_encoder=ZeroVectors())
    return time.perf_counter() - started, summary.as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--ingest-passages", type=int, default=50_000, help="passages for the driver's ingest rate")
    parser.add_argument("--scifact", type=Path, default=synthetic.SCIFACT, help="BEIR SciFact folder")
    args = parser.parse_args()
    synthetic.SCIFACT = args.scifact
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        corpus = tmp / "corpus.jsonl"
        sentences = synthetic.scifact_sentences(max(args.passages, args.ingest_passages))
        rows = [json.dumps({"id": pid, "title": "SciFact", "text": text}) + "\n" for pid, text in sentences]
        corpus.write_text("".join(rows[: args.passages]))
        common = ["--precision", args.precision]
        timed_index([str(corpus), "-o", str(tmp / "warm"), *common])  # caches the ONNX export for both runs
        local_s, local = timed_index([str(corpus), "-o", str(tmp / "local"), *common])
        cpus = os.cpu_count() or 2
        with local_cluster(cpus=cpus) as address:
            ray_args = ["--ray", "--ray-address", address, "--workers", str(args.workers)]
            ray_s, ray = timed_index([str(corpus), "-o", str(tmp / "ray"), *common, *ray_args])
        big = tmp / "big.jsonl"
        big.write_text("".join(rows[: args.ingest_passages]))
        ingest_s, ingest = driver_ingest(big, tmp / "ingest", args.precision)
        # Whole abstracts: most are longer than the model's window, so the driver tokenizes and cuts windows.
        abstracts_s, abstracts = driver_ingest(args.scifact / "corpus.jsonl", tmp / "abstracts", args.precision)

    per_worker = ray["passages_per_second"] / args.workers
    driver_rate = ingest["indexed"] / ingest_s
    print(f"machine: {cpus} CPUs; {args.passages} SciFact sentences; precision {local['precision']}")
    print("| run | wall s | passages/s (summary) |")
    print("|---|---|---|")
    print(f"| local `dsearch index` | {local_s:.1f} | {local['passages_per_second']:.1f} |")
    print(f"| `--ray --workers {args.workers}` (local cluster) | {ray_s:.1f} | {ray['passages_per_second']:.1f} |")
    print(f"overhead of --ray: {100 * (ray_s / local_s - 1):+.1f}% of the local wall time")
    print(
        f"driver ingest, no encoding: {ingest['indexed']} passages ({ingest['windows']} vectors) in {ingest_s:.1f} s "
        f"= {driver_rate:.0f} passages/s, {ingest['windows'] / ingest_s:.0f} vectors/s"
    )
    print(
        f"driver ingest, no encoding, whole SciFact abstracts: {abstracts['indexed']} passages "
        f"({abstracts['windows']} vectors) in {abstracts_s:.1f} s = {abstracts['indexed'] / abstracts_s:.0f} "
        f"passages/s, {abstracts['windows'] / abstracts_s:.0f} vectors/s"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (this machine has {cpus} CPUs, shared)")
    print(
        f"one worker here: {per_worker:.1f} passages/s, so the driver saturates at about "
        f"{driver_rate / per_worker:.0f} such workers"
    )


if __name__ == "__main__":
    main()
