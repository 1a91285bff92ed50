"""The index manifest: a dataclass that round-trips through ``manifest.json``.

The manifest is written last and atomically, so its presence is what makes a directory an index.
It names the segment directories that hold the data, which leaves room for several segments or shards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsearch.errors import IndexDirError

FORMAT_NAME = "dsearch-index"
# 2: ANN index types (an ann-*.faiss file per segment beside the exact vectors) and ``index_params``.
# A format-1 index is a format-2 flat index without ``index_params``: it loads, queries and updates as before.
FORMAT_VERSION = 2
OLDEST_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


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
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise IndexDirError(
                f"{where}: index format version {version} is newer than this dsearch reads ({FORMAT_VERSION}); "
                "upgrade dsearch or rebuild the index"
            )
        try:
            model = ModelInfo(**data["model"])
            segments = [
                Segment(s["path"], s["rows"], {n: FileInfo(**f) for n, f in s["files"].items()})
                for s in data["segments"]
            ]
            return cls(
                model=model,
                index_type=data["index_type"],
                rows=data["rows"],
                segments=segments,
                created_at=data["created_at"],
                versions=data["versions"],
                corpus=data.get("corpus", {}),
                stats=data.get("stats", {}),
                index_params=data.get("index_params", {}),
                format_version=version,
            )
        except (KeyError, TypeError) as exc:
            raise IndexDirError(
                f"{where}: manifest is missing or has a malformed field ({exc}); rebuild the index"
            ) from exc


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IndexDirError(
            f"{directory}: not a dsearch index (no {MANIFEST_FILE}); build one with 'dsearch index'"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexDirError(f"{path}: cannot read the manifest ({exc})") from exc
    return Manifest.from_json(text, str(path))
