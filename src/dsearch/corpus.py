"""Read passage corpora lazily: JSON Lines, TSV, CSV, Parquet, plain text / Markdown, or stdin.

Every reader yields :class:`Passage` objects one at a time, so memory never depends on the corpus size.
Bad input raises :class:`InputError` naming ``file:line``; with ``skip_bad`` it is counted instead.
"""

from __future__ import annotations

import bisect
import csv
import gzip
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from dsearch.errors import InputError, UsageError

FORMATS = ("jsonl", "tsv", "csv", "parquet", "text")
TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    **{s: "text" for s in TEXT_SUFFIXES},
}
# Field names tried, in order, when the user does not name one (BEIR, pyserini, MS MARCO habits).
DEFAULT_ID_FIELDS = ("_id", "id", "docid", "doc_id", "pid")
DEFAULT_TEXT_FIELDS = ("text", "contents", "passage", "body")
DEFAULT_TITLE_FIELDS = ("title",)
SKIP_HINT = "fix it, or pass --skip-bad to skip such records"


@dataclass(slots=True)
class Passage:
    """One retrievable unit. ``id`` is the user's id; ``fields`` holds every other input field."""

    id: str
    text: str
    title: str | None = None
    source: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # file:line, for error messages

    @property
    def encoder_text(self) -> str:
        """What the encoder sees: ``title + " " + text`` when there is a title (BEIR's convention)."""
        return f"{self.title} {self.text}" if self.title else self.text


@dataclass
class FieldNames:
    """Which input fields hold the id, the text and the title (``None``: try the defaults)."""

    id: str | None = None
    text: str | None = None
    title: str | None = None


@dataclass
class CorpusStats:
    """Counts of what reading the corpus kept and skipped."""

    read: int = 0
    skipped_empty: int = 0
    skipped_bad: int = 0
    first_bad: str = ""  # the first skipped record's error, for the summary


# A function that returns the character spans of a text's tokens; used to cap text-file windows.
TokenSpans = Callable[[str], list[tuple[int, int]]]


def detect_format(path: str) -> str:
    """The format a path's name implies (``-`` is JSON Lines)."""
    if path == "-":
        return "jsonl"
    p = Path(path)
    if p.is_dir():
        return "text"
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffixes[-1]]
    raise UsageError(f"{path}: cannot tell the format from the name; pass --format ({'|'.join(FORMATS)})")


def read_corpus(
    paths: Iterable[str],
    fmt: str | None = None,
    names: FieldNames | None = None,
    skip_bad: bool = False,
    stats: CorpusStats | None = None,
    token_spans: TokenSpans | None = None,
    max_tokens: int = 256,
    stdin: IO[bytes] | None = None,
) -> Iterator[Passage]:
    """Yield the passages of every path in order, checking ids for duplicates and skipping empty text."""
    names = names or FieldNames()
    stats = stats if stats is not None else CorpusStats()
    seen: set[str] = set()
    for path in paths:
        path_fmt = fmt or detect_format(path)
        for item in _read_one(path, path_fmt, names, token_spans, max_tokens, stdin):
            if isinstance(item, InputError):
                if not skip_bad:
                    raise item
                stats.skipped_bad += 1
                stats.first_bad = stats.first_bad or str(item)
                continue
            if not item.text.strip():
                stats.skipped_empty += 1
                continue
            if item.id in seen:
                err = InputError(item.where, f"duplicate id {item.id!r}", "ids must be unique; " + SKIP_HINT)
                if not skip_bad:
                    raise err
                stats.skipped_bad += 1
                stats.first_bad = stats.first_bad or str(err)
                continue
            seen.add(item.id)
            stats.read += 1
            yield item


def _read_one(
    path: str,
    fmt: str,
    names: FieldNames,
    token_spans: TokenSpans | None,
    max_tokens: int,
    stdin: IO[bytes] | None,
) -> Iterator[Passage | InputError]:
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if path != "-" and not os.path.exists(path):
        raise InputError(path, "no such file or directory")
    if fmt == "parquet":
        yield from _read_parquet(path, names)
    elif fmt == "text":
        yield from _read_text_tree(path, token_spans, max_tokens, stdin)
    else:
        with _open_binary(path, stdin) as fh:
            label = "<stdin>" if path == "-" else path
            if fmt == "jsonl":
                yield from _read_jsonl(fh, label, names)
            else:
                yield from _read_delimited(fh, label, names, "\t" if fmt == "tsv" else ",")


def _open_binary(path: str, stdin: IO[bytes] | None) -> IO[bytes]:
    if path == "-":
        raw = stdin if stdin is not None else sys.stdin.buffer
        return _NoClose(raw)
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


class _NoClose(io.BufferedIOBase):
    """Wraps stdin so that ``with`` does not close it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._raw)

    def close(self) -> None:  # leave the caller's stream open
        pass


def _decode(raw: bytes, where: str) -> str | InputError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return InputError(where, f"not valid UTF-8 (byte {exc.start})", "re-encode the file as UTF-8, or " + SKIP_HINT)


def _pick(record: dict[str, Any], wanted: str | None, defaults: tuple[str, ...]) -> str | None:
    """The field name to use: the one asked for, else the first default present."""
    if wanted is not None:
        return wanted
    return next((name for name in defaults if name in record), None)


def _passage_from_record(record: dict[str, Any], where: str, source: str, names: FieldNames) -> Passage | InputError:
    id_key = _pick(record, names.id, DEFAULT_ID_FIELDS)
    text_key = _pick(record, names.text, DEFAULT_TEXT_FIELDS)
    title_key = _pick(record, names.title, DEFAULT_TITLE_FIELDS)
    if id_key is None or record.get(id_key) is None or str(record[id_key]).strip() == "":
        wanted = names.id or "/".join(DEFAULT_ID_FIELDS)
        return InputError(where, f"missing id field {wanted!r}", "name it with --id-field, or " + SKIP_HINT)
    if text_key is None or text_key not in record:
        wanted = names.text or "/".join(DEFAULT_TEXT_FIELDS)
        return InputError(where, f"missing text field {wanted!r}", "name it with --text-field, or " + SKIP_HINT)
    text = record[text_key]
    if text is None:
        text = ""
    if not isinstance(text, str):
        return InputError(where, f"text field {text_key!r} is not a string", SKIP_HINT)
    title = record.get(title_key) if title_key else None
    title = str(title) if title not in (None, "") else None
    used = {id_key, text_key, title_key}
    fields = {k: v for k, v in record.items() if k not in used}
    return Passage(str(record[id_key]).strip(), text, title, source, fields, where)


def _read_jsonl(fh: IO[bytes], label: str, names: FieldNames) -> Iterator[Passage | InputError]:
    for lineno, raw in enumerate(fh, 1):
        where = f"{label}:{lineno}"
        line = _decode(raw, where)
        if isinstance(line, InputError):
            yield line
            continue
        if lineno == 1:
            line = line.lstrip("\ufeff")
        if not line.strip():
            continue  # blank lines are not records
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield InputError(where, f"not valid JSON ({exc.msg} at column {exc.colno})", SKIP_HINT)
            continue
        if not isinstance(record, dict):
            yield InputError(where, "a JSON line must be an object", SKIP_HINT)
            continue
        yield _passage_from_record(record, where, label, names)


def _read_delimited(fh: IO[bytes], label: str, names: FieldNames, delimiter: str) -> Iterator[Passage | InputError]:
    """TSV and CSV. A first row that names the id and text columns is a header; otherwise ``id<TAB>text``."""
    header: list[str] | None = None
    lines = _decoded_lines(fh, label)
    # csv needs one logical record at a time; TSV has no quoting, so a line is a record.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    for lineno, text in lines:
        where = f"{label}:{lineno}"
        if isinstance(text, InputError):
            yield text
            continue
        if not text.strip():
            continue
        try:
            row = next(csv.reader([text], delimiter=delimiter, quoting=quoting, strict=True))
        except csv.Error as exc:
            yield InputError(where, f"malformed {'TSV' if delimiter == chr(9) else 'CSV'} row ({exc})", SKIP_HINT)
            continue
        if header is None and lineno == 1 and _looks_like_header(row, names):
            header = row
            continue
        if header is None:
            if names.id or names.text or names.title:
                yield InputError(where, "field options need a header row naming the columns", "add a header line")
                return
            if len(row) != 2:
                yield InputError(
                    where,
                    f"expected 2 columns (id, text) without a header, found {len(row)}",
                    "add a header row naming the columns, or " + SKIP_HINT,
                )
                continue
            record: dict[str, Any] = {"id": row[0], "text": row[1]}
        else:
            if len(row) != len(header):
                yield InputError(where, f"expected {len(header)} columns as in the header, found {len(row)}", SKIP_HINT)
                continue
            record = dict(zip(header, row, strict=True))
        yield _passage_from_record(record, where, label, names)


def _decoded_lines(fh: IO[bytes], label: str) -> Iterator[tuple[int, str | InputError]]:
    for lineno, raw in enumerate(fh, 1):
        text = _decode(raw, f"{label}:{lineno}")
        if isinstance(text, str):
            text = text.rstrip("\r\n")
            if lineno == 1:
                text = text.lstrip("\ufeff")
        yield lineno, text


def _looks_like_header(row: list[str], names: FieldNames) -> bool:
    ids = (names.id,) if names.id else DEFAULT_ID_FIELDS
    texts = (names.text,) if names.text else DEFAULT_TEXT_FIELDS
    return any(c in ids for c in row) and any(c in texts for c in row)


def _read_parquet(path: str, names: FieldNames) -> Iterator[Passage | InputError]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise InputError(path, f"not a readable Parquet file ({exc})") from exc
    row_number = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row_number += 1
            yield _passage_from_record(record, f"{path}:row {row_number}", path, names)


# --- plain text and Markdown -------------------------------------------------------------------------

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def _read_text_tree(
    path: str, token_spans: TokenSpans | None, max_tokens: int, stdin: IO[bytes] | None
) -> Iterator[Passage | InputError]:
    if path == "-":
        data = (stdin if stdin is not None else sys.stdin.buffer).read()
        yield from _split_text_file(data, "<stdin>", token_spans, max_tokens, markdown=False)
        return
    root = Path(path)
    files = (
        sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if root.is_dir()
        else [root]
    )
    for file in files:
        opener = gzip.open if file.suffix == ".gz" else open
        with opener(file, "rb") as fh:
            data = fh.read()  # one document at a time: text files are documents, not corpora
        markdown = file.suffix.lower() in {".md", ".markdown"}
        yield from _split_text_file(data, str(file), token_spans, max_tokens, markdown)


def _split_text_file(
    data: bytes, label: str, token_spans: TokenSpans | None, max_tokens: int, markdown: bool
) -> Iterator[Passage | InputError]:
    """Paragraphs (blank-line separated), each cut into overlapping windows of at most ``max_tokens``."""
    text = _decode(data, label)
    if isinstance(text, InputError):
        yield text
        return
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    number = 0
    heading: str | None = None
    line_of_offset = _line_index(text)
    for start, paragraph in _paragraphs(text):
        match = _HEADING.match(paragraph) if markdown and "\n" not in paragraph.strip() else None
        if match:
            heading = match.group(1) or None  # a heading titles the paragraphs below it
            continue
        for window in _windows(paragraph, token_spans, max_tokens):
            number += 1
            where = f"{label}:{line_of_offset(start)}"
            yield Passage(f"{label}#{number}", window, heading, label, {}, where)


def _paragraphs(text: str) -> Iterator[tuple[int, str]]:
    for match in re.finditer(r"\S(?:.|\n(?![ \t]*\n))*", text):
        yield match.start(), match.group(0).strip()


def _line_index(text: str) -> Callable[[int], int]:
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def line_of(offset: int) -> int:
        return bisect.bisect_left(newlines, offset) + 1

    return line_of


def _windows(paragraph: str, token_spans: TokenSpans | None, max_tokens: int) -> Iterator[str]:
    """Cut a paragraph into windows of ``max_tokens`` tokens that overlap by an eighth."""
    spans = token_spans(paragraph) if token_spans else [m.span() for m in re.finditer(r"\S+", paragraph)]
    if len(spans) <= max_tokens:
        yield paragraph
        return
    overlap = max(1, max_tokens // 8)
    step = max(1, max_tokens - overlap)
    for first in range(0, len(spans), step):
        last = min(first + max_tokens, len(spans)) - 1
        yield paragraph[spans[first][0] : spans[last][1]]
        if last == len(spans) - 1:
            break
