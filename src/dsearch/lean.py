"""A lean encoder: the model's transformer exported to ONNX, run with onnxruntime, tokenized with ``tokenizers``
and pooled in numpy — no torch, no sentence-transformers at query time.

Exports are cached under ``$DSEARCH_CACHE_DIR`` (default ``~/.cache/dsearch``), keyed by the model's
fingerprint and the variant (``fp32``, or ``int8`` dynamic quantisation), so the cost is paid once.
Only models made of Transformer → Pooling (mean or cls) → optional Normalize are exported; others keep
using sentence-transformers.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsearch.errors import ModelError

if TYPE_CHECKING:
    import numpy as np

    from dsearch.encoder import SentenceTransformerEncoder

log = logging.getLogger("dsearch")
# Slow one-off steps a user should hear about even without -v; the CLI decides how to show them.
notice = logging.getLogger("dsearch.notice")

VARIANTS = ("fp32", "int8")
SPEC_FILE = "lean.json"
# 2: weights in an external file (model.data), which ONNX Runtime maps instead of parsing: the seed
# architecture's session starts in about 0.04 s instead of 1.3-1.7 s (measured). 3: int8 leaves the feed-forward
# down-projections in fp32 (see export).
LEAN_FORMAT = 3


def cache_root() -> Path:
    explicit = os.environ.get("DSEARCH_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dsearch"


# What encoder.fingerprint_directory writes: the only fingerprints that name an export in the cache.
FINGERPRINT = re.compile(r"[0-9a-f]{32}")


def lean_directory(fingerprint: str, variant: str) -> Path:
    """Where a model's export lives; the parts are checked, as they may come from an index's manifest."""
    if not FINGERPRINT.fullmatch(fingerprint) or variant not in VARIANTS:
        raise ModelError(f"not a model fingerprint and precision for the ONNX cache: {fingerprint[:40]!r}, {variant!r}")
    return cache_root() / "onnx" / f"{fingerprint}-{variant}"


# Staging folders of exports in progress: ".<fingerprint>-<variant>.<mkdtemp suffix>" beside the exports. A killed
# export leaves one behind (up to 87 MB for all-MiniLM-L6-v2); the next run collects it (collect_stale_exports).
STAGING_NAME = re.compile(r"\.[0-9a-f]{32}-(?:fp32|int8)\.[a-z0-9_]{8}")
OWNER_FILE = "owner"  # "<host> <pid>" of the process exporting into the folder
STALE_AFTER_S = 3600  # a folder of another host (or no owner) untouched this long is abandoned
OWNED_STALE_AFTER_S = 86400  # even a live owner pid (perhaps reused) cannot still be exporting after a day


def collect_stale_exports(now: float | None = None) -> list[Path]:
    """Remove the staging folders that killed exports left in the cache; returns what was removed.

    Only dsearch's own staging names are touched, and only when no export can still be writing them: their
    process (same host) is gone, or they have not changed for an hour (another host, or no owner recorded).
    """
    import socket
    import time

    now = time.time() if now is None else now
    removed = []
    try:
        entries = list((cache_root() / "onnx").iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for entry in entries:
        if not STAGING_NAME.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            age = now - max([entry.stat().st_mtime] + [f.stat().st_mtime for f in entry.iterdir()])
            owner = (entry / OWNER_FILE).read_text().split() if (entry / OWNER_FILE).exists() else []
        except OSError:
            continue  # gone meanwhile, or unreadable: leave it
        if len(owner) == 2 and owner[0] == host and owner[1].isdigit():
            stale = not _alive(int(owner[1])) or age > OWNED_STALE_AFTER_S
        else:
            stale = age > STALE_AFTER_S
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s, left by an interrupted ONNX export", entry)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


@dataclass
class LeanSpec:
    """Everything the lean encoder needs besides the ONNX graph and the tokenizer."""

    name: str
    fingerprint: str
    variant: str
    similarity: str
    dim: int
    max_seq_length: int
    pooling: str  # "mean" or "cls"
    input_names: list[str]
    prompts: dict[str, str]
    format: int = LEAN_FORMAT


class LeanEncoder:
    """Encodes like the sentence-transformers model it was exported from (parity is tested)."""

    def __init__(self, directory: Path, batch_size: int = 32, name: str | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        spec = json.loads((directory / SPEC_FILE).read_text())
        if spec.get("format") != LEAN_FORMAT:
            raise ModelError(f"{directory}: lean export of another format; delete it to re-export")
        self.spec = LeanSpec(**spec)
        self.name = name or self.spec.name
        self.fingerprint = self.spec.fingerprint
        self.similarity = self.spec.similarity
        self.dim = self.spec.dim
        self.max_seq_length = self.spec.max_seq_length
        self.prompts = self.spec.prompts
        self.precision = self.spec.variant
        self.batch_size = batch_size
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        # Dynamic int8 quantises activations with one scale per input tensor, so in a batch a text's vector would
        # depend on its batch-mates (and on their padding): --update would not equal a rebuild, nor --batch-size
        # N another N. So int8 encodes each text alone (the scale becomes per-row, no padding), on a one-thread
        # session, and gets its parallelism from running texts side by side instead: as fast as batches of 32
        # on whole SciFact abstracts and faster on short passages (benchmarks/RESULTS.md), and a vector cannot
        # depend on the thread count either. fp32 is batch-independent as it is (tested) and keeps its batches.
        self.per_row = self.precision == "int8"
        self.workers = os.cpu_count() or 1
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1 if self.per_row else self.workers
        options.log_severity_level = 3
        # Memory patterns are planned and kept per input shape; text batches come in hundreds of shapes, and
        # with them on, peak RSS kept climbing for the first ~20k passages (measured: 696 MiB against 501 MiB).
        options.enable_mem_pattern = False
        self.session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self._executor: ThreadPoolExecutor | None = None

    @property
    def max_text_tokens(self) -> int:
        prompt = self.prompts.get("document", "")
        prompt_tokens = len(self.tokenizer.encode(prompt, add_special_tokens=False).ids) if prompt else 0
        return max(8, self.max_seq_length - 2 - prompt_tokens)

    def _encode(self, texts: list[str], side: str) -> np.ndarray:
        import numpy as np

        prompt = self.prompts.get(side, "")
        texts = [prompt + t for t in texts] if prompt else list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(texts)
        if self.per_row:
            # Each text alone (see __init__); the session releases the GIL, so threads run texts in parallel.
            if len(texts) == 1 or self.workers == 1:
                rows = [self._run([e])[0] for e in encodings]
            else:
                rows = list(self._pool().map(lambda e: self._run([e])[0], encodings))
            if rows:
                out[:] = np.stack(rows)
        else:
            # Sort by length so each batch pads little; results go back to their original positions.
            order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
            for start in range(0, len(order), self.batch_size):
                members = order[start : start + self.batch_size]
                out[members] = self._run([encodings[i] for i in members])
        if self.similarity == "cosine":
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.maximum(norms, 1e-12)
        return out

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="dsearch-encode")
        return self._executor

    def _run(self, encodings: list[Any]) -> np.ndarray:
        import numpy as np

        limit = self.max_seq_length
        length = min(limit, max(len(e.ids) for e in encodings))
        ids = np.zeros((len(encodings), length), dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, enc in enumerate(encodings):
            n = min(len(enc.ids), limit)
            if len(enc.ids) > limit:  # truncate as sentence-transformers does: keep the final [SEP]
                ids[row, : n - 1] = enc.ids[: n - 1]
                ids[row, n - 1] = enc.ids[-1]
            else:
                ids[row, :n] = enc.ids
            mask[row, :n] = 1
            types[row, :n] = enc.type_ids[:n]
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        hidden = self.session.run(None, {k: feeds[k] for k in self.spec.input_names})[0]
        if self.spec.pooling == "cls":
            return hidden[:, 0]
        weights = mask[:, :, None].astype(np.float32)
        return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, "document")

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, "query")

    def count_truncated(self, texts: list[str]) -> int:
        return sum(len(e.ids) > self.max_seq_length for e in self.tokenizer.encode_batch(list(texts)))

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).offsets)


def exportable(encoder: SentenceTransformerEncoder) -> str | None:
    """None when the model can be exported; otherwise the reason it cannot."""
    kinds = [type(module).__name__ for module in encoder.model]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return f"module layout {' → '.join(kinds)} is not Transformer → Pooling [→ Normalize]"
    pooling = encoder.model[1]
    if pooling.pooling_mode not in ("mean", "cls") or not getattr(pooling, "include_prompt", True):
        return f"pooling mode {pooling.pooling_mode!r} is not mean or cls"
    if not hasattr(encoder.model.tokenizer, "backend_tokenizer"):
        return "the tokenizer is not a fast (tokenizers) tokenizer"
    if encoder.fingerprint == "unknown":
        return "the model's files could not be fingerprinted for the cache"
    return None


def down_projections(model_path: Path) -> list[str]:
    """MatMul nodes whose constant weight maps more inputs to fewer outputs: a transformer's feed-forward
    down-projections (3072 → 768 in BERT, DistilBERT's ``lin2``), found by shape so that any architecture works."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        shape = shapes.get(node.input[1])
        if shape is None and node.input[1] in constants:  # a weight folded into a Constant node
            shape = numpy_helper.to_array(constants[node.input[1]].attribute[0].t).shape
        if shape is not None and len(shape) == 2 and shape[0] > shape[1]:
            found.append(node.name)
    return found


def export(encoder: SentenceTransformerEncoder, variant: str = "fp32") -> Path:
    """Export (or find in the cache) the lean form of a loaded model; returns its directory."""
    target = lean_directory(encoder.fingerprint, variant)
    if (target / SPEC_FILE).exists():
        if _spec_format(target) == LEAN_FORMAT:
            return target
        shutil.rmtree(target, ignore_errors=True)  # an export of an older layout: redo it
    reason = exportable(encoder)
    if reason:
        raise ModelError(f"cannot export {encoder.name} to ONNX: {reason}")
    target.parent.mkdir(parents=True, exist_ok=True)
    notice.info("preparing the model for fast inference, once per model")
    collect_stale_exports()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        import socket

        (staging / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        input_names = _export_onnx(encoder, staging / "model.onnx")
        if variant == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # Per-channel weights on MatMul only: per-tensor scales or quantised embeddings cost far more
            # quality (mean cosine to fp32 0.936 vs 0.995 for all-MiniLM-L6-v2, measured). The feed-forward
            # down-projections stay fp32: their input (after GELU) has the outliers that one activation scale per
            # text handles worst; quantising them too cost the top-10 agreement with fp32 (SciFact: 0.898 against
            # 0.934 without them) for 35% more speed (benchmarks/RESULTS.md, "int8 and its down-projections").
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)  # it advises pre-processing through the root logger, on stderr
            try:
                quantize_dynamic(
                    staging / "model.onnx",
                    staging / "model.int8.onnx",
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    op_types_to_quantize=["MatMul"],
                    nodes_to_exclude=down_projections(staging / "model.onnx"),
                )
            finally:
                root.setLevel(level)
            os.replace(staging / "model.int8.onnx", staging / "model.onnx")
        _externalise_weights(staging / "model.onnx")
        encoder.model.tokenizer.backend_tokenizer.save(str(staging / "tokenizer.json"))
        spec = LeanSpec(
            name=encoder.name,
            fingerprint=encoder.fingerprint,
            variant=variant,
            similarity=encoder.similarity,
            dim=encoder.dim,
            max_seq_length=encoder.max_seq_length,
            pooling=encoder.model[1].pooling_mode,
            input_names=input_names,
            prompts=dict(encoder.prompts),
        )
        (staging / OWNER_FILE).unlink()
        (staging / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))  # written last: marks it complete
        try:
            os.rename(staging, target)
        except OSError:  # another process finished the same export first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _export_onnx(encoder: SentenceTransformerEncoder, path: Path) -> list[str]:
    import torch

    hf_model = encoder.model[0].auto_model
    tokenizer = encoder.model.tokenizer
    sample = tokenizer(["a short one", "and a somewhat longer sample sentence"], padding=True, return_tensors="pt")
    accepted = set(inspect.signature(hf_model.forward).parameters)
    input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample and n in accepted]

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = hf_model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(input_names, inputs, strict=True))).last_hidden_state

    axes = {name: {0: "batch", 1: "tokens"} for name in [*input_names, "last_hidden_state"]}
    if hasattr(hf_model, "set_attn_implementation"):
        hf_model.set_attn_implementation("eager")  # plain attention traces shape-independently
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            LastHidden().eval(),
            tuple(sample[n] for n in input_names),
            str(path),
            input_names=input_names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return input_names


def _spec_format(directory: Path) -> int | None:
    try:
        return json.loads((directory / SPEC_FILE).read_text()).get("format")
    except (OSError, ValueError):
        return None


def _externalise_weights(path: Path) -> None:
    """Move the weights out of the protobuf into ``model.data``, which ONNX Runtime loads far faster."""
    import onnx

    model = onnx.load(str(path))
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.data",
        size_threshold=1024,
    )


def find_lean(fingerprint: str, variant: str, batch_size: int = 32, name: str | None = None) -> LeanEncoder | None:
    """The cached lean encoder for a model, if one was exported; never imports torch."""
    if not FINGERPRINT.fullmatch(fingerprint) or variant not in VARIANTS:
        return None  # no export can exist under such a name (the manifest check keeps paths out)
    directory = lean_directory(fingerprint, variant)
    if not (directory / SPEC_FILE).exists():
        return None
    try:
        return LeanEncoder(directory, batch_size, name)
    except Exception as exc:  # a damaged cache entry must not stop a query
        log.info("lean encoder at %s unusable (%s); using sentence-transformers", directory, exc)
        return None
