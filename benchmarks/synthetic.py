"""Indexes with real passages and random vectors, written through dsearch's own writer, for benchmarks whose
figures do not depend on the vectors' values (query latency, no-op updates). Building them takes seconds where
encoding 100k passages would take an hour on this machine."""

from __future__ import annotations

import json
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import numpy as np

from dsearch.corpus import Passage
from dsearch.encoder import load_encoder
from dsearch.indexer import describe_sources, model_info, new_manifest
from dsearch.store import SegmentWriter, content_hash, passage_row, publish, staging_area

SCIFACT = Path(__file__).resolve().parent.parent.parent / "shared" / "eval" / "scifact"


def scifact_sentences(limit: int) -> list[tuple[str, str]]:
    """(id, sentence) pairs from SciFact abstracts, repeated with new ids until there are ``limit``."""
    out: list[tuple[str, str]] = []
    rounds = 0
    while len(out) < limit:
        for line in open(SCIFACT / "corpus.jsonl"):
            row = json.loads(line)
            for number, sentence in enumerate(row["text"].split(". ")):
                if len(sentence) > 20:
                    out.append((f"{row['_id']}-{number}-{rounds}", sentence))
                if len(out) == limit:
                    return out
        rounds += 1
    return out


def scifact_abstracts(limit: int) -> list[dict[str, str]]:
    """The first ``limit`` SciFact documents as the collection has them (id, title, text): real passages of about
    215 words, most longer than the default model's window."""
    rows = [json.loads(line) for line in islice(open(SCIFACT / "corpus.jsonl"), limit)]
    if len(rows) < limit:
        raise SystemExit(f"SciFact has {len(rows)} documents, fewer than {limit}")
    return [{"id": row["_id"], "title": row["title"], "text": row["text"]} for row in rows]


def corpus_rows(kind: str, limit: int) -> list[str]:
    """JSONL lines of ``limit`` passages: ``sentences`` (short, from ``scifact_sentences``) or ``abstracts``."""
    if kind == "abstracts":
        return [json.dumps(row) + "\n" for row in scifact_abstracts(limit)]
    return [json.dumps({"id": pid, "title": "SciFact", "text": text}) + "\n" for pid, text in scifact_sentences(limit)]


def write_random_index(target: Path, passages: Iterable[Passage], sources: list[str] | None = None) -> None:
    """An index of ``passages`` for the bundled model at its default precision, with random unit vectors.

    Loading the encoder also caches its ONNX export, which the measured queries then use.
    """
    info = model_info(load_encoder(None, "auto"))
    rng = np.random.default_rng(0)
    passages = iter(passages)
    with staging_area(target) as staging:
        writer = SegmentWriter(staging.segment_dir, info.dim)
        while chunk := list(islice(passages, 5000)):
            vectors = rng.standard_normal((len(chunk), info.dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            writer.add([passage_row(p, content_hash(p.encoder_text)) for p in chunk], vectors)
        segment = writer.close()
        publish(staging, new_manifest(info, segment, {"sources": describe_sources(sources or [])}, {}))


def add_lexical(target: Path) -> None:
    """Give the one-segment index at ``target`` its BM25 files (``write_random_index`` writes vectors and metadata
    only), for benchmarks of the lexical and hybrid modes."""
    from dsearch.lexical import build_lexical
    from dsearch.manifest import MANIFEST_FILE, read_manifest
    from dsearch.store import PASSAGES_FILE, file_info

    manifest = read_manifest(target)
    segment = manifest.segments[0]
    for name in build_lexical(target / segment.path, PASSAGES_FILE):
        segment.files[name] = file_info(target / segment.path / name)
    manifest.corpus["lexical"] = True
    (target / MANIFEST_FILE).write_text(manifest.to_json())
