"""The lean encoder (ONNX Runtime + tokenizers + numpy) against sentence-transformers, and the choice of path."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE

from dsearch import lean
from dsearch.encoder import (
    LEAN_PRECISIONS,
    SentenceTransformerEncoder,
    choose_precision,
    cpu_flags,
    load_encoder,
)
from dsearch.indexer import build_index

pytestmark = pytest.mark.slow
SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "eval" / "scifact"


def scifact(n_docs: int) -> tuple[list[str], list[str]]:
    """SciFact abstracts and queries where ../shared/eval/scifact exists (real lengths), else the sample corpus."""
    if not SCIFACT.exists():
        docs = [json.loads(line) for line in (SAMPLE / "passages.jsonl").read_text().splitlines()[:n_docs]]
        queries = [line.split("\t", 1)[1] for line in (SAMPLE / "queries.tsv").read_text().splitlines()]
        return [f"{d['title']} {d['text']}" for d in docs], queries
    docs = [json.loads(line) for line in (SCIFACT / "corpus.jsonl").read_text().splitlines()[:n_docs]]
    queries = [json.loads(line)["text"] for line in (SCIFACT / "queries.jsonl").read_text().splitlines()]
    # Abstracts cut to 64 words keep the test quick; long texts are covered by the truncation case below.
    return [" ".join(f"{d['title']} {d['text']}".split()[:64]) for d in docs], queries


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("which", ["bundled", "tiny-seed"])
def test_lean_fp32_matches_sentence_transformers(which, tiny_seed_model):
    st = SentenceTransformerEncoder(None if which == "bundled" else str(tiny_seed_model))
    lean_encoder = lean.LeanEncoder(lean.export(st, "fp32"))
    docs, queries = scifact(300)
    long_texts = ["word " * 600, "short", ""]  # truncation at max_seq_length, and edge lengths
    st_docs, lean_docs = st.encode_documents(docs + long_texts), lean_encoder.encode_documents(docs + long_texts)
    st_queries, lean_queries = st.encode_queries(queries), lean_encoder.encode_queries(queries)
    assert cosines(st_docs[:-1], lean_docs[:-1]).min() >= 0.9999
    assert cosines(st_queries, lean_queries).min() >= 0.9999
    if st.similarity == "dot":  # raw vectors: the scale must match too, not just the direction
        np.testing.assert_allclose(lean_docs, st_docs, rtol=1e-3, atol=1e-4)
    st_top = np.argsort(-(st_queries @ st_docs[: len(docs)].T), axis=1, kind="stable")[:, :10]
    lean_top = np.argsort(-(lean_queries @ lean_docs[: len(docs)].T), axis=1, kind="stable")[:, :10]
    if which == "bundled":
        assert (st_top == lean_top).all()
    else:
        # Random weights leave many near-equal scores; compare the top-10 score profiles instead of ids.
        st_scores = np.take_along_axis(st_queries @ st_docs[: len(docs)].T, st_top, 1)
        lean_scores = np.take_along_axis(lean_queries @ lean_docs[: len(docs)].T, lean_top, 1)
        np.testing.assert_allclose(lean_scores, st_scores, rtol=1e-4)
    assert lean_encoder.count_truncated(long_texts) == st.count_truncated(long_texts) == 1


def test_lean_query_path_imports_no_torch(tmp_path):
    target = tmp_path / "idx"
    build_index([str(SAMPLE / "passages.jsonl")], target, load_encoder(None, "fp32"))
    code = (
        "import sys, json; from dsearch.cli import run; "
        f"rc = run(['query', {str(target)!r}, 'what causes the northern lights', '-k', '1', '--format', 'ids']); "
        "print(rc, [m for m in ('torch', 'sentence_transformers', 'transformers', 'faiss') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert result.stdout.splitlines() == ["astronomy-17", "0 []"], result.stderr


def test_cache_is_reused_without_loading_the_model(caplog):
    load_encoder(None, "fp32")  # ensures the export exists
    with caplog.at_level(logging.INFO, logger="dsearch"):
        encoder = load_encoder(None, "fp32")
    assert isinstance(encoder, lean.LeanEncoder)
    assert "using the cached fp32 ONNX export" in caplog.text


def test_model_that_cannot_be_exported_falls_back(tmp_path, tiny_seed_model, caplog):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    model = SentenceTransformer(str(tiny_seed_model), device="cpu")
    model.append(Dense(32, 16))
    model.save(str(tmp_path / "with-dense"))
    with caplog.at_level(logging.INFO, logger="dsearch"):
        encoder = load_encoder(str(tmp_path / "with-dense"), "int8")
    assert isinstance(encoder, SentenceTransformerEncoder) and encoder.dim == 16
    assert "module layout Transformer → Pooling → Dense" in caplog.text
    assert "using fp32 sentence-transformers" in caplog.text


def test_auto_precision_follows_the_cpu():
    assert choose_precision({"avx512f", "avx512_vnni"})[0] == "int8"
    assert choose_precision({"avx2"})[0] == "fp32"
    assert all(choose_precision(flags)[0] in LEAN_PRECISIONS for flags in ({"avx_vnni"}, set()))


def test_int8_query_vectors_do_not_depend_on_the_batch():
    """Dynamic int8 scales activations per batch; queries run alone so `query "x"` equals x in a file."""
    encoder = load_encoder(None, "int8")
    assert isinstance(encoder, lean.LeanEncoder) and encoder.precision == "int8"
    queries = ["vitamin D and bone fractures", "a much longer query about the role of stem cells in repair", "x"]
    together = encoder.encode_queries(queries)
    alone = np.stack([encoder.encode_queries([q])[0] for q in queries])
    assert np.array_equal(together, alone)


def _shuffled_encodings(encoder, texts: list[str], batch_size: int) -> np.ndarray:
    """The texts encoded in batches of ``batch_size`` in a shuffled order, put back in the original order."""
    import random

    order = list(range(len(texts)))
    random.Random(batch_size).shuffle(order)
    encoder.batch_size = batch_size
    vectors = encoder.encode_documents([texts[i] for i in order])
    out = np.empty_like(vectors)
    out[order] = vectors
    return out


@pytest.mark.parametrize("precision", ["auto", "int8", "fp32", "bf16"])
@pytest.mark.parametrize("which", ["bundled", "tiny-seed"])
def test_document_vectors_do_not_depend_on_their_batch(precision, which, tiny_seed_model):
    """Batches of 1, 7, 32 and 128 in shuffled orders give bitwise the same vectors, so --update, another
    --batch-size or a resumed run equal a full rebuild (int8 and bf16 used to move by up to 0.03)."""
    encoder = load_encoder(None if which == "bundled" else str(tiny_seed_model), precision)
    assert encoder.precision == (choose_precision(cpu_flags())[0] if precision == "auto" else precision)
    docs, _ = scifact(60)
    texts = [" ".join(t.split()[: 5 + i % 60]) for i, t in enumerate(docs)]  # mixed lengths: padding in a batch
    texts += ["word " * 600, "x"]  # truncated at max_seq_length, and a one-token text
    reference = _shuffled_encodings(encoder, texts, 1)
    assert np.isfinite(reference).all() and (np.linalg.norm(reference, axis=1) > 0).all()
    for batch_size in (7, 32, 128):
        np.testing.assert_array_equal(_shuffled_encodings(encoder, texts, batch_size), reference)


def test_int8_update_equals_a_rebuild_with_the_real_encoder(tmp_path, tiny_seed_model, capsys):
    """At the default precision, with the lean encoder: an updated index and a rebuild with another batch size
    hold the same vectors and answer the same queries with the same scores."""
    from conftest import Runner

    from dsearch.store import OpenIndex

    rows = [json.loads(line) for line in (SAMPLE / "passages.jsonl").read_text().splitlines()]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    cli = Runner(capsys, load_encoder)
    model = ["--model", str(tiny_seed_model)]
    assert cli("index", corpus, "-o", tmp_path / "idx", *model, "-q").exit_code == 0
    rows[0] = {**rows[0], "text": rows[0]["text"] + " Changed since the first build."}
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows[1:] + rows[:1]))  # new order, one new passage
    result = cli("index", corpus, "-o", tmp_path / "idx", "--update", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["added"], summary["updated"], summary["precision"]) == (1, 1, choose_precision(cpu_flags())[0])
    assert cli("index", corpus, "-o", tmp_path / "rebuilt", *model, "--batch-size", "7", "-q").exit_code == 0

    def vectors(index: Path) -> dict[str, bytes]:
        opened = OpenIndex(index)
        ids = [r["id"] for r in opened.iter_rows(("id",))]
        return dict(zip(ids, (v.tobytes() for v in opened.vectors(0, len(ids))), strict=True))

    assert vectors(tmp_path / "idx") == vectors(tmp_path / "rebuilt")
    queries = tmp_path / "queries.tsv"
    queries.write_text((SAMPLE / "queries.tsv").read_text())
    indexes = (tmp_path / "idx", tmp_path / "rebuilt")
    answers = [cli("query", index, "--queries", queries, "-k", "10", "--format", "tsv") for index in indexes]
    assert all(a.exit_code == 0 for a in answers) and answers[0].stdout.count("\n") >= 10
    assert answers[0].stdout == answers[1].stdout


def test_int8_keeps_the_feed_forward_down_projections_in_fp32(tiny_seed_model):
    """The FFN down-projections (DistilBERT's lin2: hidden_dim → dim) stay fp32 MatMuls; the rest is int8."""
    import onnx

    encoder = SentenceTransformerEncoder(str(tiny_seed_model))
    directory = lean.export(encoder, "int8")
    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    float_matmuls = [n.name for n in graph.node if n.op_type == "MatMul"]
    assert any(n.op_type == "MatMulInteger" for n in graph.node)  # the other projections are quantised
    weighted = [name for name in float_matmuls if "lin2" in name]
    assert len(weighted) == 2  # one per layer of the tiny model, found by the weight's shape, not its name
