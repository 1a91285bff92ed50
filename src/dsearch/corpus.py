"""Read passage corpora lazily: JSON Lines, TSV, CSV, Parquet, plain text / Markdown, or stdin.

Every reader yields :class:`Passage` objects one at a time, so memory never depends on the corpus size.
Bad input raises :class:`InputError` naming ``file:line``; with ``skip_bad`` it is counted instead.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import functools
import gzip
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import xxhash

from dsearch.errors import InputError, UsageError, option, spell
from dsearch.manifest import FORMAT_NAME, MANIFEST_FILE
from dsearch.windows import window_spans

log = logging.getLogger("dsearch")

FORMATS = ("jsonl", "tsv", "csv", "parquet", "text")
TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
MARKDOWN_SUFFIXES = {".md", ".markdown"}
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
SKIP_HINT = f"fix it, or pass {option('skip_bad', True)} to skip such records"
# Deeper JSON is refused: real corpora nest a few levels, and the stored fields are re-serialised recursively.
MAX_JSON_DEPTH = 100
# Skipped records logged one by one under -v; the rest are only counted, so one bad file cannot flood the log.
MAX_LOGGED_BAD = 100
# Hex digits of a text passage's content hash in its id: 48 bits, and a clash only adds a counter.
TEXT_ID_HASH_CHARS = 12


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


class Records:
    """Passages handed over as Python objects (``dsearch.build_index``): mappings, read as a JSON Lines record is
    (the same id, text and title fields; every other key becomes a field), or ``Passage`` objects.

    Where ``read_corpus`` takes paths it also takes a ``Records``. A build reads its corpus twice when it updates
    an index: with ``spool``, a one-shot iterator (a generator) is kept in a temporary file on its first pass and
    read back from there, so memory still does not grow with the corpus.
    """

    def __init__(self, items: Iterable[Any], label: str = "passages", spool: bool = False) -> None:
        self.items = items
        self.label = label
        self.one_shot = iter(items) is items
        self.spool = spool and self.one_shot
        self._spooled: IO[str] | None = None
        self._read = False

    def __str__(self) -> str:
        return self.label

    def read(self, names: FieldNames) -> Iterator[Passage | InputError]:
        """Each item as a passage (or the error that says what is wrong with it, naming ``label[N]``)."""
        if self._spooled is not None:
            yield from self._replay(self._spooled)
            return
        if self._read and self.one_shot:
            raise InputError(self.label, "an iterator can be read only once", "pass a list, or build with spool")
        self._read = True
        spool = tempfile.TemporaryFile("w+", encoding="utf-8") if self.spool else None
        complete = False
        try:
            for number, item in enumerate(self.items):
                result = _record_passage(item, f"{self.label}[{number}]", self.label, names)
                if spool is not None:
                    spool.write(json.dumps(_spool_entry(result)) + "\n")  # ASCII: lone surrogates stay escaped
                yield result
            complete = True
        finally:
            if spool is not None and complete:
                self._spooled = spool
            elif spool is not None:
                spool.close()

    @staticmethod
    def _replay(spool: IO[str]) -> Iterator[Passage | InputError]:
        spool.seek(0)
        for line in spool:
            entry = json.loads(line)
            if "passage" in entry:
                yield Passage(*entry["passage"])
            else:
                where, problem, message = entry["error"]
                error = InputError(where, problem)
                error.args = (message,)  # the message as first made, fix included
                yield error

    def close(self) -> None:
        """Remove the spool file, if any."""
        if self._spooled is not None:
            self._spooled.close()
            self._spooled = None


def _spool_entry(result: Passage | InputError) -> dict[str, Any]:
    if isinstance(result, InputError):
        return {"error": [result.where, result.problem, str(result)]}
    return {"passage": [result.id, result.text, result.title, result.source, result.fields, result.where]}


def _record_passage(item: Any, where: str, source: str, names: FieldNames) -> Passage | InputError:
    """One Python item as a passage, checked as a JSON Lines record is, and its fields in their stored (JSON) form."""
    if isinstance(item, Passage):
        if not isinstance(item.id, str) or not item.id.strip():
            return InputError(where, f"passage id {item.id!r} is not a non-empty string", SKIP_HINT)
        if not isinstance(item.text, str):
            return InputError(where, "the passage's text is not a string", SKIP_HINT)
        title = str(item.title) if item.title not in (None, "") else None
        passage = Passage(item.id, item.text, title, item.source or source, dict(item.fields), where)
    elif isinstance(item, Mapping):
        if not all(isinstance(key, str) for key in item):
            return InputError(where, "a passage's keys must be strings", SKIP_HINT)
        result = _passage_from_record(dict(item), where, source, names)
        if isinstance(result, InputError):
            return result
        passage = result
    else:
        return InputError(where, f"a {type(item).__name__}, not a mapping with an id and a text", SKIP_HINT)
    try:
        for text in (passage.id, passage.text, passage.title or ""):
            text.encode("utf-8")
        # The form the index stores (store.passage_row): values JSON has no type for become their str().
        stored = json.dumps(passage.fields, ensure_ascii=False, default=str, sort_keys=True)
        stored.encode("utf-8")
    except UnicodeEncodeError:
        return InputError(where, "holds text that is not valid Unicode (a lone surrogate)", SKIP_HINT)
    except (TypeError, ValueError, RecursionError) as exc:
        return InputError(where, f"has fields that cannot be stored as JSON ({exc})", SKIP_HINT)
    passage.fields = json.loads(stored)
    return passage


# A function that returns the character spans of a text's tokens; used to cap text-file windows.
TokenSpans = Callable[[str], list[tuple[int, int]]]


def format_of_name(name: str) -> str | None:
    """The format a file name implies (``x.jsonl.gz`` is JSON Lines), or None for an unknown extension."""
    suffixes = [s.lower() for s in Path(name).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None


def detect_format(path: str) -> str:
    """The format a file's name implies (``-`` is JSON Lines)."""
    if path == "-":
        return "jsonl"
    fmt = format_of_name(path)
    if fmt is None:
        which = spell(f"--format ({'|'.join(FORMATS)})", f"fmt= (one of {', '.join(map(repr, FORMATS))})")
        raise UsageError(f"{path}: cannot tell the format from the name; pass {which}")
    return fmt


def suffixes_of(fmt: str | None) -> list[str]:
    """The extensions a directory walk reads for ``fmt`` (every supported one for None); each also as ``.gz``."""
    return sorted(s for s, f in _SUFFIX_FORMATS.items() if fmt is None or f == fmt)


def is_index_dir(path: str | os.PathLike[str]) -> bool:
    """True for a dsearch index directory: never part of a corpus, even when it sits inside one."""
    manifest = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest):
        return False
    try:
        with open(manifest, "rb") as fh:
            data = json.load(fh)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME


# File types a link to nothing may be taken for besides those in Python's table of media types, which predates
# them: office documents, notebooks, configuration, logs, archives and data files that corpus folders hold.
_MORE_FILE_SUFFIXES = frozenset(
    ".docx .xlsx .pptx .odt .ods .odp .epub .ipynb .yaml .yml .toml .ini .cfg .conf .log .7z .rar .bz2 .xz .zst "
    ".tgz .jar .whl .iso .db .sqlite .npy .npz .pkl .flac .ogg .m4a .mkv".split()
)


def _known_file_type(name: str) -> bool:
    """True when ``name`` ends in the extension of a known file type: a corpus format, one in Python's table of
    media types (``.pdf``, ``.png``, ``.html``, ``.zip``…), or one of a few more (``.docx``, ``.yaml``, ``.7z``…)."""
    suffix = Path(name).suffix.lower()
    return bool(suffix) and (format_of_name(name) is not None or _file_suffix(suffix))


@functools.cache
def _file_suffix(suffix: str) -> bool:
    import mimetypes  # only once a corpus folder holds a file of another type

    if suffix in _MORE_FILE_SUFFIXES:
        return True
    # Only the table Python ships (a MimeTypes instance ignores /etc/mime.types): the same answer on every machine.
    kind, encoding = mimetypes.MimeTypes().guess_type("x" + suffix, strict=False)
    return kind is not None or encoding is not None


def dangling_link(path: Path, fmt: str | None) -> InputError | None:
    """The error for ``path``, a symlink to nothing inside a corpus folder; None when skipping it loses nothing.

    A link whose target is gone cannot say whether it was a file or a folder, so it is taken for whatever could
    have held passages: a corpus file this run reads (``b.jsonl``), or a folder (``archive``, ``archive.2024``,
    ``v1.2``: a name with no extension, or with one that no file type has), whose passages an ``--update`` would
    otherwise remove with exit 0. Only a name that says it is a file of another type (``logo.png``,
    ``notes.docx``, ``README.md`` under ``--format jsonl``) is skipped, as that file would be: a broken link to a
    picture in a docs folder does not stop a nightly build, an unmounted disk does.
    """
    file_fmt = format_of_name(path.name)
    if not (file_fmt is not None and (fmt is None or file_fmt == fmt)) and _known_file_type(path.name):
        return None
    return InputError(
        str(path), f"a symlink to {os.readlink(path)}, which does not exist (a disk not mounted?)",
        "mount it, or remove the link",
    )  # fmt: skip


def link_above(path: str, real: str, root: str) -> InputError | None:
    """The error for ``path``, a folder inside the corpus folder ``root`` whose real path ``real`` holds ``root``
    itself (``corpus/up -> ..``, ``corpus/all -> /``); None for any other folder.

    Followed, such a link reads everything around the corpus (the whole disk, for ``/``) and the corpus once more
    inside it; that is never what the link was made for. Skipped, the passages an earlier dsearch read through
    it would be removed by the next ``--update`` with exit 0. So it stops the run, like a link to nothing. (A link
    to the corpus folder itself, or to a folder inside it, reads nothing twice: the walk skips folders it has
    already visited.) A link to any other folder is followed, however large: a disk of documents linked in is
    what links are for, and ``index -v`` logs how many files and folders each corpus path held.
    """
    if not root.startswith(real.rstrip(os.sep) + os.sep):
        return None
    return InputError(
        path, f"a symlink to {real}, which holds the corpus folder {root} itself: it would read all of {real}",
        "link the folders you mean instead, or remove the link",
    )  # fmt: skip


def corpus_files(
    root: str | os.PathLike[str], fmt: str | None = None, exclude: Iterable[str | os.PathLike[str]] = ()
) -> list[Path]:
    """The files of a corpus directory that are read, in sorted order.

    A file is read when its extension names ``fmt`` (any supported format when None). Hidden files and
    directories, dsearch index directories and the ``exclude`` paths (the index being built) are skipped, so an
    index written inside its own corpus is never read back as corpus. Symlinks to folders are followed (the user
    linked them in to be read); a folder reached a second time, by another link or a link to a folder above it,
    is read once (at the path the walk, in sorted order, meets first). A link to a folder that holds the corpus
    folder, or to nothing, stops the walk with an InputError: see :func:`link_above` and :func:`dangling_link`.
    """
    root = Path(root)
    excluded = {os.path.realpath(p) for p in exclude}
    found: list[tuple[tuple[str, ...], Path]] = []
    root_real = os.path.realpath(root)
    visited = {root_real}  # folders already walked or queued: a link loop ends here

    def unreadable(exc: OSError) -> None:
        # os.walk skips a folder it cannot list: an --update would remove its passages and exit 0
        where = exc.filename if exc.filename else str(root)
        raise InputError(str(where), f"cannot read this folder ({exc.strerror})", "check its permissions")

    def walked(directory: str, name: str) -> bool:
        path = os.path.join(directory, name)
        real = os.path.realpath(path)
        if name.startswith(".") or real in excluded or real in visited or is_index_dir(path):
            return False
        problem = link_above(path, real, root_real)
        if problem is not None:
            raise problem
        visited.add(real)
        return True

    for directory, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        dirnames[:] = [d for d in sorted(dirnames) if walked(directory, d)]
        if os.path.realpath(directory) in excluded:
            dirnames[:] = []
            continue
        for name in filenames:
            path = Path(directory, name)
            file_fmt = format_of_name(name)
            wanted = file_fmt is not None and (fmt is None or file_fmt == fmt)
            # Worth a stat: a name that is read, or that could be a link to a folder that is gone.
            if name.startswith(".") or not (wanted or not _known_file_type(name)):
                continue
            if path.is_file():
                if wanted:
                    found.append((path.relative_to(root).parts, path))
            elif path.is_symlink() and not path.exists():
                # A corpus file, or a linked folder, on a disk that is not mounted: skipping it would drop its
                # passages (an --update would remove them and exit 0). dangling_link says which names are safe.
                problem = dangling_link(path, fmt)
                if problem is not None:
                    raise problem
    return [path for _, path in sorted(found)]


def needs_tokenizer(paths: Iterable[str | Records], fmt: str | None = None, exclude: Iterable[str] = ()) -> bool:
    """True when some input is plain text / Markdown, whose paragraphs are cut into windows by token count."""
    if fmt is not None:
        return fmt == "text"
    for path in paths:
        if not isinstance(path, str) or path == "-":
            continue
        if os.path.isdir(path):
            if any(format_of_name(f.name) == "text" for f in corpus_files(path, None, exclude)):
                return True
        elif format_of_name(path) == "text":
            return True
    return False


def read_corpus(
    paths: Iterable[str | Records],
    fmt: str | None = None,
    names: FieldNames | None = None,
    skip_bad: bool = False,
    stats: CorpusStats | None = None,
    token_spans: TokenSpans | None = None,
    max_tokens: int = 256,
    stdin: IO[bytes] | None = None,
    exclude: Iterable[str | os.PathLike[str]] = (),
    log_skipped: bool = True,
) -> Iterator[Passage]:
    """Yield the passages of every path in order, checking ids for duplicates and skipping empty text.

    A directory is read for every file of a supported format (or of ``fmt`` when given), see
    :func:`corpus_files`; ``exclude`` names directories to leave out (the index being written). Skipped bad
    records are logged (INFO) unless ``log_skipped`` is False (a second pass over the same corpus).
    """
    names = names or FieldNames()
    stats = stats if stats is not None else CorpusStats()
    exclude = tuple(exclude)
    seen: set[str] = set()
    for path in paths:
        items = path.read(names) if isinstance(path, Records) else _read_path(
            path, fmt, names, token_spans, max_tokens, stdin, exclude
        )
        for item in items:
            if isinstance(item, InputError):
                if not skip_bad:
                    raise item
                _count_bad(item, stats, log_skipped)
                continue
            if not item.text.strip():
                stats.skipped_empty += 1
                continue
            if item.id in seen:
                err = InputError(item.where, f"duplicate id {item.id!r}", "ids must be unique; " + SKIP_HINT)
                if not skip_bad:
                    raise err
                _count_bad(err, stats, log_skipped)
                continue
            seen.add(item.id)
            stats.read += 1
            yield item
    if log_skipped and stats.skipped_bad > MAX_LOGGED_BAD:
        log.info("%d more bad records skipped, not listed", stats.skipped_bad - MAX_LOGGED_BAD)


def _count_bad(err: InputError, stats: CorpusStats, log_skipped: bool) -> None:
    stats.skipped_bad += 1
    stats.first_bad = stats.first_bad or str(err)
    if log_skipped and stats.skipped_bad <= MAX_LOGGED_BAD:
        log.info("%s: %s (skipped)", err.where, err.problem)


def _read_path(
    path: str,
    fmt: str | None,
    names: FieldNames,
    token_spans: TokenSpans | None,
    max_tokens: int,
    stdin: IO[bytes] | None,
    exclude: tuple[str | os.PathLike[str], ...],
) -> Iterator[Passage | InputError]:
    """One command-line path: stdin, a file, or a directory read file by file."""
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if path == "-":
        yield from _read_file("-", fmt or "jsonl", "<stdin>", names, token_spans, max_tokens, stdin)
        return
    utf8_name(path)
    if os.path.isdir(path):
        files = corpus_files(path, fmt, exclude)
        for file in files:  # all of them before the first passage: not hours later, at the write of its source
            utf8_name(str(file))
        if not files:
            # Not an error here: an empty (or unmounted) folder is what the build's removal limit guards against,
            # so it refuses to wipe an index (exit 9) and a new index of nothing fails (exit 1) with one line.
            # The error names the folder and what it is read for (indexer._no_passages).
            return
        for file in files:
            rel = file.relative_to(path).as_posix()
            yield from _read_file(
                str(file), fmt or detect_format(file.name), rel, names, token_spans, max_tokens, stdin
            )
        return
    if not os.path.exists(path):
        if os.path.islink(path):  # a link to nothing, or to itself through others (a loop)
            raise InputError(path, f"a symlink that leads nowhere ({_link_problem(path)})", "fix the link")
        raise InputError(path, "no such file or directory")
    yield from _read_file(path, fmt or detect_format(path), Path(path).name, names, token_spans, max_tokens, stdin)


def utf8_name(path: str) -> None:
    """Refuse a path whose name is not UTF-8 (Linux allows any bytes): the manifest and each passage's ``source``
    are UTF-8 text, and writing them failed once every passage was encoded ('unexpected UnicodeEncodeError')."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise InputError(shown, "the name is not valid UTF-8", "rename it") from None


def _link_problem(path: str) -> str:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.strerror or "unreadable"
    return "unreadable"


def _read_file(
    path: str,
    fmt: str,
    rel: str,
    names: FieldNames,
    token_spans: TokenSpans | None,
    max_tokens: int,
    stdin: IO[bytes] | None,
) -> Iterator[Passage | InputError]:
    """One file in one format. ``rel`` is its name relative to the corpus root, used in text passages' ids."""
    label = "<stdin>" if path == "-" else path
    try:
        if fmt == "parquet":
            yield from _read_parquet(path, names)
        elif fmt == "text":
            with _open_binary(path, stdin) as fh:
                data = fh.read()  # one document at a time: text files are documents, not corpora
            markdown = _base_suffix(path) in MARKDOWN_SUFFIXES
            yield from _split_text_file(data, label, rel, token_spans, max_tokens, markdown)
        else:
            with _open_binary(path, stdin) as fh:
                if fmt == "jsonl":
                    yield from _read_jsonl(fh, label, names)
                else:
                    yield from _read_delimited(fh, label, names, "\t" if fmt == "tsv" else ",")
    # A bad .gz fails the whole file, even with --skip-bad: nothing after the damage can be read.
    except gzip.BadGzipFile as exc:
        if str(exc).startswith("Not a gzipped file"):
            raise InputError(label, "not a gzip file, though its name ends in .gz", "rename it or gzip it") from exc
        raise InputError(label, f"corrupt gzip file ({exc})", "re-download it") from exc
    except EOFError as exc:
        raise InputError(label, "truncated gzip file (the compressed data ends early)", "re-download it") from exc
    except zlib.error as exc:
        raise InputError(label, f"corrupt gzip data ({exc})", "re-download it") from exc
    except OSError as exc:  # unreadable: permissions, a vanished file, a device error
        raise InputError(label, f"cannot read ({exc.strerror or exc})") from exc


def _base_suffix(path: str) -> str:
    """The extension that names the format: ``.md`` for ``notes.md.gz``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _open_binary(path: str, stdin: IO[bytes] | None) -> IO[bytes]:
    if path == "-":
        raw = stdin if stdin is not None else sys.stdin.buffer
        return _NoClose(raw)
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


class _NoClose(io.BufferedIOBase):
    """Wraps stdin so that ``with`` does not close it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._raw)

    def read(self, size: int | None = -1) -> bytes:
        return self._raw.read(size)

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


_NOT_ID_TYPES = (dict, list, bool)


def _text_of_bytes(value: Any) -> Any:
    """A Parquet binary column's value as the text it holds (Spark and others write strings as binary, without
    the UTF8 annotation): its UTF-8 decoding, or None when it is not UTF-8; any other value unchanged."""
    if not isinstance(value, bytes | bytearray):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _passage_from_record(record: dict[str, Any], where: str, source: str, names: FieldNames) -> Passage | InputError:
    id_key = _pick(record, names.id, DEFAULT_ID_FIELDS)
    text_key = _pick(record, names.text, DEFAULT_TEXT_FIELDS)
    title_key = _pick(record, names.title, DEFAULT_TITLE_FIELDS)
    if id_key is None or record.get(id_key) is None:
        wanted = names.id or "/".join(DEFAULT_ID_FIELDS)
        return InputError(where, f"missing id field {wanted!r}", f"name it with {option('id_field')}, or {SKIP_HINT}")
    raw_id = _text_of_bytes(record[id_key])
    if raw_id is None:
        return InputError(where, f"id field {id_key!r} holds bytes that are not UTF-8", SKIP_HINT)
    not_finite = isinstance(raw_id, float) and not math.isfinite(raw_id)  # "nan" would be an id, and a duplicate
    if not_finite or (type(raw_id) is not str and isinstance(raw_id, _NOT_ID_TYPES)):
        return InputError(where, f"id field {id_key!r} is not a string or a number", SKIP_HINT)
    # The id is kept exactly as given (spaces, tabs and all): qrels and other tools must find it unchanged.
    pid = str(raw_id)
    if not pid.strip():
        return InputError(where, f"empty id in field {id_key!r}", "every passage needs an id; " + SKIP_HINT)
    if text_key is None or text_key not in record:
        wanted = names.text or "/".join(DEFAULT_TEXT_FIELDS)
        fix = f"name it with {option('text_field')}, or {SKIP_HINT}"
        return InputError(where, f"missing text field {wanted!r}", fix)
    text = _text_of_bytes(record[text_key])
    if text is None and record[text_key] is not None:
        return InputError(where, f"text field {text_key!r} holds bytes that are not UTF-8", SKIP_HINT)
    if text is None:
        text = ""
    if not isinstance(text, str):
        return InputError(where, f"text field {text_key!r} is not a string", SKIP_HINT)
    title = _text_of_bytes(record.get(title_key)) if title_key else None
    if title is None and title_key and record.get(title_key) is not None:
        return InputError(where, f"title field {title_key!r} holds bytes that are not UTF-8", SKIP_HINT)
    title = str(title) if title not in (None, "") else None
    used = {id_key, text_key, title_key}
    fields = {k: v for k, v in record.items() if k not in used}
    return Passage(pid, text, title, source, fields, where)


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
        except RecursionError:
            yield InputError(where, f"JSON nested more than {MAX_JSON_DEPTH} levels deep", SKIP_HINT)
            continue
        if not isinstance(record, dict):
            yield InputError(where, "a JSON line must be an object", SKIP_HINT)
            continue
        # Only a line that could hold a lone surrogate or deep nesting is walked: the rest cost two scans.
        if "\\u" in line or line.count("[") + line.count("{") > MAX_JSON_DEPTH:
            problem = _json_problem(record)
            if problem:
                yield InputError(where, problem, SKIP_HINT)
                continue
        yield _passage_from_record(record, where, label, names)


def _json_problem(record: dict[str, Any]) -> str | None:
    """What parsed but cannot be stored: a lone surrogate escape (not text), or nesting too deep to re-serialise."""
    stack: list[tuple[Any, int]] = [(record, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"JSON nested more than {MAX_JSON_DEPTH} levels deep"
        if isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                code = ord(value[exc.start])
                return f"lone surrogate \\u{code:04x} in a string (not valid Unicode)"
    return None


def _read_delimited(fh: IO[bytes], label: str, names: FieldNames, delimiter: str) -> Iterator[Passage | InputError]:
    """TSV and CSV. A first row that names the id and text columns is a header; otherwise ``id<TAB>text``."""
    header: list[str] | None = None
    first = True
    rows = _tsv_rows(fh, label) if delimiter == "\t" else _csv_rows(fh, label)
    for lineno, row in rows:
        where = f"{label}:{lineno}"
        if isinstance(row, InputError):
            yield row
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank lines are not records
        if first:
            first = False
            if _looks_like_header(row, names):
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


def _tsv_rows(fh: IO[bytes], label: str) -> Iterator[tuple[int, list[str] | InputError]]:
    """TSV has no quoting (MS MARCO's collection has bare quotes in its text): a line is a record."""
    for lineno, raw in enumerate(fh, 1):
        text = _decode(raw, f"{label}:{lineno}")
        if isinstance(text, str):
            text = text.rstrip("\r\n")
            if lineno == 1:
                text = text.lstrip("\ufeff")
            yield lineno, text.split("\t")
        else:
            yield lineno, text


def _csv_rows(fh: IO[bytes], label: str) -> Iterator[tuple[int, list[str] | InputError]]:
    """Standard CSV (RFC 4180): a quoted field may hold newlines, so a record can span lines.

    Each record comes with the line it starts on. Lines are decoded one at a time so that bad UTF-8 names its
    own line; the record holding it is reported instead of read, and the records around it still are.
    """
    bad: list[InputError] = []

    def lines() -> Iterator[str]:
        for lineno, raw in enumerate(fh, 1):
            text = _decode(raw, f"{label}:{lineno}")
            if isinstance(text, InputError):
                bad.append(text)
                text = raw.decode("utf-8", "replace")
            yield text.lstrip("\ufeff") if lineno == 1 else text

    # Line endings stay on each line, as with open(newline=''): the csv module needs them inside quoted fields.
    reader = csv.reader(lines(), strict=True)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            bad.clear()
            yield start, InputError(f"{label}:{start}", f"malformed CSV record ({exc})", SKIP_HINT)
            start = reader.line_num + 1
            continue
        if bad:
            yield start, bad[0]
            bad.clear()
        else:
            yield start, row
        start = reader.line_num + 1


def _looks_like_header(row: list[str], names: FieldNames) -> bool:
    ids = (names.id,) if names.id else DEFAULT_ID_FIELDS
    texts = (names.text,) if names.text else DEFAULT_TEXT_FIELDS
    return any(c in ids for c in row) and any(c in texts for c in row)


def _read_parquet(path: str, names: FieldNames) -> Iterator[Passage | InputError]:
    import pyarrow.parquet as pq

    with contextlib.ExitStack() as stack:
        source: Any = path
        if path.lower().endswith(".gz"):
            # Parquet reads its footer first and then seeks back: a gzip stream would be decompressed over and
            # over, so it is decompressed once to a temporary file (disk, not memory).
            source = stack.enter_context(tempfile.TemporaryFile())
            with gzip.open(path, "rb") as fh:
                shutil.copyfileobj(fh, source, 1 << 20)
            source.seek(0)
        try:
            pf = pq.ParquetFile(source)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise InputError(path, f"not a readable Parquet file ({exc})") from exc
        row_number = 0
        for batch in pf.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row_number += 1
                yield _passage_from_record(record, f"{path}:row {row_number}", path, names)


# --- plain text and Markdown -------------------------------------------------------------------------

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")  # Markdown's "# Title"
# An RST or Markdown (setext) underline, overline or rule: one adornment character, three times or more.
_UNDERLINE = re.compile(r"^\s{0,3}([=\-~^*+#_])\1{2,}\s*$")
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
# A sentence ends with . ! ? or … and maybe closing quotes or brackets; the next one starts with no lowercase.


@dataclass
class _TextState:
    """What one text file's reading carries from paragraph to paragraph."""

    heading: str | None = None
    in_fence: bool = False  # inside a Markdown code fence: no headings there
    ids: dict[str, int] = field(default_factory=dict)  # id -> times used, for duplicate texts


def _split_text_file(
    data: bytes, label: str, rel: str, token_spans: TokenSpans | None, max_tokens: int, markdown: bool
) -> Iterator[Passage | InputError]:
    """Paragraphs (blank-line separated), each cut into overlapping windows of at most ``max_tokens``.

    A heading (Markdown ``#``, or a line underlined with ``===``/``---`` in any text file) is not a passage: it
    titles the passages below it. Ids are ``rel#hash`` of the window's text (see :func:`_text_id`).
    """
    text = _decode(data, label)
    if isinstance(text, InputError):
        yield text
        return
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    if markdown:
        text = _blank_front_matter(text)
    state = _TextState()
    line_of_offset = _line_index(text)
    for start, paragraph in _paragraphs(text):
        first_line = line_of_offset(start)
        for offset, block in _blocks(paragraph.split("\n"), markdown, state):
            for window in _windows(block, token_spans, max_tokens):
                pid = _text_id(rel, window, state.ids)
                yield Passage(pid, window, state.heading, rel, {}, f"{label}:{first_line + offset}")


def _blank_front_matter(text: str) -> str:
    """Markdown's YAML front matter (``---`` … ``---`` at the top) is metadata, not passages: blank it out,
    keeping its newlines so that line numbers stay right."""
    if not text.startswith("---\n"):
        return text
    end = text.find("\n---\n", 3)
    if end < 0:
        return text
    end += len("\n---\n")
    return "\n" * text.count("\n", 0, end) + text[end:]


def _blocks(lines: list[str], markdown: bool, state: _TextState) -> Iterator[tuple[int, str]]:
    """The passages of one paragraph's lines, as (line offset, text); headings found update ``state.heading``."""
    buf: list[str] = []
    buf_start = 0
    for i, line in enumerate(lines):
        if markdown and _FENCE.match(line):
            state.in_fence = not state.in_fence
        elif not state.in_fence:
            atx = _HEADING.match(line) if markdown else None
            under = None if atx else _UNDERLINE.match(line)
            if atx or under:
                # Markdown underlines a heading with = or - only; its *** or ___ is a rule. RST takes any.
                underlines = under is not None and bool(buf) and (not markdown or under.group(1) in "=-")
                title = atx.group(1) if atx else buf.pop().strip() if underlines else None
                if buf:
                    yield buf_start, "\n".join(buf).strip()
                    buf = []
                if atx or underlines:  # a rule, or an overline with nothing above it, titles nothing
                    state.heading = title or None
                continue
        if not buf:
            buf_start = i
        buf.append(line)
    if buf:
        yield buf_start, "\n".join(buf).strip()


def _text_id(rel: str, text: str, used: dict[str, int]) -> str:
    """``rel#<hash of the text>``: stable when other paragraphs are inserted, moved or removed.

    ``rel`` is the file's path relative to the corpus root, so the id does not depend on how the corpus path was
    typed. The same text twice in one file gets ``-2``, ``-3``… in order.
    """
    base = f"{rel}#{xxhash.xxh3_64_hexdigest(text.encode('utf-8'))[:TEXT_ID_HASH_CHARS]}"
    count = used.get(base, 0) + 1
    used[base] = count
    return base if count == 1 else f"{base}-{count}"


def _paragraphs(text: str) -> Iterator[tuple[int, str]]:
    for match in re.finditer(r"\S(?:.|\n(?![ \t]*\n))*", text):
        yield match.start(), match.group(0).strip()


def _line_index(text: str) -> Callable[[int], int]:
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def line_of(offset: int) -> int:
        return bisect.bisect_left(newlines, offset) + 1

    return line_of


def _windows(paragraph: str, token_spans: TokenSpans | None, max_tokens: int) -> Iterator[str]:
    """Cut a paragraph into windows of ``max_tokens`` tokens that overlap by about an eighth, each starting
    at a sentence when one is near (see :func:`dsearch.windows.window_spans`)."""
    spans_of = token_spans or (lambda text: [m.span() for m in re.finditer(r"\S+", text)])
    for start, end in window_spans(paragraph, spans_of, max_tokens, overlap=max(1, max_tokens // 8)):
        yield paragraph[start:end]
