"""A tiny deterministic encoder for fast tests: a hashed bag of words.

It is injected through ``dsearch.cli.Deps`` (or passed to library calls), never patched into production code.
"""

from __future__ import annotations

import os
import re
import time

import numpy as np
import xxhash

WORD = re.compile(r"\w+")


class HashingEncoder:
    """Each word adds 1 to a hashed dimension. Words shared by query and passage raise the score."""

    precision = "fp32"

    def __init__(
        self,
        name: str | None = "hash-test",
        dim: int = 64,
        similarity: str = "cosine",
        max_seq_length: int = 40,
        fail_after_batches: int | None = None,
        query_delay: float = 0.0,
    ) -> None:
        self.name = name or "hash-test"
        self.dim = dim
        self.similarity = similarity
        self.max_seq_length = max_seq_length
        self.prompts: dict[str, str] = {}
        self.fingerprint = f"hashing-{dim}-{similarity}"
        self.fail_after_batches = fail_after_batches
        self.query_delay = query_delay
        self.batches = 0
        self.encoded_documents = 0

    @property
    def max_text_tokens(self) -> int:
        return self.max_seq_length - 2

    def _vector(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        for word in WORD.findall(text.lower())[: self.max_seq_length]:
            v[xxhash.xxh32_intdigest(word.encode()) % self.dim] += 1.0
        if self.similarity == "cosine":
            norm = np.linalg.norm(v)
            if norm > 0:
                v /= norm
        return v

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        self.batches += 1
        if self.fail_after_batches is not None and self.batches > self.fail_after_batches:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        self.encoded_documents += len(texts)
        return np.stack([self._vector(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        if self.query_delay:
            time.sleep(self.query_delay)  # a slow model: requests stay in flight long enough to test shutdown
        return np.stack([self._vector(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def count_truncated(self, texts: list[str]) -> int:
        return sum(len(WORD.findall(t)) > self.max_seq_length for t in texts)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"\S+", text)]


def hashing_encoder(name: str | None = None, **options: object) -> HashingEncoder:
    """The factory a ``dsearch`` subprocess loads with ``DSEARCH_TEST_ENCODER=fakes:hashing_encoder``;
    ``DSEARCH_TEST_QUERY_DELAY=SECONDS`` makes each query batch take that long."""
    return HashingEncoder(name, query_delay=float(os.environ.get("DSEARCH_TEST_QUERY_DELAY", "0")))
