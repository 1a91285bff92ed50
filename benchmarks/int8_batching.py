"""int8 encoding speed: batches of 32 (the old way, vectors depend on batch-mates) against each passage alone.

    python benchmarks/int8_batching.py [--n 200] [--rounds 2]

In-process, steady state, the bundled model's cached int8 export (made on first use), interleaved rounds on two
passage sets: whole SciFact abstracts (title + text) and their first 40 words. Settings: batches of 32 sorted by
length on a session with one thread per core; each passage alone on that session; each passage alone on a
one-thread session, one passage per core side by side (what LeanEncoder does for int8). Prints passages/s.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnxruntime as ort

from dsearch import lean
from dsearch.encoder import load_encoder

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "eval" / "scifact" / "corpus.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scifact", type=Path, default=SCIFACT)
    args = parser.parse_args()
    encoder = load_encoder(None, "int8")
    assert isinstance(encoder, lean.LeanEncoder)
    docs = [json.loads(line) for line in open(args.scifact)][: args.n]
    sets = {
        "whole abstracts": [f"{d['title']} {d['text']}" for d in docs],
        "40-word passages": [" ".join(d["text"].split()[:40]) for d in docs],
    }
    cores = os.cpu_count() or 1

    def session(threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.enable_mem_pattern = False
        model = lean.lean_directory(encoder.fingerprint, "int8") / "model.onnx"
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    wide, narrow = session(cores), session(1)
    pool = ThreadPoolExecutor(cores)
    for round_ in range(args.rounds):
        for label, texts in sets.items():
            encodings = encoder.tokenizer.encode_batch(texts)
            for setting in ("batches of 32", "alone", f"alone, {cores} one-thread runs side by side"):
                started = time.perf_counter()
                if setting == "batches of 32":
                    encoder.session = wide
                    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
                    for start in range(0, len(order), 32):
                        encoder._run([encodings[i] for i in order[start : start + 32]])
                elif setting == "alone":
                    encoder.session = wide
                    for e in encodings:
                        encoder._run([e])
                else:
                    encoder.session = narrow
                    list(pool.map(lambda e: encoder._run([e]), encodings))
                rate = len(encodings) / (time.perf_counter() - started)
                print(f"round {round_ + 1} | {label} | {setting} | {rate:.1f} passages/s", flush=True)


if __name__ == "__main__":
    main()
