"""Synthesise N × 2d vectors from d-dimensional real embeddings by rotated concatenation (issue 11, 1M × 768).

    python benchmarks/synth_concat.py --vectors /work/ann-data/scifact_sentences.npy --n 1000000 \
        --out /work/ann-data/concat-1m-768.npy --queries-out /work/ann-data/concat-1m-768-queries.npy

Row i is ``normalise([R1·a_i + e1, R2·b_i + e2])`` where ``a_i`` is a real vector drawn at random (with
replacement), ``b_i`` one of ``a_i``'s ``--neighbours`` nearest real vectors (drawn at random; found with an
IVF1024,Flat index probed 32 lists deep, near enough for this), ``R1`` and ``R2`` two fixed random orthogonal
d × d matrices (so the two halves are not the same coordinates twice), and ``e1``, ``e2`` gaussian noise of
standard deviation ``--noise`` a dimension. Inner products of unit rows are then about ``(a·a' + b·b') / 2``,
so a row's neighbours are the rows built from the same real neighbourhood: the real cluster structure, with
graded similarities inside it. Unlike noisy copies of one real vector (the first 1M set, where a row's top 10
were mostly its own copies, all in one IVF list: recall 0.98 at nprobe 2), no two rows share both halves
unless they drew the same pair, so a row's top 10 are distinct near-ties; unlike random pairs of unrelated
vectors (tried first: a row's top 10 were then rows sharing one half, spread over every list, so that IVF
needed nprobe = nlist), they lie in one region. The held-out queries are made the same way from fresh draws
and fresh noise: they are not rows of the index (a query's pair is also some row's pair in about a quarter of
cases, then with other noise).
"""

from __future__ import annotations

import argparse

import numpy as np


def rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal d × d matrix (QR of a gaussian matrix, signs fixed so it is uniformly distributed)."""
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def neighbours(real: np.ndarray, k: int) -> np.ndarray:
    """Each real row's k nearest other rows (approximate: IVF1024,Flat, nprobe 32)."""
    import faiss

    index = faiss.index_factory(real.shape[1], "IVF1024,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(real[np.random.default_rng(0).choice(len(real), 65536, replace=False)])
    index.add(real)
    faiss.extract_index_ivf(index).nprobe = 32
    _, rows = index.search(real, k + 1)
    out = np.empty((len(real), k), dtype=np.int64)
    for i, found in enumerate(rows):
        others = [r for r in found if r != i and r >= 0][:k]
        out[i] = others + [others[-1]] * (k - len(others))
    return out


def make(real: np.ndarray, near: np.ndarray, n: int, rots: tuple[np.ndarray, np.ndarray], noise: float,
         rng: np.random.Generator, out: np.ndarray, block: int = 65536) -> None:
    """Fill ``out`` (n × 2d) with rotated concatenations of real rows and their neighbours, block by block."""
    d = real.shape[1]
    for start in range(0, n, block):
        end = min(n, start + block)
        first = rng.integers(0, len(real), end - start)
        second = near[first, rng.integers(0, near.shape[1], end - start)]
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
    parser.add_argument("--neighbours", type=int, default=32, help="b is one of a's this many nearest")
    args = parser.parse_args()
    real = np.asarray(np.load(args.vectors, mmap_mode="r"), dtype=np.float32)
    rng = np.random.default_rng(args.seed)
    rots = (rotation(real.shape[1], rng), rotation(real.shape[1], rng))
    out = np.lib.format.open_memmap(args.out, mode="w+", dtype=np.float32, shape=(args.n, 2 * real.shape[1]))
    near = neighbours(real, args.neighbours)
    make(real, near, args.n, rots, args.noise, rng, out)
    out.flush()
    queries = np.empty((args.queries, 2 * real.shape[1]), dtype=np.float32)
    make(real, near, args.queries, rots, args.noise, rng, queries)
    np.save(args.queries_out, queries)
    print(f"{args.n} x {2 * real.shape[1]} -> {args.out}; {args.queries} held-out queries -> {args.queries_out}")


if __name__ == "__main__":
    main()
