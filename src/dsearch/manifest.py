"""The index manifest: a dataclass that round-trips through ``manifest.json``.

The manifest is written last and atomically, so its presence is what makes a directory an index.
It names the segment directories that hold the data, which leaves room for several segments or shards.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsearch.errors import IndexDirError, NewerIndexError
from dsearch.filters import FIELD_TYPES

FORMAT_NAME = "dsearch-index"
# 2: ANN index types (an ann-*.faiss file per segment beside the exact vectors) and ``index_params``.
# A format-1 index is a format-2 flat index without ``index_params``: it loads, queries and updates as before.
FORMAT_VERSION = 2
OLDEST_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
# A segment is a plain child directory of DIR with this form: never "..", ".", an absolute path or a nested path,
# because cleanup deletes segments by these names and must never reach outside DIR.
SEGMENT_NAME = re.compile(r"seg-[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# A file inside a segment: one plain name (no separators, no leading dot).
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# A model fingerprint and a precision become parts of cache paths (lean.lean_directory), so a manifest may hold
# no path there: a fingerprint is a plain token (dsearch writes xxh3-128 hex, or "unknown" for a model whose files
# could not be hashed; the cache itself takes hex only), a precision one of the recorded names (fp16: a Ray build
# on GPU workers).
FINGERPRINT_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
RECORDED_PRECISIONS = ("fp32", "bf16", "int8", "fp16")
SIMILARITIES = ("cosine", "dot")
# Files every segment of this format version holds (the manifest must list both with their checksums).
SEGMENT_FILES = ("index.faiss", "passages.parquet")


@dataclass
class ModelInfo:
    """What the index was encoded with; a reader needs all of it to encode queries compatibly."""

    name: str  # hub name, absolute local path, or "bundled:all-MiniLM-L6-v2"
    fingerprint: str  # hash of the model's config and weight files
    dim: int
    similarity: str  # "cosine" (vectors L2-normalised) or "dot" (raw vectors)
    max_seq_length: int
    prompts: dict[str, str] = field(default_factory=dict)
    precision: str = "fp32"


@dataclass
class FileInfo:
    bytes: int
    xxh3_128: str


@dataclass
class Segment:
    """One directory of row-aligned data: ``index.faiss`` and ``passages.parquet``."""

    path: str  # relative to the index directory
    rows: int
    files: dict[str, FileInfo]


@dataclass
class Manifest:
    model: ModelInfo
    index_type: str
    rows: int
    segments: list[Segment]
    created_at: str
    versions: dict[str, str]
    corpus: dict[str, Any] = field(default_factory=dict)  # sources and reading options, for status/update
    stats: dict[str, Any] = field(default_factory=dict)  # what the build skipped and truncated
    # ANN parameters: factory string, nprobe/efSearch defaults, rerank, recall_at_10 (see vector_index.py)
    index_params: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def passages(self) -> int:
        """Passages in the index: its rows, unless long passages were split into several rows (windows) each."""
        return int(self.stats.get("passages", self.rows))

    def to_json(self) -> str:
        data = asdict(self)
        # Format first, so `head manifest.json` says what the file is.
        ordered = {"format": data.pop("format"), "format_version": data.pop("format_version"), **data}
        return json.dumps(ordered, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise IndexDirError(f"{where}: manifest is not valid JSON ({exc.msg}); rebuild the index") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise IndexDirError(f"{where}: not a dsearch manifest")
        version = data.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            reason = f"{where}: index format version {version} is newer than this dsearch reads ({FORMAT_VERSION})"
            error = NewerIndexError(f"{reason}; upgrade dsearch (or remove the index and build it again with this one)")
            error.reason = reason
            raise error
        if not isinstance(version, int):
            raise IndexDirError(f"{where}: the index format version {version!r} is not a number; rebuild the index")
        try:
            return cls._from_dict(data, version)
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexDirError(
                f"{where}: manifest is missing or has a malformed field ({exc}); rebuild the index"
            ) from exc

    @classmethod
    def _from_dict(cls, data: dict[str, Any], version: int) -> Manifest:
        """Build from parsed JSON, checking every type and name: a manifest is input like any other."""
        model = ModelInfo(**_typed(data, "model", dict))
        for key, kind in (("name", str), ("fingerprint", str), ("dim", int), ("similarity", str)):
            _typed(asdict(model), key, kind)
        if model.dim <= 0:
            raise ValueError(f"model.dim {model.dim} is not positive")
        if not FINGERPRINT_TOKEN.fullmatch(model.fingerprint):
            raise ValueError(f"model.fingerprint {model.fingerprint[:40]!r} is not a fingerprint (hex digits)")
        if model.similarity not in SIMILARITIES:  # query-time score checks depend on it
            raise ValueError(f"model.similarity {model.similarity!r} is not one of {', '.join(SIMILARITIES)}")
        if _typed(asdict(model), "max_seq_length", int) <= 0:
            raise ValueError(f"model.max_seq_length {model.max_seq_length} is not positive")
        if model.precision not in RECORDED_PRECISIONS:
            choices = ", ".join(RECORDED_PRECISIONS)
            raise ValueError(f"model.precision {str(model.precision)[:20]!r} is not one of {choices}")
        prompts = _typed(asdict(model), "prompts", dict)
        if not all(isinstance(v, str) for v in prompts.values()):
            raise TypeError("model.prompts must map names to strings")
        segments = [_segment(s) for s in _typed(data, "segments", list)]
        if len({s.path for s in segments}) != len(segments):
            raise ValueError("a segment is listed twice")
        rows = _typed(data, "rows", int)
        if rows < 0 or rows != sum(s.rows for s in segments):
            raise ValueError(f"rows {rows} is not the sum of the segments' rows")
        created_at = _typed(data, "created_at", str)
        dt.datetime.fromisoformat(created_at)  # ValueError: not an ISO 8601 time
        corpus = data.get("corpus", {})
        stats = data.get("stats", {})
        if not isinstance(corpus, dict) or not isinstance(stats, dict):
            raise TypeError("corpus and stats must be objects")
        sources = corpus.get("sources", [])
        if not isinstance(sources, list) or not all(_is_source(s) for s in sources):
            raise TypeError("corpus.sources must be a list of objects with a path")  # what status compares
        split = corpus.get("split")
        if split is not None and not (
            isinstance(split, dict) and list(split) == ["overlap"] and _typed(split, "overlap", int) >= 0
        ):
            raise ValueError(f"corpus.split {split!r} is neither null nor {{'overlap': TOKENS}}")  # update reuses it
        field_types = corpus.get("field_types", {})
        if not isinstance(field_types, dict) or not all(
            isinstance(name, str) and kind in FIELD_TYPES for name, kind in field_types.items()
        ):  # each type is pasted into the SQL that --where runs: only the names dsearch records
            raise ValueError("corpus.field_types must map field names to the types dsearch records")
        if "passages" in stats:
            passages = _typed(stats, "passages", int)
            if not (0 < passages <= rows or passages == rows == 0):
                raise ValueError(f"stats.passages {passages} does not fit the index's {rows} rows")
        return cls(
            model=model,
            index_type=_typed(data, "index_type", str),
            rows=rows,
            segments=segments,
            created_at=created_at,
            versions=_typed(data, "versions", dict),
            corpus=corpus,
            stats=stats,
            index_params=_typed(data, "index_params", dict) if "index_params" in data else {},
            format_version=version,
        )


def _typed(data: dict[str, Any], key: str, kind: type) -> Any:
    value = data[key]
    # bool is an int to Python, never to a manifest.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _is_source(source: Any) -> bool:
    return isinstance(source, dict) and isinstance(source.get("path"), str)


def _segment(data: Any) -> Segment:
    if not isinstance(data, dict):
        raise TypeError("a segment must be an object")
    path = _typed(data, "path", str)
    if not SEGMENT_NAME.fullmatch(path):
        raise ValueError(f"segment path {path!r} is not a seg-<id> directory inside the index")
    rows = _typed(data, "rows", int)
    if rows < 0:
        raise ValueError(f"segment {path} has {rows} rows")
    files = {}
    for name, info in _typed(data, "files", dict).items():
        if not FILE_NAME.fullmatch(name):
            raise ValueError(f"segment {path} lists a file {name!r} that is not a plain file name")
        if not isinstance(info, dict):
            raise TypeError(f"segment {path}: file {name} must be an object")
        files[name] = FileInfo(bytes=_typed(info, "bytes", int), xxh3_128=_typed(info, "xxh3_128", str))
    missing = [name for name in SEGMENT_FILES if name not in files]
    if missing:
        raise ValueError(f"segment {path} does not list {', '.join(missing)}")
    return Segment(path, rows, files)


# Far more than any manifest dsearch writes (a folder's listing is kept for at most 1,000 files).
MAX_MANIFEST_BYTES = 64 << 20


def _read_regular(path: Path, limit: int) -> str:
    """A regular file's text; a FIFO or device (which would block or never end) or a huge file is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IndexDirError(
                f"{path}: not a regular file (a FIFO, device or folder); remove it, then rebuild the index"
            )
        if info.st_size > limit:
            raise IndexDirError(f"{path}: {info.st_size:,} bytes, too large for a manifest; rebuild the index")
        return fh.read(limit + 1).decode("utf-8")


def read_manifest_text(directory: Path) -> str:
    """The manifest's text, unparsed (serve compares it to notice a publish), with the errors read_manifest gives."""
    path = directory / MANIFEST_FILE
    try:
        return _read_regular(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise IndexDirError(
            f"{directory}: not a dsearch index (no {MANIFEST_FILE}); build one with 'dsearch index'"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexDirError(f"{path}: cannot read the manifest ({exc})") from exc


def read_manifest(directory: Path) -> Manifest:
    return Manifest.from_json(read_manifest_text(directory), str(directory / MANIFEST_FILE))
