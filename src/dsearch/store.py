"""The index directory on disk: write a segment, publish it atomically, open and validate it.

Layout (see README, "The index directory")::

    DIR/manifest.json            written last; names the segments
    DIR/seg-<id>/index.faiss     exact inner-product FAISS index (IndexFlatIP)
    DIR/seg-<id>/passages.parquet  row-aligned metadata: id, title, text, source, fields, content_hash

``row`` is always a position in the FAISS index; ``id`` is always the user's passage id.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import stat
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from dsearch.corpus import Passage
from dsearch.errors import IncompleteError, IndexDirError, LockedError, NewerIndexError
from dsearch.manifest import MANIFEST_FILE, SEGMENT_NAME, FileInfo, Manifest, Segment, read_manifest

log = logging.getLogger("dsearch")

INDEX_FILE = "index.faiss"
PASSAGES_FILE = "passages.parquet"
INDEX_TYPE = "IndexFlatIP"
# Small row groups keep hit lookups cheap: a hit reads only its own group of this many passages.
ROW_GROUP_SIZE = 1000
# A split passage's windows are rows of their own, each with the character span of its window in ``text``.
WINDOW_COLUMNS = ("window_start", "window_end")
PASSAGE_COLUMNS = ("id", "title", "text", "source", "fields", "content_hash", *WINDOW_COLUMNS)
# Row groups kept in memory by a reader: at most this many times ROW_GROUP_SIZE passages.
GROUP_CACHE_SIZE = 128
# Rows scored at once by the exact search: bounds the score matrix at queries x this many floats.
SEARCH_BLOCK_ROWS = 65536
# A filter keeping fewer than 1/this of a segment's rows is searched by gathering those rows' vectors.
SPARSE_FILTER_RATIO = 8


def content_hash(text: str) -> str:
    """Hash of exactly what the encoder sees; equal hashes mean the stored vector can be reused."""
    return xxhash.xxh3_64_hexdigest(text.encode("utf-8"))


def file_info(path: Path) -> FileInfo:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return FileInfo(bytes=path.stat().st_size, xxh3_128=digest.hexdigest())


# --- writing -----------------------------------------------------------------------------------------


class FlatIndexFileWriter:
    """Streams vectors into a FAISS ``IndexFlatIP`` file without holding them in memory.

    FAISS can only serialise an index it holds whole; this writes the same bytes as
    ``faiss.write_index`` (a test compares them) so memory stays bounded by one batch.
    ``resume_rows`` reopens a file left by an interrupted run and cuts it back to its last checkpoint.
    """

    _MAGIC = b"IxFI"
    _HEADER = struct.Struct("<iqqq?i")  # d, ntotal, dummy, dummy, is_trained, metric (0 = inner product)
    _COUNT = struct.Struct("<Q")  # number of floats that follow
    HEADER_BYTES = len(_MAGIC) + _HEADER.size + _COUNT.size

    def __init__(self, path: Path, dim: int, resume_rows: int | None = None) -> None:
        self.path = path
        self.dim = dim
        if resume_rows is None:
            self.ntotal = 0
            self._fh = open(path, "wb")
            self._write_header()
        else:
            self.ntotal = resume_rows
            self._fh = open(path, "r+b")
            self._fh.truncate(self.HEADER_BYTES + resume_rows * dim * 4)
            self._fh.seek(0, os.SEEK_END)

    def _write_header(self) -> None:
        self._fh.write(self._MAGIC)
        self._fh.write(self._HEADER.pack(self.dim, self.ntotal, 1 << 20, 1 << 20, True, 0))
        self._fh.write(self._COUNT.pack(self.ntotal * self.dim))

    def add(self, vectors: Any) -> None:
        import numpy as np

        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of dimension {self.dim}, got shape {vectors.shape}")
        self._fh.write(vectors.tobytes())
        self.ntotal += len(vectors)

    def checkpoint(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.seek(0)
        self._write_header()  # now with the real counts
        self.checkpoint()
        self._fh.close()


def _passage_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [(name, pa.int64() if name in WINDOW_COLUMNS else pa.string()) for name in PASSAGE_COLUMNS]
    )


class PassageTableWriter:
    """Writes row-aligned passage metadata to Parquet, one small row group at a time."""

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self.schema = _passage_schema()
        self.path = path
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self._buffer: dict[str, list[Any]] = {name: [] for name in PASSAGE_COLUMNS}
        self.rows = 0

    def add_row(self, row: dict[str, Any]) -> None:
        for name in PASSAGE_COLUMNS:
            self._buffer[name].append(row.get(name))
        self.rows += 1
        if len(self._buffer["id"]) >= ROW_GROUP_SIZE:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._buffer["id"]:
            return
        self._writer.write_table(pa.table(self._buffer, schema=self.schema), row_group_size=ROW_GROUP_SIZE)
        self._buffer = {name: [] for name in PASSAGE_COLUMNS}

    def close(self) -> None:
        self._flush()
        self._writer.close()


def passage_row(passage: Passage, hash_: str) -> dict[str, str | None]:
    """The stored form of a passage: user fields as one JSON string, so any shape of record fits one schema."""
    fields = json.dumps(passage.fields, ensure_ascii=False, default=str, sort_keys=True) if passage.fields else None
    return {
        "id": passage.id,
        "title": passage.title,
        "text": passage.text,
        "source": passage.source,
        "fields": fields,
        "content_hash": hash_,
    }


class SegmentWriter:
    """Writes one segment directory: vectors and their passages, kept row-aligned, with checkpoints.

    Passages go to numbered Parquet part files, each closed at a checkpoint, so that a killed run keeps every
    checkpointed row; ``close`` merges the parts into ``passages.parquet``.
    """

    PARTS = "parts"

    def __init__(self, directory: Path, dim: int, resume_rows: int | None = None, resume_parts: int = 0) -> None:
        self.directory = directory
        self.parts_dir = directory / self.PARTS
        if resume_rows is None:
            self.parts_dir.mkdir(parents=True)
        else:
            for part in self.parts_dir.glob("*.parquet"):
                if int(part.stem.split("-")[1]) >= resume_parts:
                    part.unlink()  # written after the last checkpoint: its rows are redone
            for tmp in self.parts_dir.glob(".*"):
                tmp.unlink()
            for entry in directory.iterdir():  # an ANN file a run killed while writing it (after the last checkpoint)
                if ANN_NAME.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                    entry.unlink()
        self.vectors = FlatIndexFileWriter(directory / INDEX_FILE, dim, resume_rows)
        self.parts = resume_parts
        self._part: PassageTableWriter | None = None

    @property
    def rows(self) -> int:
        return self.vectors.ntotal

    def add(self, rows: list[dict[str, Any]], vectors: Any) -> None:
        if len(rows) != len(vectors):
            raise ValueError("passages and vectors must be row-aligned")
        if self._part is None:
            self._part = PassageTableWriter(self.parts_dir / f".part-{self.parts:06d}.parquet")
        self.vectors.add(vectors)
        for row in rows:
            self._part.add_row(row)

    def checkpoint(self) -> int:
        """Make every row so far durable; returns the number of parts to keep on resume."""
        if self._part is not None:
            self._part.close()
            os.replace(self._part.path, self.parts_dir / f"part-{self.parts:06d}.parquet")
            self.parts += 1
            self._part = None
        self.vectors.checkpoint()
        return self.parts

    def close(self) -> Segment:
        self.checkpoint()
        self.vectors.close()
        merged = PassageTableWriter(self.directory / PASSAGES_FILE)
        import pyarrow.parquet as pq

        for number in range(self.parts):
            part = pq.ParquetFile(self.parts_dir / f"part-{number:06d}.parquet")
            for batch in part.iter_batches(batch_size=ROW_GROUP_SIZE):
                for row in batch.to_pylist():
                    merged.add_row(row)
        merged.close()
        fault_point("merged")
        # The parts stay until publish moves the segment: a crash before then can still resume from them.
        if merged.rows != self.vectors.ntotal:
            raise IndexDirError(f"{self.directory}: {merged.rows} passages but {self.vectors.ntotal} vectors")
        files = {name: file_info(self.directory / name) for name in (INDEX_FILE, PASSAGES_FILE)}
        return Segment(path=self.directory.name, rows=self.vectors.ntotal, files=files)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- what in DIR is ours ----------------------------------------------------------------------------
# Cleanup deletes only entries that dsearch itself creates, matched by exact name (never by glob, whose
# metacharacters in a user's -o could reach other directories), and never follows a symlink.

LOCK_FILE = ".dsearch.lock"
MANIFEST_TMP = f".{MANIFEST_FILE}.tmp"
STAGING_NAME = re.compile(r"\.staging-[0-9]{14}-[0-9a-f]{8}")
# A segment's ANN file (vector_index.build_ann names it): `dsearch reindex` writes the new one into the published
# segment before the manifest swap, so a killed reindex leaves one that no manifest lists.
ANN_NAME = re.compile(r"ann-[0-9a-f]{12}\.faiss")


def _new_token() -> str:
    return f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _ours(path: Path) -> bool:
    """An entry of DIR that dsearch writes: the manifest, its temp file, the lock, segments, staging areas."""
    name = path.name
    if name in (MANIFEST_FILE, MANIFEST_TMP, LOCK_FILE):
        return path.is_file() and not path.is_symlink()
    if SEGMENT_NAME.fullmatch(name) or STAGING_NAME.fullmatch(name):
        return _is_real_dir(path)
    return False


def check_target(target: Path) -> bool:
    """True when ``target`` holds an index to replace; False when it is new, empty or holds only dsearch's leftovers.

    A directory with a manifest is replaced even if the manifest is corrupt, but only when everything in it is
    ours: a folder of the user's that happens to hold a ``manifest.json`` is refused.
    """
    try:
        str(target).encode("utf-8")
    except UnicodeEncodeError:  # the manifest records paths as UTF-8 text
        shown = os.fsencode(target).decode("utf-8", "backslashreplace")
        raise IndexDirError(f"{shown}: the name is not valid UTF-8; choose another -o") from None
    if not target.exists():
        return False
    if not target.is_dir():
        raise IndexDirError(f"{target}: exists and is not a directory; choose another -o")
    foreign = sorted(p.name for p in target.iterdir() if not _ours(p))
    has_manifest = (target / MANIFEST_FILE).is_file()
    valid = has_manifest and _manifest_is_valid(target)  # raises for an index of a newer format
    if foreign and not valid:
        raise IndexDirError(
            f"{target}: exists and is not a dsearch index; refusing to overwrite it "
            f"(it holds {foreign[0]!r}; choose another -o or remove it)"
        )
    return has_manifest


def _manifest_is_valid(target: Path) -> bool:
    """Whether the manifest at ``target`` reads (a corrupt one does not: a rebuild is its repair). An index a newer
    dsearch wrote is an IndexDirError: it may hold what this one cannot rebuild or even see, so it is never
    replaced."""
    try:
        read_manifest(target)
    except NewerIndexError as exc:
        raise IndexDirError(
            f"{exc.reason}; nothing was changed (upgrade dsearch, or choose another -o; to rebuild it with this "
            "version, remove it first)"
        ) from None
    except IndexDirError:
        return False
    return True


def leftover_segments(target: Path, keep: set[str]) -> list[Path]:
    """Segment directories in ``target`` that the manifest does not name: what crashed or replaced runs left."""
    if not target.is_dir():
        return []
    found = (p for p in target.iterdir() if SEGMENT_NAME.fullmatch(p.name) and p.name not in keep)
    return sorted(p for p in found if _is_real_dir(p))


def unlisted_ann_files(target: Path, manifest: Manifest) -> list[Path]:
    """ANN files inside the manifest's segments that it does not list: what a killed ``reindex`` left.

    Exact names only, regular files only: a symlink or folder by that name is not ours to judge, and a
    segment folder that is itself a symlink is not looked into.
    """
    found: list[Path] = []
    for segment in manifest.segments:
        seg_dir = target / segment.path
        if not _is_real_dir(seg_dir):
            continue
        for path in seg_dir.iterdir():
            if ANN_NAME.fullmatch(path.name) and path.name not in segment.files:
                if path.is_file() and not path.is_symlink():
                    found.append(path)
    return sorted(found)


def collect_leftovers(target: Path, keep: set[str]) -> int:
    """Remove unnamed segments (call with the lock held); returns how many went."""
    found = leftover_segments(target, keep)
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return len(found)


# --- locking ----------------------------------------------------------------------------------------


@contextmanager
def index_lock(target: Path) -> Iterator[Path]:
    """Hold the write lock on ``target`` or fail at once (exit 4) if another run holds it; yields the real DIR.

    The lock is an OS file lock (flock, POSIX) on ``DIR/.dsearch.lock``. Inside DIR, not beside it: the same directory
    reached through a symlink or as ``-o .`` is the same file, so the lock follows the directory, not how its
    path is spelled; and no lock files pile up next to indexes. The lock dies with its process, so a crash never
    leaves a stale lock; a clean release also removes the file. Removing a lock file is only safe because every
    taker checks, once it holds the lock, that the path still names the file it locked (else it locked an
    unlinked file that guards nothing, and tries again). A first build creates DIR (and the folders above it that
    do not exist) to hold the lock, and removes them again if the run leaves nothing in them.
    """
    import fcntl

    if target.exists() and not target.is_dir():
        raise IndexDirError(f"{target}: exists and is not a directory; choose another -o")
    if target.is_symlink() and not target.exists():
        # Never create what a dangling link points to: it may be a disk that is not mounted.
        raise IndexDirError(
            f"{target}: a symlink to {os.readlink(target)}, which does not exist (a disk not mounted?); "
            "nothing was changed (create that folder, or choose another -o)"
        )
    made: list[Path] = []  # DIR and the folders above it that this run created, deepest first
    try:
        for _attempt in range(10):
            try:
                new = _make_folders(target)
                made = new + [folder for folder in made if folder not in new]
            except FileExistsError as exc:  # a folder above DIR is a dangling symlink
                raise IndexDirError(
                    f"{target}: cannot create it: {exc.filename} is a symlink to nothing (a disk not mounted?); "
                    "nothing was changed (create that folder, or choose another -o)"
                ) from None
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR):
                    raise  # the build's one line for these names the path and the fix (indexer._DISK_FIXES)
                # A symlink loop above DIR, a name too long, a file system that takes no folders (/proc)
                raise IndexDirError(
                    f"{target}: cannot create it ({exc.strerror}); nothing was changed (choose another -o)"
                ) from None
            real = target.resolve()
            path = real / LOCK_FILE
            try:
                # Never through a symlink (it would truncate a file outside DIR), never a FIFO (open would block).
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            except FileNotFoundError:
                continue  # a failed first build removed the directory it had made, just now: make it again
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):  # a link, folder, socket
                    raise _not_our_lock(path) from exc
                raise  # read-only, no permission, disk full: the caller's one line names it (indexer._DISK_FIXES)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise _not_our_lock(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise LockedError(
                    f"{target}: another dsearch run{holder} is writing this index; try again when it ends"
                ) from None
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder before us removed this file as it let go: lock the one at the path now
        else:
            raise LockedError(f"{target}: the lock kept changing hands; try again")
    except BaseException:
        _remove_made(made)  # no lock, no index: the folders made for them go (out of inodes, no permission, ...)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield real
    finally:
        # Unlink before unlocking, so the next taker's inode check sees it; then drop DIR if we made it for nothing.
        with suppress(OSError):
            os.unlink(path)
        _remove_made(made)
        os.close(fd)


def _remove_made(made: list[Path]) -> None:
    """The folders a run made, by the very paths it made them with, while each is empty (rmdir fails on one that
    is not), deepest first: never a folder that was there before, whatever `..` or symlinks the path holds."""
    for folder in made:
        try:
            os.rmdir(folder)
        except OSError:
            break


def _make_folders(folder: Path) -> list[Path]:
    """``mkdir -p folder``: the folders this call created, deepest first. Raises FileExistsError when a part of
    the path exists and is not a folder (a dangling symlink: a disk not mounted?)."""
    made: list[Path] = []  # in the order made: each one's parent before it
    try:
        for _attempt in range(10):
            try:
                _make_missing(folder, made)
                break
            except FileNotFoundError:
                # A parent vanished between our seeing it and making a folder in it: a concurrent first build that
                # failed removed the folder it had made (a sibling -o under the same new parent). Make it again.
                if _attempt == 9:
                    raise
    except BaseException:
        _remove_made(made[::-1])  # x and y of x/y/idx made, idx not (out of inodes): they go too
        raise
    return made[::-1]


def _make_missing(folder: Path, made: list[Path]) -> None:
    missing: list[Path] = []  # below the deepest folder that exists, deepest first
    while True:
        try:
            os.mkdir(folder)
            made.append(folder)
            break
        except FileNotFoundError:  # its parent is missing too
            if folder.parent == folder:
                raise
            missing.append(folder)
            folder = folder.parent
        except FileExistsError:
            if not folder.is_dir():
                raise
            break
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
            made.append(folder)
        except FileExistsError:  # another run made it meanwhile, or `x/..`
            if not folder.is_dir():
                raise


def _not_our_lock(path: Path) -> IndexDirError:
    return IndexDirError(
        f"{path}: a symlink, folder or special file where dsearch keeps its lock; nothing was changed "
        "(remove it if it is not yours, or choose another -o)"
    )


def _lock_holder(fd: int) -> str:
    try:
        return f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
    except (OSError, ValueError):
        return ""


def lock_is_held(target: Path) -> bool:
    """Whether a run holds ``target``'s lock now (a momentary try; never creates anything)."""
    import fcntl

    try:
        fd = os.open(target / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases a lock we took
    return False


# --- staging and publishing -------------------------------------------------------------------------

PROGRESS_FILE = "progress.json"


@dataclass
class Staging:
    """Where a new generation is built (``DIR/.staging-<token>/seg-<token>``) before it is published."""

    target: Path
    root: Path
    segment_dir: Path
    progress: dict[str, Any] | None = None  # the checkpoint of an interrupted run being resumed
    published: bool = False  # set the moment the new manifest is in place: the point of no return
    interrupted_after_publish: bool = False
    result: Any = None  # what the build reports, ready before publishing so an interrupt cannot lose it
    encoded: bool = False  # every passage's vector is checkpointed: a failure from here on keeps the area

    def save_progress(self, progress: dict[str, Any]) -> None:
        save_progress(self.root, progress)


def save_progress(staging_root: Path, progress: dict[str, Any]) -> None:
    """Replace the checkpoint record of a staging area (call with the lock held), atomically."""
    _write_file(staging_root / PROGRESS_FILE, json.dumps(progress).encode("utf-8"), atomic=True)


def staging_dirs(target: Path) -> list[Path]:
    """Staging areas that earlier runs left inside ``target``, matched by their exact name form."""
    if not _is_real_dir(target):
        return []
    return sorted(p for p in target.iterdir() if STAGING_NAME.fullmatch(p.name) and _is_real_dir(p))


def read_progress(staging_root: Path) -> dict[str, Any] | None:
    try:
        progress = json.loads((staging_root / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) else None


def _resumable(root: Path, progress: dict[str, Any]) -> Path | None:
    """The segment directory of a checkpoint when every file the checkpoint counts on is still there."""
    segments = [p for p in root.iterdir() if SEGMENT_NAME.fullmatch(p.name) and _is_real_dir(p)]
    if len(segments) != 1:
        return None  # a crash after the segment moved into DIR: nothing to resume here
    segment = segments[0]
    try:
        rows, parts, dim = int(progress["rows"]), int(progress["parts"]), int(progress["dim"])
        size = (segment / INDEX_FILE).stat().st_size
    except (KeyError, TypeError, ValueError, OSError):
        return None
    if size < FlatIndexFileWriter.HEADER_BYTES + rows * dim * 4:
        return None
    parts_dir = segment / SegmentWriter.PARTS
    if not all((parts_dir / f"part-{n:06d}.parquet").is_file() for n in range(parts)):
        return None
    return segment


def tidy(target: Path) -> None:
    """Remove what crashed runs left in ``target`` (call with the lock held): segments that the manifest does
    not name, ANN files in its segments that it does not list (a killed ``reindex``), and staging areas that
    hold no checkpoint to resume. A corrupt manifest's segments stay until a
    rebuild replaces it. An index a newer dsearch wrote raises NewerIndexError, before anything is removed: what
    looks left over there may be what its manifest lists in a way this version cannot read."""
    if (target / MANIFEST_FILE).exists():
        try:
            manifest: Manifest | None = read_manifest(target)
        except NewerIndexError:
            raise
        except IndexDirError:
            manifest = None
        if manifest is not None:
            collect_leftovers(target, {s.path for s in manifest.segments})
            for path in unlisted_ann_files(target, manifest):
                path.unlink()
    else:
        collect_leftovers(target, set())
    temp = target / MANIFEST_TMP
    if temp.is_symlink() or temp.is_file():
        temp.unlink()  # a crash's half-written manifest; a symlink by our name would send the next one outside DIR
    elif temp.exists():
        raise IndexDirError(
            f"{temp}: a folder or special file where dsearch writes its new manifest; nothing was changed "
            "(remove it if it is not yours, or choose another -o)"
        )
    for old in staging_dirs(target):
        progress = read_progress(old)
        if progress is None or _resumable(old, progress) is None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staging_area(target: Path, signature: str = "", restart: bool = False) -> Iterator[Staging]:
    """A staging area inside ``target``: an interrupted run's one when it matches ``signature``, else a new one.

    Call with the lock held. Every build stages inside DIR and publishes by swapping ``manifest.json``, so
    readers see the old index or the new one. Leftovers of earlier runs (other staging areas, segments no
    manifest names) are removed first. On an error the area is removed, unless every vector was already
    encoded (then only building the ANN index or publishing failed, and hours of encoding are worth keeping); on an
    interrupt (Ctrl-C, SIGTERM) or an ``IncompleteError`` (a Ray cluster lost, its workers dying: nothing wrong
    with the corpus or the rows written) it is kept when it holds a checkpoint. The next run with the same
    signature resumes.
    """
    check_target(target)
    target.mkdir(parents=True, exist_ok=True)
    tidy(target)
    staging = None
    for old in staging_dirs(target):
        progress = read_progress(old)
        segment = None
        if staging is None and not restart and progress is not None and progress.get("signature") == signature:
            segment = _resumable(old, progress)
        if segment is not None:
            staging = Staging(target, old, segment, progress)
        else:
            shutil.rmtree(old, ignore_errors=True)  # another run's leftovers: we hold the lock
    if staging is None:
        token = _new_token()
        root = target / f".staging-{token}"
        root.mkdir()
        staging = Staging(target, root, root / f"seg-{token}")
    try:
        yield staging
    except (KeyboardInterrupt, IncompleteError):  # interrupted, or the encoding elsewhere (a Ray cluster) failed
        if staging.published or read_progress(staging.root) is None:
            shutil.rmtree(staging.root, ignore_errors=True)  # nothing worth resuming
        raise
    except BaseException:
        if staging.published or not staging.encoded:
            shutil.rmtree(staging.root, ignore_errors=True)
        raise


def fault_point(name: str) -> None:
    """Test hook for crash safety: ``DSEARCH_TEST_FAULT=NAME`` kills the process (SIGKILL) at that step of a
    build, ``NAME:TERM`` sends it SIGTERM. Steps: checkpointed, merged, segment-moved, manifest-swapped, cleaned;
    ``ann-written`` in ``dsearch reindex`` (new ANN file written, manifest not yet swapped)."""
    spec = os.environ.get("DSEARCH_TEST_FAULT")
    if spec and spec.split(":")[0] == name:
        os.kill(os.getpid(), signal.SIGTERM if spec.endswith(":TERM") else signal.SIGKILL)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back for a few statements that must not be split (they arrive right after)."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, OSError):  # pragma: no cover - platforms without pthread_sigmask
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def publish(staging: Staging, manifest: Manifest) -> None:
    """Make the staged generation the index at ``staging.target`` in one atomic step: the manifest swap.

    Before the swap, a crash leaves the old index as it was (and the staged work resumable until the segment
    moves); the swap is the point of no return: once it is done, an interrupt no longer undoes anything, the run
    counts as published, and cleanup that it cuts short is finished by the next run (which removes segments that
    no manifest names).
    """
    target = staging.target
    data = manifest.to_json().encode("utf-8")
    # From here the parts a resume reads go and the segment leaves the staging area: a failure (a full disk while
    # writing the manifest) no longer leaves anything to resume, so none is kept or promised.
    staging.encoded = False
    for segment in manifest.segments:
        source = staging.root / segment.path
        if source.exists():
            shutil.rmtree(source / SegmentWriter.PARTS, ignore_errors=True)  # merged into passages.parquet
            os.rename(source, target / segment.path)
    _fsync_dir(target)
    fault_point("segment-moved")
    _write_file(target / MANIFEST_TMP, data)
    try:
        with _signals_deferred():
            os.replace(target / MANIFEST_TMP, target / MANIFEST_FILE)  # the moment of publication
            staging.published = True
            (staging.root / PROGRESS_FILE).unlink(missing_ok=True)  # nothing left to resume, whatever happens next
        _fsync_dir(target)
        fault_point("manifest-swapped")
        shutil.rmtree(staging.root, ignore_errors=True)
        # Readers that already opened the old segments keep their files (POSIX); new readers see the new manifest.
        collect_leftovers(target, {s.path for s in manifest.segments})
        fault_point("cleaned")
    except KeyboardInterrupt:
        if not staging.published:
            raise
        staging.interrupted_after_publish = True
        log.warning("interrupted after the new index was published; the next run removes what is left over")


def rewrite_manifest(target: Path, manifest: Manifest) -> None:
    """Replace the manifest of the index at ``target`` (lock held) in one atomic step, its segments unchanged."""
    _write_file(target / MANIFEST_FILE, manifest.to_json().encode("utf-8"), atomic=True)
    _fsync_dir(target)


def _write_file(path: Path, data: bytes, atomic: bool = False) -> None:
    destination = path
    if atomic:
        path = path.with_name(f".{path.name}.tmp")
    # O_NOFOLLOW: a symlink planted at one of our names must not make us write outside DIR.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    with open(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if atomic:
        os.replace(path, destination)


# --- reading -----------------------------------------------------------------------------------------


GATHER_ROWS = 4096  # FlatVectors.take reads at most this many rows with pread; more through the memory map


class FlatVectors:
    """The vectors of an ``IndexFlatIP`` file, memory-mapped, with exact inner-product search in numpy.

    Queries read the flat index themselves instead of through FAISS: importing faiss and loading the index
    cost about 0.13 s of a 0.45 s cold query here, and the faiss-cpu wheel's bundled OpenBLAS chose an SSE
    kernel ("Barcelona") on this project's AMD EPYC machines where numpy's uses AVX-512 (64 queries over 100k
    vectors: 0.16 s against 0.035-0.05 s). The file stays a FAISS index: tests read it with faiss, and
    ``info --verify`` loads it with faiss. Future index types (IVF, PQ, on-disk) will be searched by FAISS.
    """

    def __init__(self, path: Path) -> None:
        import numpy as np

        with open(path, "rb") as fh:
            head = fh.read(FlatIndexFileWriter.HEADER_BYTES)
        if len(head) < FlatIndexFileWriter.HEADER_BYTES or head[:4] != FlatIndexFileWriter._MAGIC:
            raise IndexDirError(f"{path}: not a FAISS IndexFlat file; rebuild the index")
        dim, ntotal, _, _, _, metric = FlatIndexFileWriter._HEADER.unpack_from(head, 4)
        (floats,) = FlatIndexFileWriter._COUNT.unpack_from(head, 4 + FlatIndexFileWriter._HEADER.size)
        expected = FlatIndexFileWriter.HEADER_BYTES + floats * 4
        if metric != 0 or floats != ntotal * dim or path.stat().st_size != expected:
            raise IndexDirError(f"{path}: malformed inner-product index; rebuild the index")
        self.d, self.ntotal = dim, ntotal
        self.path = path
        # Held open for `take`'s preads, like the memory map it keeps the file a publish may unlink readable.
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, self._fd)
        # The data starts 45 bytes in: not 4-byte aligned, so blocks are copied before BLAS sees them.
        self._data = (
            np.memmap(path, dtype="<f4", mode="r", offset=FlatIndexFileWriter.HEADER_BYTES, shape=(ntotal, dim))
            if ntotal
            else np.zeros((0, dim), np.float32)
        )
        self.in_memory = False

    def load(self) -> None:
        """Hold the vectors in memory, aligned (a copy of the file, 4 × dim bytes a row), for a long-lived reader:
        a search then reads them in place instead of copying each block of the mapped file (one query's scan of
        100k × 384, micro-benchmark on the loaded 2-core machine: 92 ms → 18 ms; a whole warm search call 48 →
        23 ms, RESULTS.md "Python API")."""
        import numpy as np

        if not self.in_memory:
            self._data = np.array(self._data, dtype=np.float32)
            self.in_memory = True

    def rows(self, first: int, count: int) -> Any:
        import numpy as np

        if self.in_memory:
            return self._data[first : first + count]  # aligned already: a view
        return np.array(self._data[first : first + count], dtype=np.float32)

    def take(self, rows: Any) -> Any:
        """The vectors of the given rows (an integer array), in that order.

        A few scattered rows (an ANN index's re-rank candidates, ``--like``'s passage) are read with ``pread``,
        not through the memory map: each page fault in the map pulled in the kernel's readahead around it and
        counted it as the process's own memory — re-ranking 180 candidates of a 110k x 384 index added 117 MB
        of resident file pages to a query process (the disk's read_ahead_kb is 8192 here). Read this way, those
        pages stay in the page cache, shared, and outside the query's RSS.
        """
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        if self.in_memory or len(rows) > GATHER_ROWS or not self.ntotal:  # in memory: no page faults to avoid
            return np.asarray(self._data[rows], dtype=np.float32)
        if len(rows) and (rows.min() < -self.ntotal or rows.max() >= self.ntotal):
            raise IndexError(f"row out of range for {self.ntotal} vectors")
        size = self.d * 4
        out = np.empty((len(rows), self.d), dtype="<f4")
        for i, row in enumerate(rows % self.ntotal):
            data = os.pread(self._fd, size, FlatIndexFileWriter.HEADER_BYTES + int(row) * size)
            if len(data) != size:
                raise IndexDirError(f"{self.path}: shorter than its header says; rebuild the index")
            out[i] = np.frombuffer(data, dtype="<f4")
        return out.astype(np.float32, copy=False)

    def search(self, queries: Any, k: int, allowed: Any = None) -> tuple[Any, Any]:
        """Per query, the ``k`` best (scores, rows), in no particular order.

        ``allowed`` (a boolean mask over this file's rows, from ``--where``) keeps the others out before the
        top-k: they score -inf. A mask that keeps few rows scores only those rows (a gather, not a full scan).
        """
        import numpy as np

        if allowed is not None:
            kept = np.flatnonzero(allowed)
            if len(kept) * SPARSE_FILTER_RATIO < self.ntotal:
                scores = queries @ self.take(kept).T if len(kept) else np.zeros((len(queries), 0), np.float32)
                keep = min(k, len(kept))
                top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep] if 0 < keep < len(kept) else None
                if top is None:
                    top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
                return np.take_along_axis(scores, top, 1), kept[top].astype(np.int64)
        best_scores, best_rows = [], []
        for start in range(0, self.ntotal, SEARCH_BLOCK_ROWS):
            block = self.rows(start, SEARCH_BLOCK_ROWS)
            scores = queries @ block.T
            if allowed is not None:
                scores[:, ~allowed[start : start + SEARCH_BLOCK_ROWS]] = -np.inf  # filtered out before the top-k
            keep = min(k, scores.shape[1])
            if keep < scores.shape[1]:
                top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
            else:
                top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
            best_scores.append(np.take_along_axis(scores, top, 1))
            best_rows.append(top + start)
        scores, rows = np.concatenate(best_scores, axis=1), np.concatenate(best_rows, axis=1).astype(np.int64)
        if scores.shape[1] > k:  # several blocks: keep the best k of their candidates
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, rows = np.take_along_axis(scores, top, 1), np.take_along_axis(rows, top, 1)
        return scores, rows


def verify_with_faiss(path: Path, rows: int, dim: int) -> None:
    """Load an index file with FAISS itself: proof that other FAISS tools can read it."""
    import faiss

    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except Exception as exc:
        raise IndexDirError(f"{path}: FAISS cannot read it ({exc}); rebuild the index") from exc
    if index.ntotal != rows or index.d != dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexDirError(f"{path}: FAISS sees another shape than the manifest's; rebuild the index")


@dataclass
class OpenSegment:
    segment: Segment
    first_row: int  # global row of this segment's row 0
    vectors: FlatVectors
    table: Any  # pyarrow.parquet.ParquetFile
    group_starts: list[int]  # local row where each Parquet row group starts
    ann: Any = None  # vector_index.FaissIndex when the segment has an ANN file; else the exact scan


class OpenIndex:
    """A published index, opened for search: the manifest, FAISS indexes (memory-mapped) and Parquet files."""

    def __init__(self, directory: Path, verify: bool = False) -> None:
        self.directory = directory
        # A publish may swap the manifest between our reading it and opening its files: read it again.
        for attempt in range(5):
            self.manifest = read_manifest(directory)
            try:
                self.segments = self._open_segments(verify)
                break
            except (FileNotFoundError, IndexDirError) as exc:
                swapped = read_manifest(directory).to_json() != self.manifest.to_json()
                if swapped and attempt < 4:
                    continue  # a publish replaced the files we were opening: read the new manifest
                if isinstance(exc, FileNotFoundError):
                    raise IndexDirError(
                        f"{directory}: index file {exc.filename} is missing; rebuild the index"
                    ) from None
                raise
        self.rows = self.manifest.rows
        self.search_params: dict[str, Any] = {}  # query-time ANN knobs (nprobe, efSearch, effort)
        self._group_cache: dict[tuple[int, int, tuple[str, ...]], Any] = {}  # insertion order = recency
        # pyarrow's ParquetFile is not safe to read from several threads at once (measured: "ReadRangeCache did
        # not find matching cache entry"), nor is the cache: a Searcher's threads take turns here. Shallow copies
        # (Searcher._tuned) share the files, the cache and so this lock.
        self._read_lock = threading.Lock()

    def _open_segments(self, verify: bool) -> list[OpenSegment]:
        import pyarrow.parquet as pq

        opened = []
        first_row = 0
        for segment in self.manifest.segments:
            seg_dir = self.directory / segment.path
            for name, info in segment.files.items():
                path = seg_dir / name
                size = path.stat().st_size  # FileNotFoundError propagates for the retry above
                if size != info.bytes or (verify and file_info(path).xxh3_128 != info.xxh3_128):
                    raise IndexDirError(
                        f"{path}: does not match the manifest (corrupt or truncated); rebuild the index"
                    )
            from dsearch.vector_index import KNOWN_TYPES, ann_file, open_ann

            if self.manifest.index_type not in KNOWN_TYPES:
                raise IndexDirError(f"{seg_dir}: index type {self.manifest.index_type} needs a newer dsearch")
            try:
                table = pq.ParquetFile(seg_dir / PASSAGES_FILE)  # holds the file open, even if it is replaced
                index = FlatVectors(seg_dir / INDEX_FILE)  # maps the file: it stays readable if replaced
            except (FileNotFoundError, IndexDirError):
                raise
            except Exception as exc:
                raise IndexDirError(f"{seg_dir}: cannot read the index files ({exc}); rebuild the index") from exc
            if verify:
                verify_with_faiss(seg_dir / INDEX_FILE, segment.rows, self.manifest.model.dim)
            if index.ntotal != segment.rows or table.metadata.num_rows != segment.rows:
                raise IndexDirError(f"{seg_dir}: row counts disagree with the manifest; rebuild the index")
            if index.d != self.manifest.model.dim:
                raise IndexDirError(
                    f"{seg_dir}: vectors have dimension {index.d}, manifest says "
                    f"{self.manifest.model.dim}; rebuild the index"
                )
            ann_name = ann_file(segment.files)
            ann = open_ann(seg_dir / ann_name, index, self.manifest.index_params) if ann_name else None
            starts, total = [], 0
            for g in range(table.metadata.num_row_groups):
                starts.append(total)
                total += table.metadata.row_group(g).num_rows
            opened.append(OpenSegment(segment, first_row, index, table, starts, ann))
            first_row += segment.rows
        if first_row != self.manifest.rows:
            raise IndexDirError(f"{self.directory}: segment rows do not add up to the manifest's; rebuild the index")
        return opened

    def search(self, vectors: Any, k: int, allowed_rows: Any = None) -> tuple[Any, Any]:
        """Top-k (scores, rows) per query vector, best first; ties broken by row so results are repeatable.

        ``allowed_rows``: a boolean mask over all rows (a ``--where`` filter); other rows are never returned
        (row -1, score -inf, where fewer than k rows are allowed). Index types other than the flat one must
        honour it the same way, before their top-k.
        """
        import numpy as np

        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        n = len(queries)
        fetch = min(self.rows, k + 8)  # a few extra so that ties at the cut-off are broken by row, not by chance
        all_scores, all_rows = [], []
        for seg in self.segments:
            if seg.segment.rows == 0 or fetch == 0:
                continue
            local = None if allowed_rows is None else allowed_rows[seg.first_row : seg.first_row + seg.segment.rows]
            if seg.ann is not None:
                kept = None if local is None else np.flatnonzero(local)  # FAISS selects by row numbers
                scores, rows = seg.ann.search(queries, min(fetch, seg.segment.rows), self.search_params, kept)
            else:
                scores, rows = seg.vectors.search(queries, min(fetch, seg.segment.rows), local)
            all_scores.append(scores)
            all_rows.append(np.where(rows >= 0, rows + seg.first_row, -1))
        if not all_scores:
            return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
        scores = np.concatenate(all_scores, axis=1)
        rows = np.concatenate(all_rows, axis=1)
        order = np.lexsort((rows, -scores), axis=1)[:, :k]
        scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        if allowed_rows is not None:
            rows[np.isneginf(scores)] = -1  # filtered out: fewer than k rows passed the filter
        return scores, rows

    def lookup(self, rows: Iterable[int], columns: tuple[str, ...] = PASSAGE_COLUMNS) -> dict[int, dict[str, Any]]:
        """Metadata of the given rows, reading only the Parquet row groups that hold them."""
        import bisect

        wanted: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for row in set(int(r) for r in rows if r >= 0):
            seg_no = self._segment_of(row)
            seg = self.segments[seg_no]
            local = row - seg.first_row
            group = bisect.bisect_right(seg.group_starts, local) - 1
            wanted.setdefault((seg_no, group), []).append((row, local - seg.group_starts[group]))
        found: dict[int, dict[str, Any]] = {}
        for (seg_no, group), members in wanted.items():
            # Only the hit rows' values become Python objects; the group itself stays in Arrow's compact form.
            # One scalar per column and row: 3.4 µs a row against 30 for slicing the table and converting the
            # slice (which also rebuilt the column-name list once per column), measured on a 100k index.
            # (Not take: take imports pyarrow.compute, a noticeable part of a cold query.)
            names, arrays = self._row_group(seg_no, group, columns)
            missing = [name for name in columns if name not in names]
            for row, offset in members:
                try:
                    record = {name: array[offset].as_py() for name, array in zip(names, arrays, strict=True)}
                except UnicodeDecodeError as exc:  # a damaged string that Parquet's checks let through
                    raise self._damaged(self.segments[seg_no], exc) from exc
                for name in missing:
                    record[name] = None
                found[row] = record
        return found

    def _damaged(self, seg: OpenSegment, exc: Exception) -> IndexDirError:
        """The one line for a passages.parquet that cannot be read although its size is right (damaged pages)."""
        path = self.directory / seg.segment.path / PASSAGES_FILE
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        return IndexDirError(
            f"{path}: cannot read the passages' metadata ({detail}); the index is damaged: "
            f"'dsearch status {self.directory}' checks every file; rebuild the index"
        )

    def _segment_of(self, row: int) -> int:
        for number, seg in enumerate(self.segments):
            if row < seg.first_row + seg.segment.rows:
                return number
        raise IndexError(row)

    def _row_group(self, seg_no: int, group: int, columns: tuple[str, ...]) -> tuple[list[str], list[Any]]:
        """One Parquet row group as its column names and one Arrow array per column, from a small LRU cache (a
        query file, or a server, revisits groups)."""
        key = (seg_no, group, columns)
        with self._read_lock:
            cached = self._group_cache.pop(key, None)
            if cached is None:
                present = self._present(self.segments[seg_no], columns)
                try:
                    table = self.segments[seg_no].table.read_row_group(group, columns=present)
                    cached = (table.column_names, [column.combine_chunks() for column in table.columns])
                except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
                    raise self._damaged(self.segments[seg_no], exc) from exc
                if len(self._group_cache) >= GROUP_CACHE_SIZE:
                    self._group_cache.pop(next(iter(self._group_cache)))  # the least recently used
            self._group_cache[key] = cached
        return cached  # type: ignore[no-any-return]

    def iter_rows(self, columns: tuple[str, ...] = PASSAGE_COLUMNS) -> Iterator[dict[str, Any]]:
        """Every row's metadata in row order, one row group at a time."""
        for seg in self.segments:
            present = self._present(seg, columns)
            missing = {name: None for name in columns if name not in present}
            batches = seg.table.iter_batches(batch_size=ROW_GROUP_SIZE, columns=present)
            while True:
                try:
                    with self._read_lock:  # one batch at a time: never held while the caller has the rows
                        batch = next(batches, None)
                    records = batch.to_pylist() if batch is not None else []
                except (OSError, ValueError) as exc:  # damaged pages (UnicodeDecodeError is a ValueError)
                    raise self._damaged(seg, exc) from exc
                if batch is None:
                    break
                for row in records:
                    yield {**missing, **row} if missing else row

    @staticmethod
    def _present(seg: OpenSegment, columns: tuple[str, ...]) -> list[str]:
        """The wanted columns this segment has: indexes written before windows existed lack their columns."""
        names = set(seg.table.schema_arrow.names)
        return [name for name in columns if name in names]

    def vectors(self, first: int, count: int) -> Any:
        """Stored vectors of rows ``first .. first+count`` (for reuse in incremental updates)."""
        import numpy as np

        out = []
        row = first
        end = first + count
        while row < end:
            seg = self.segments[self._segment_of(row)]
            local = row - seg.first_row
            take = min(end - row, seg.segment.rows - local)
            out.append(seg.vectors.rows(local, take))
            row += take
        return np.concatenate(out) if out else np.zeros((0, self.manifest.model.dim), np.float32)

    def vectors_at(self, rows: list[int]) -> Any:
        """Stored vectors of arbitrary rows, in the order given."""
        import numpy as np

        wanted = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(wanted), self.manifest.model.dim), dtype=np.float32)
        for seg in self.segments:  # one gather per segment, not one read per row
            inside = (wanted >= seg.first_row) & (wanted < seg.first_row + seg.segment.rows)
            if inside.any():
                out[inside] = seg.vectors.take(wanted[inside] - seg.first_row)
        return out

    def size_on_disk(self) -> int:
        total = (self.directory / MANIFEST_FILE).stat().st_size
        for seg in self.manifest.segments:
            total += sum(f.bytes for f in seg.files.values())
        return total
