"""Synthesise N × 2d vectors from d-dimensional real embeddings by rotated concatenation (issue 11, 1M × 768).

    python benchmarks/synth_concat.py --vectors /work/ann-data/scifact_sentences.npy --n 1000000 \
        --out /work/ann-data/concat-1m-768.npy --queries-out /work/ann-data/concat-1m-768-queries.npy

Row i is ``normalise([R1·a_i + e1, R2·b_i + e2])`` where ``a_i`` and ``b_i`` are two different real vectors
drawn at random (with replacement) from the real set, ``R1`` and ``R2`` are two fixed random orthogonal d × d
matrices (so the two halves are not the same coordinates twice) and ``e1``, ``e2`` are gaussian noise of
standard deviation ``--noise`` a dimension. Inner products of unit rows are then about
``(a·a' + b·b') / 2``: a row's neighbours are rows whose *both* halves lie near its halves in the real
embedding space, or rows sharing one half (noisy) with a related other half. Unlike noisy copies of one real
vector (the first 1M set, where a row's top 10 were mostly its own copies, all in one IVF list), the
neighbourhoods here are spread over many lists, so recall is not trivially easy. The held-out queries are
made the same way from fresh pairs and fresh noise: they are not rows of the index.
"""

from __future__ import annotations

import argparse

import numpy as np


def rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal d × d matrix (QR of a gaussian matrix, signs fixed so it is uniformly distributed)."""
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def make(real: np.ndarray, n: int, rots: tuple[np.ndarray, np.ndarray], noise: float, rng: np.random.Generator,
         out: np.ndarray, block: int = 65536) -> None:
    """Fill ``out`` (n × 2d) with rotated concatenations of random pairs of real rows, block by block."""
    d = real.shape[1]
    for start in range(0, n, block):
        end = min(n, start + block)
        first = rng.integers(0, len(real), end - start)
        second = (first + rng.integers(1, len(real), end - start)) % len(real)  # never the same row twice
        left = real[first] @ rots[0].T + rng.normal(0, noise, (end - start, d)).astype(np.float32)
        right = real[second] @ rots[1].T + rng.normal(0, noise, (end - start, d)).astype(np.float32)
        both = np.concatenate([left, right], axis=1)
        out[start:end] = both / np.linalg.norm(both, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", required=True, help="real embeddings, float32 .npy")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--noise", type=float, default=0.02)
    parser.add_argument("--out", required=True)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--queries-out", required=True)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    real = np.asarray(np.load(args.vectors, mmap_mode="r"), dtype=np.float32)
    rng = np.random.default_rng(args.seed)
    rots = (rotation(real.shape[1], rng), rotation(real.shape[1], rng))
    out = np.lib.format.open_memmap(args.out, mode="w+", dtype=np.float32, shape=(args.n, 2 * real.shape[1]))
    make(real, args.n, rots, args.noise, rng, out)
    out.flush()
    queries = np.empty((args.queries, 2 * real.shape[1]), dtype=np.float32)
    make(real, args.queries, rots, args.noise, rng, queries)
    np.save(args.queries_out, queries)
    print(f"{args.n} x {2 * real.shape[1]} -> {args.out}; {args.queries} held-out queries -> {args.queries_out}")


if __name__ == "__main__":
    main()
