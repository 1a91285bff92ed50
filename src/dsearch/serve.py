"""``dsearch serve``: indexes behind an HTTP JSON API, with the model loaded once and kept warm.

The stack is Starlette on uvicorn, imported only by this command (``dsearch --help`` never pays for it). FastAPI
was weighed and left out: it adds pydantic and about as much import time again for validation and an OpenAPI
generator, where a dozen parameters are checked by hand below and the OpenAPI document is a constant.

How a request flows:

1. A handler on the event loop checks the request (auth, size, parameters) and answers bad ones with a JSON 4xx
   at once. A good one becomes a ``Job`` on a bounded queue (full: 503 with ``Retry-After``).
2. One worker thread takes every job waiting (up to ``batch`` queries), encodes all their texts in ONE
   ``encode_queries`` call per index (the encoder's vectors do not depend on batch-mates), then searches the jobs
   with the same options in one ``search(..., vectors=)`` call (the Searcher's hits for a query do not depend on
   the other queries of a call), so no hit or score depends on what else was in the batch.
3. The job's asyncio future gets the JSON body; the handler sends it.

Hot swap: before each batch (and once a second when idle) the worker stats DIR/manifest.json; a new file there
means ``dsearch index`` published a new version, which is opened next to the old one. New batches use the new
version; a version is closed when its last request is done (reference counts). Publishing deletes the old
version's segment files, and some readers open files by path on demand (the BM25 arrays per search, DuckDB for
``where``), so each version is searched through its own private directory: a copy of the manifest it was opened
with and, for every file it lists, a link to ``/proc/self/fd/N`` of a file descriptor this process holds. On
Linux an open file stays readable after it is unlinked and such a link re-opens it, so an old version stays whole
until its last request ends, and its disk space is freed when the version closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import queue
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsearch.errors import DsearchError, IndexDirError, InputError, UsageError

log = logging.getLogger("dsearch")

MANIFEST = "manifest.json"  # manifest.MANIFEST_FILE, not imported: this module loads before any index is opened
MODES = ("dense", "lexical", "hybrid")
POLL_SECONDS = 1.0  # an idle server still notices a publish (and lets go of the old files) this soon
RETRY_AFTER_SECONDS = 1
PROC_FD = Path("/proc/self/fd")
SHADOW_PREFIX = "dsearch-serve-"  # + PID + "-": a version's private directory under the temp folder
DEBUG = False  # --debug: a bug's traceback goes to the log (never to a client)


@dataclass
class Limits:
    """What one request may ask for, and how much may wait. The defaults suit one machine and local clients."""

    max_k: int = 100
    max_queries: int = 100  # queries in one POST
    max_body: int = 1_000_000  # bytes of a POST body
    queue: int = 256  # requests waiting for the worker; more get 503
    batch: int = 64  # queries encoded together


class ClientError(Exception):
    """A request the server refuses: becomes a JSON ``{"error": message}`` with this status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


# --- one published version of an index ---------------------------------------------------------------


class PinnedFiles:
    """One published version's files, kept readable after a publish deletes them (see the module docstring).

    ``path`` is a private directory to open the version from: the manifest as it was read, and per segment file a
    link to ``/proc/self/fd/N``. Without ``/proc`` (not Linux) ``path`` is the index directory itself and an old
    version is only as safe as the readers that hold their files open.
    """

    def __init__(self, directory: Path) -> None:
        from dsearch.manifest import Manifest, read_manifest_text

        self.fds: list[int] = []
        self.shadow: Path | None = None
        self.path = directory
        if not PROC_FD.is_dir():
            return
        for attempt in range(5):
            text = read_manifest_text(directory)
            manifest = Manifest.from_json(text, str(directory / MANIFEST))
            try:
                links = self._open_files(directory, manifest)
                break
            except FileNotFoundError:
                self._close_fds()
                if attempt == 4 or read_manifest_text(directory) == text:
                    missing = f"{directory}: a file the manifest lists is missing; rebuild the index"
                    raise IndexDirError(missing) from None
            except BaseException:
                self._close_fds()
                raise
        try:
            self.shadow = Path(tempfile.mkdtemp(prefix=f"{SHADOW_PREFIX}{os.getpid()}-"))
            (self.shadow / MANIFEST).write_text(text, encoding="utf-8")
            for relative, fd in links:
                target = self.shadow / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(PROC_FD / str(fd), target)
        except BaseException:
            self.close()
            raise
        self.path = self.shadow

    def _open_files(self, directory: Path, manifest: Any) -> list[tuple[str, int]]:
        links = []
        for segment in manifest.segments:
            for name in segment.files:
                path = directory / segment.path / name
                # Non-blocking, and only regular files: a FIFO planted under a listed name must not hang us.
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
                self.fds.append(fd)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise IndexDirError(f"{path}: not a regular file; rebuild the index")
                links.append((f"{segment.path}/{name}", fd))
        return links

    def _close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []

    def close(self) -> None:
        if self.shadow is not None:
            shutil.rmtree(self.shadow, ignore_errors=True)
            self.shadow = None
        self._close_fds()


def sweep_stale_shadows() -> int:
    """Remove the private directories that servers which died without closing (SIGKILL, out of memory) left in
    the temp folder: those whose PID is no longer running. Returns how many went."""
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"{SHADOW_PREFIX}*-*"):
        pid = path.name[len(SHADOW_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or path.is_symlink() or not path.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running (ours or another server's)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's live process
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


@dataclass
class Version:
    """An opened version of one index: its Searcher, its pinned files, and how many users hold it."""

    searcher: Any
    files: PinnedFiles
    info: dict[str, Any]  # what `dsearch info --json` prints for the index directory
    segments: list[tuple[str, list[str]]]  # (segment folder, its files)
    refs: int = 1  # the slot's own reference while this is the current version

    @property
    def id(self) -> str:
        return str(self.searcher.version)

    def close(self) -> None:
        try:
            self.searcher.close()
        finally:
            self.files.close()


def version_opener(load_encoder: Callable[[Any], Any]) -> Callable[[Path], Version]:
    """How a slot opens a version: pin its files, then a Searcher on them with ``load_encoder(model_info)``'s
    encoder (the caller caches encoders by model, so a new version of the same index reuses the loaded one)."""

    def open_version(directory: Path) -> Version:
        from dsearch.api import Searcher
        from dsearch.manifest import read_manifest

        files = PinnedFiles(directory)
        try:
            manifest = read_manifest(files.path)
            # in_memory: a flat index's vectors in aligned memory, so a search of the few queries a batch holds
            # is one pass over RAM, not a copy of the whole file. load_lexical: the BM25 arrays open now.
            searcher = Searcher(files.path, encoder=load_encoder(manifest.model), load_lexical=True, in_memory=True)
            info = {**searcher.info(), "path": str(directory)}
        except BaseException:
            files.close()
            raise
        return Version(searcher, files, info, [(s.path, list(s.files)) for s in manifest.segments])

    return open_version


class Slot:
    """One served index directory: the current version, swapped when a new manifest is published."""

    def __init__(self, name: str, directory: Path, open_version: Callable[[Path], Version]) -> None:
        self.name = name
        self.directory = directory
        self._open = open_version
        self._lock = threading.Lock()  # guards current and the reference counts
        self._refreshing = threading.Lock()  # one refresh at a time (the worker and /health both refresh)
        self._stamp = self._manifest_stamp()
        self.current = open_version(directory)
        self.error: str | None = None  # why the newest published version could not be opened
        self._failed_stamp: tuple[int, ...] | None = None
        self._failed_at = 0.0

    def _manifest_stamp(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.directory / MANIFEST)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def refresh(self) -> None:
        """Open the newest published version if the manifest changed since the current one (a stat when not)."""
        with self._refreshing:
            self._refresh()

    def _refresh(self) -> None:
        stamp = self._manifest_stamp()
        if stamp == self._stamp:
            self.error = None  # (again) the version being served is the one published
            return
        if stamp == self._failed_stamp and time.monotonic() - self._failed_at < POLL_SECONDS:
            return  # the version that would not open: try it again a little later, not on every batch
        if stamp is None:
            gone = f"{self.directory}: the index is gone (no {MANIFEST}); still serving the version opened"
            self._failed(stamp, gone)
            return
        try:
            new = self._open(self.directory)
        except DsearchError as exc:
            self._failed(stamp, f"{exc.for_cli()}; still serving the version opened before")  # the server's log
            return
        except Exception as exc:  # a full /tmp, a bug: the server goes on with the version it has
            _log_unexpected(exc)
            self._failed(stamp, f"{self.directory}: cannot open the new version ({type(exc).__name__}: {exc})")
            return
        with self._lock:
            old, self.current = self.current, new
            self._stamp, self.error = stamp, None
        log.info("%s: now serving version %s (%d passages)", self.name, new.id[:12], new.info.get("passages", 0))
        self.release(old)

    def _failed(self, stamp: tuple[int, ...] | None, message: str) -> None:
        if message != self.error:
            log.warning("%s", message)
        self.error, self._failed_stamp, self._failed_at = message, stamp, time.monotonic()

    def acquire(self) -> Version:
        with self._lock:
            version = self.current
            version.refs += 1
            return version

    def release(self, version: Version) -> None:
        with self._lock:
            version.refs -= 1
            done = version.refs == 0
        if done:
            version.close()
            log.debug("%s: closed version %s", self.name, version.id[:12])

    def close(self) -> None:
        self.release(self.current)

    def health(self) -> dict[str, Any]:
        """Readable: the published manifest is the version being served (or it opens), and its files are there."""
        self.refresh()
        version = self.acquire()
        try:
            missing = [
                f"{path}/{name}"
                for path, names in version.segments
                for name in names
                if not (self.directory / path / name).is_file()
            ]
            report: dict[str, Any] = {"ok": self.error is None and not missing, "version": version.id}
        finally:
            self.release(version)
        if self.error is not None:
            report["error"] = self.error
        elif missing:
            report["error"] = f"{self.directory}: {missing[0]} is missing; rebuild the index"
        return report


# --- the queue and the worker -------------------------------------------------------------------------


@dataclass
class Job:
    """One search request waiting for the worker."""

    slot: Slot
    queries: list[Any]  # search.Query
    k: int
    mode: str | None
    alpha: float | None
    where: str | None
    min_score: float | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[tuple[int, bytes]]
    vectors: Any = None  # the queries' vectors, once encoded (not for mode lexical)
    done: bool = False  # answered (an encoding error answers a job before the search)

    def finish(self, status: int, body: dict[str, Any], checked: bool = False) -> None:
        """Answer the request; ``checked``: the body holds no NaN or infinity already (hits from ``to_dict``)."""
        self.done = True
        payload = _dumps(body, checked)
        self.loop.call_soon_threadsafe(_settle, self.future, (status, payload))


def _settle(future: asyncio.Future[tuple[int, bytes]], value: tuple[int, bytes]) -> None:
    if not future.done():  # the client may have gone and the handler been cancelled
        future.set_result(value)


_STOP = object()


def _by_slot(jobs: list[Job]) -> dict[str, list[Job]]:
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.slot.name, []).append(job)
    return groups


class Batcher:
    """The bounded queue and the one worker thread that encodes and searches what waits in it."""

    def __init__(self, slots: Sequence[Slot], limits: Limits) -> None:
        self.slots = list(slots)
        self.limits = limits
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=limits.queue)
        self.thread = threading.Thread(target=self._run, name="dsearch-search", daemon=True)
        self._stopping = False  # the stop marker was taken (kept here too, should a batch fail after taking it)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> bool:
        try:
            self.queue.put_nowait(job)
            return True
        except queue.Full:
            return False

    def stop(self) -> None:
        """Finish what is queued, then end the worker."""
        self.queue.put(_STOP)
        self.thread.join()

    def _run(self) -> None:
        while True:
            try:
                first = self.queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                for slot in self.slots:
                    slot.refresh()
                continue
            if first is _STOP:
                return
            jobs = [first]
            stop = self._take_waiting(jobs, len(first.queries))
            try:
                stop = self._batch(jobs) or stop
            except Exception as exc:  # never let a bug kill the worker: every waiting request gets an answer
                _log_unexpected(exc)
                for job in jobs:
                    job.finish(500, {"error": "internal error; see the server's log"})
            if stop or self._stopping:
                return

    def _take_waiting(self, jobs: list[Job], size: int) -> bool:
        """Add the jobs waiting now to ``jobs`` until the batch holds ``limits.batch`` queries (``size`` already),
        without waiting; True when the stop marker came (everything queued before it is taken)."""
        while size < self.limits.batch:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return False
            if job is _STOP:
                self._stopping = True
                return True
            jobs.append(job)
            size += len(job.queries)
        return False

    def _batch(self, jobs: list[Job]) -> bool:
        """Encode the jobs, then the ones that arrived while they were encoded, and so on; then search them all.

        Why the top-up: a flat index is read whole for every search call, whatever its number of queries, so the
        scan's cost per query falls with the batch. Without it 16 clients settled into alternating cohorts
        (batches of 3 and 13 at 16 clients, measured) whose every scan read all the vectors; encoding costs the
        same per query either way. Grows ``jobs`` in place (the caller answers them all if this fails); returns
        True when the stop marker came during a top-up.
        """
        versions: dict[str, tuple[Slot, Version]] = {}  # one version per index for the whole batch
        stop = False
        try:
            pending = list(jobs)
            while pending:
                for name, group in _by_slot(pending).items():
                    if name not in versions:
                        slot = group[0].slot
                        slot.refresh()
                        versions[name] = (slot, slot.acquire())
                    self._encode(versions[name][1], versions[name][0], group)
                pending = []
                if not stop:
                    stop = self._take_waiting(pending, sum(len(job.queries) for job in jobs))
                    jobs.extend(pending)
            log.debug("batch of %d queries from %d requests", sum(len(j.queries) for j in jobs), len(jobs))
            for name, group in _by_slot(jobs).items():
                slot, version = versions[name]
                self._search(version, slot, [job for job in group if not job.done])
        finally:
            for slot, version in versions.values():
                slot.release(version)
        return stop

    def _encode(self, version: Version, slot: Slot, jobs: list[Job]) -> None:
        """The query vectors of the jobs that need them (all but lexical), in one encoder call; a failure answers
        those jobs with the error."""
        dense = [job for job in jobs if job.mode != "lexical"]
        texts = [q.text for job in dense for q in job.queries]
        if not texts:
            return
        try:
            encoded = version.searcher.encode_queries(texts)
        except Exception as exc:
            _fail_all(dense, exc, version, slot)
            return
        start = 0
        for job in dense:
            job.vectors = encoded[start : start + len(job.queries)]
            start += len(job.queries)

    def _search(self, version: Version, slot: Slot, jobs: list[Job]) -> None:
        import numpy as np

        searcher = version.searcher
        # Requests with the same options are searched in one call: a flat index is then read once for all of
        # them, and the Searcher's hits for a query do not depend on the other queries of a call.
        limit_faiss_threads()  # (here: a published version may be the first to load faiss)
        groups: dict[tuple[Any, ...], list[Job]] = {}
        for job in jobs:
            groups.setdefault((job.k, job.mode, job.alpha, job.where, job.min_score), []).append(job)
        for (k, mode, alpha, where, min_score), group in groups.items():
            if (mode or ("hybrid" if alpha is not None else "dense")) != "dense" and not version.info.get("lexical"):
                # The client's choice of mode, not an unreadable index: 400 (the library's IndexDirError is a 503).
                message = (
                    f"{slot.name}: this index has no lexical (BM25) index (built with --no-lexical); "
                    "search it with mode dense"
                )
                for job in group:
                    job.finish(400, {"error": message})
                continue
            queries = [q for job in group for q in job.queries]
            given = [job.vectors for job in group if job.vectors is not None]
            try:
                results = searcher.search(
                    queries,
                    k,
                    mode=mode,
                    alpha=alpha,
                    where=where,
                    min_score=min_score,
                    vectors=np.concatenate(given) if given else None,
                )
            except Exception as exc:
                _fail_all(group, exc, version, slot)
                continue
            start = 0
            for job in group:
                mine = results[start : start + len(job.queries)]
                start += len(job.queries)
                job.finish(
                    200,
                    {
                        "index": slot.name,
                        "version": version.id,
                        "results": [
                            {"qid": q.qid, "query": q.text, "hits": [h.to_dict() for h in hits]}
                            for q, hits in zip(job.queries, mine, strict=True)
                        ],
                    },
                    checked=True,
                )


def _fail_all(jobs: list[Job], exc: Exception, version: Version, slot: Slot) -> None:
    """Answer every job of a failed encode or search with that failure's status and one-line message."""
    status, message = _error_response(exc, version, slot)
    for job in jobs:
        job.finish(status, {"error": message})


def _error_response(exc: Exception, version: Version, slot: Slot) -> tuple[int, str]:
    """Status and message for an error raised while searching: the client's fault is 400, ours 500/503."""
    message = exc.for_cli() if isinstance(exc, DsearchError) else str(exc)  # flags, which _unflag turns to params
    if version.files.shadow is not None:  # errors name the index directory, not the private one
        message = message.replace(str(version.files.shadow), str(slot.directory))
    if isinstance(exc, UsageError | InputError):
        return 400, _unflag(message)
    if isinstance(exc, IndexDirError):
        return 503, message
    if isinstance(exc, DsearchError):
        return 500, message
    _log_unexpected(exc)
    return 500, "internal error; see the server's log"


def _unflag(message: str) -> str:
    """The library's messages name CLI flags (``--where``, ``--mode``); over HTTP they are parameters."""
    for flag in ("where", "mode", "alpha", "min-score", "top-k"):
        message = message.replace(f"--{flag}", flag.replace("-", "_").replace("top_k", "k"))
    return message


def _log_unexpected(exc: Exception) -> None:
    log.error("unexpected %s: %s (rerun with --debug and report it)", type(exc).__name__, exc, exc_info=DEBUG)


def _dumps(body: dict[str, Any], checked: bool = False) -> bytes:
    """The JSON body; ``checked`` skips replacing NaN/infinity, for a body whose numbers were checked already
    (walking every hit a second time cost ~0.1 ms of a query's CPU). allow_nan=False stays as the guard."""
    from dsearch.output import json_safe

    return json.dumps(body if checked else json_safe(body), ensure_ascii=False, allow_nan=False).encode("utf-8")


# --- requests -------------------------------------------------------------------------------------------


SEARCH_OPTIONS = ("k", "index", "mode", "alpha", "where", "min_score")


@dataclass
class SearchRequest:
    texts: list[tuple[str | None, str]]  # (qid or None, text)
    k: int = 10
    index: str | None = None
    mode: str | None = None
    alpha: float | None = None
    where: str | None = None
    min_score: float | None = None


def parse_get(params: Any, limits: Limits) -> SearchRequest:
    """``GET /search?q=…&k=…``: one query; every parameter once; unknown ones are refused (a typo would be lost)."""
    unknown = sorted(set(params.keys()) - {"q", *SEARCH_OPTIONS})
    if unknown:
        raise ClientError(400, f"unknown parameter {unknown[0]!r}; use q, {', '.join(SEARCH_OPTIONS)}")
    for name in params.keys():
        if len(params.getlist(name)) > 1:
            raise ClientError(400, f"parameter {name!r} given more than once")
    if "q" not in params:
        raise ClientError(400, "missing parameter 'q' (the query text)")
    request = SearchRequest([(None, _query_text(params["q"], "q"))])
    if "k" in params:
        request.k = _k(_number(params["k"], "k", whole=True), limits)
    for name in ("alpha", "min_score"):
        if name in params:
            setattr(request, name, _number(params[name], name))
    for name in ("index", "mode", "where"):
        if name in params:
            setattr(request, name, params[name])
    return _check_options(request)


def parse_post(body: bytes, limits: Limits) -> SearchRequest:
    """``POST /search`` with ``{"query": "…"}`` or ``{"queries": ["…", {"qid": "…", "text": "…"}]}`` + options."""
    try:
        data = json.loads(body.decode("utf-8"))  # decoded here: json.loads would take a UTF-16/32 body too
    except UnicodeDecodeError:
        raise ClientError(400, "the body is not UTF-8; send JSON in UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ClientError(
            400, f"the body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except ValueError:  # an integer of more digits than Python converts (4300)
        raise ClientError(400, "the body is not valid JSON here (a number with too many digits)") from None
    except RecursionError:
        raise ClientError(400, "the body is not valid JSON here (arrays or objects nested too deeply)") from None
    if not isinstance(data, dict):
        raise ClientError(400, 'the body must be a JSON object, e.g. {"query": "…", "k": 10}')
    unknown = sorted(set(data) - {"query", "queries", *SEARCH_OPTIONS})
    if unknown:
        raise ClientError(400, f"unknown field {unknown[0]!r}; use query or queries, {', '.join(SEARCH_OPTIONS)}")
    if ("query" in data) == ("queries" in data):
        raise ClientError(400, "give either 'query' (one text) or 'queries' (a list)")
    if "query" in data:
        texts = [(None, _query_text(data["query"], "query"))]
    else:
        items = data["queries"]
        if not isinstance(items, list) or not items:
            raise ClientError(400, '\'queries\' must be a non-empty list of texts or {"qid", "text"} objects')
        if len(items) > limits.max_queries:
            raise ClientError(
                400, f"{len(items)} queries in one request; at most {limits.max_queries} (the server's --max-queries)"
            )
        texts = [_query_item(item, number) for number, item in enumerate(items, 1)]
        # A query without a qid answers as its position (1, 2, ...): that counts too, or two results share one.
        qids = [str(number) if qid is None else qid for number, (qid, _) in enumerate(texts, 1)]
        if len(set(qids)) != len(qids):
            raise ClientError(
                400, "two queries have the same qid (one without a qid is numbered by its place); give each its own"
            )
    request = SearchRequest(texts)
    if "k" in data:
        request.k = _k(_json_number(data["k"], "k", whole=True), limits)
    for name in ("alpha", "min_score"):
        if data.get(name) is not None:
            setattr(request, name, _json_number(data[name], name))
    for name in ("index", "mode", "where"):
        if data.get(name) is not None:
            if not isinstance(data[name], str):
                raise ClientError(400, f"'{name}' must be a string")
            setattr(request, name, data[name])
    return _check_options(request)


def _query_item(item: Any, number: int) -> tuple[str | None, str]:
    if isinstance(item, str):
        return None, _query_text(item, f"queries[{number - 1}]")
    if isinstance(item, dict) and set(item) <= {"qid", "text"} and "text" in item:
        qid = item.get("qid")
        if qid is not None and (isinstance(qid, bool) or not isinstance(qid, str | int) or not str(qid).strip()):
            raise ClientError(400, f"queries[{number - 1}].qid must be a non-empty string or a number")
        if isinstance(qid, str) and not _is_utf8(qid):  # it is sent back: the answer could not be encoded
            raise ClientError(400, f"queries[{number - 1}].qid is not valid UTF-8 (a lone surrogate)")
        return (None if qid is None else str(qid)), _query_text(item["text"], f"queries[{number - 1}].text")
    raise ClientError(400, f"queries[{number - 1}] must be a text or an object with 'text' (and 'qid')")


def _query_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ClientError(400, f"{where} must be a string")
    text = value.strip()
    if not text:
        raise ClientError(400, f"{where} is empty")
    if not _is_utf8(text):
        raise ClientError(400, f"{where} is not valid UTF-8 (a lone surrogate)")
    return text


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _number(value: str, name: str, whole: bool = False) -> float:
    try:
        number = int(value) if whole else float(value)
    except ValueError:
        raise ClientError(400, f"{name}={value!r} is not {'a whole number' if whole else 'a number'}") from None
    if not math.isfinite(number):
        raise ClientError(400, f"{name}={value!r} is not a finite number")
    return number


def _json_number(value: Any, name: str, whole: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (whole and not isinstance(value, int)):
        raise ClientError(400, f"'{name}' must be {'a whole number' if whole else 'a number'}")
    if isinstance(value, int):  # JSON's integers have no bound; math.isfinite raises OverflowError past a double
        if whole:
            return value  # _k says it is out of range
        if abs(value) > sys.float_info.max:
            raise ClientError(400, f"'{name}' is out of range (past a double's)")
        return float(value)
    if not math.isfinite(value):
        raise ClientError(400, f"'{name}' is not a finite number")
    return value


def _k(value: float, limits: Limits) -> int:
    if not 1 <= value <= limits.max_k:
        raise ClientError(400, f"k={int(value)} is out of range: 1 to {limits.max_k} (the server's --max-k)")
    return int(value)


def _check_options(request: SearchRequest) -> SearchRequest:
    if request.mode is not None and request.mode not in MODES:
        raise ClientError(400, f"unknown mode {request.mode!r}; choose one of {', '.join(MODES)}")
    if request.alpha is not None:
        if not 0 <= request.alpha <= 1:
            raise ClientError(400, f"alpha={request.alpha} is not a weight between 0 and 1")
        if request.mode in ("dense", "lexical"):
            raise ClientError(
                400, f"alpha weighs the two retrievers of mode hybrid; it does not go with mode {request.mode}"
            )
    if request.where is not None and not request.where.strip():
        raise ClientError(400, "where is empty")
    return request


# --- the application --------------------------------------------------------------------------------------


class Server:
    """Everything ``dsearch serve`` runs: the indexes, the worker, the Starlette app."""

    def __init__(self, slots: Sequence[Slot], limits: Limits, token: str | None = None) -> None:
        self.slots = {slot.name: slot for slot in slots}
        self.limits = limits
        self.token = token.encode("utf-8") if token else None
        self.batcher = Batcher(slots, limits)
        self.app = self._app()

    # Each handler returns (status, body); _respond turns a ClientError into the same JSON shape.
    def _app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import HTMLResponse, Response
        from starlette.routing import Route

        def respond(status: int, body: bytes | dict[str, Any], headers: dict[str, str] | None = None) -> Response:
            payload = body if isinstance(body, bytes) else _dumps(body)
            return Response(payload, status, headers=headers, media_type="application/json")

        def guarded(handler: Callable[..., Any], auth: bool = True) -> Callable[..., Any]:
            async def endpoint(request: Any) -> Response:
                try:
                    if auth:
                        self._authorize(request.headers.get("authorization"))
                    return await handler(request, respond)
                except ClientError as exc:
                    return respond(exc.status, {"error": str(exc)}, exc.headers)

            return endpoint

        async def http_error(request: Any, exc: HTTPException) -> Response:
            message = {404: f"no such endpoint {request.url.path!r}; see /openapi.json", 405: "method not allowed"}
            return respond(exc.status_code, {"error": message.get(exc.status_code, exc.detail)}, exc.headers)

        async def server_error(request: Any, exc: Exception) -> Response:
            _log_unexpected(exc)
            return respond(500, {"error": "internal error; see the server's log"})

        async def docs(request: Any, respond: Any) -> Response:
            return HTMLResponse(_docs_html())

        routes = [
            Route("/search", guarded(self._search), methods=["GET", "POST"]),
            Route("/info", guarded(self._info), methods=["GET"]),
            Route("/health", guarded(self._health, auth=False), methods=["GET"]),
            Route("/openapi.json", guarded(self._openapi, auth=False), methods=["GET"]),
            Route("/docs", guarded(docs, auth=False), methods=["GET"]),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})

    def _authorize(self, header: str | None) -> None:
        if self.token is None:
            return
        scheme, _, given = (header or "").partition(" ")
        # Constant time: how long the comparison takes says nothing about how much of the token matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), self.token):
            raise ClientError(
                401,
                "missing or wrong bearer token (send 'Authorization: Bearer TOKEN')",
                {"WWW-Authenticate": "Bearer"},
            )

    def _slot(self, name: str | None) -> Slot:
        if name is None:
            if len(self.slots) == 1:
                return next(iter(self.slots.values()))
            raise ClientError(400, f"several indexes are served: name one with index= ({', '.join(self.slots)})")
        if name not in self.slots:
            raise ClientError(400, f"unknown index {name!r}; this server has {', '.join(self.slots)}")
        return self.slots[name]

    async def _search(self, request: Any, respond: Any) -> Any:
        from dsearch.search import Query

        if request.method == "GET":
            parsed = parse_get(request.query_params, self.limits)
        else:
            if request.query_params:
                raise ClientError(400, "POST /search takes its options in the JSON body, not the URL")
            parsed = parse_post(await self._body(request), self.limits)
        slot = self._slot(parsed.index)
        queries = [Query(qid or str(number), text) for number, (qid, text) in enumerate(parsed.texts, 1)]
        loop = asyncio.get_running_loop()
        job = Job(
            slot,
            queries,
            parsed.k,
            parsed.mode,
            parsed.alpha,
            parsed.where,
            parsed.min_score,
            loop,
            loop.create_future(),
        )
        if not self.batcher.submit(job):
            raise ClientError(
                503, "too many requests waiting; try again shortly", {"Retry-After": str(RETRY_AFTER_SECONDS)}
            )
        status, body = await job.future
        return respond(status, body)

    async def _body(self, request: Any) -> bytes:
        declared = request.headers.get("content-length")
        too_large = ClientError(413, f"the body is larger than {self.limits.max_body} bytes (the server's --max-body)")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body:
            raise too_large
        from starlette.requests import ClientDisconnect

        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.limits.max_body:
                    raise too_large
        except ClientDisconnect:  # a client's timeout or Ctrl-C: nothing to answer, and not the server's fault
            log.debug("a client went away before sending its whole body")
            raise ClientError(400, "the client went away before sending its whole body") from None
        return bytes(body)

    async def _info(self, request: Any, respond: Any) -> Any:
        unknown = sorted(set(request.query_params.keys()) - {"index"})
        if unknown:
            raise ClientError(400, f"unknown parameter {unknown[0]!r}; /info takes index=")
        name = request.query_params.get("index")
        slots = [self._slot(name)] if name is not None else list(self.slots.values())
        indexes = []
        for slot in slots:
            version = slot.acquire()
            try:
                indexes.append({"name": slot.name, "version": version.id, "info": version.info})
            finally:
                slot.release(version)
        return respond(200, {"indexes": indexes})

    async def _health(self, request: Any, respond: Any) -> Any:
        from starlette.concurrency import run_in_threadpool

        reports = {}
        for name, slot in self.slots.items():
            reports[name] = await run_in_threadpool(slot.health)
        ok = all(r["ok"] for r in reports.values())
        return respond(200 if ok else 503, {"status": "ok" if ok else "unavailable", "indexes": reports})

    async def _openapi(self, request: Any, respond: Any) -> Any:
        return respond(200, openapi(self.limits))


# --- running it -----------------------------------------------------------------------------------------------


def check_installed() -> None:
    """The server's packages are an extra (``dsearch[serve]``): say so instead of a ModuleNotFoundError."""
    try:
        import starlette  # noqa: F401
        import threadpoolctl  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise DsearchError(
            f"dsearch serve needs {exc.name or 'starlette, threadpoolctl and uvicorn'}, which is not installed; "
            "install it with: pip install 'dsearch[serve]'"
        ) from None


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts, so a taken port is a one-line error and
    ``--port 0`` can report the port the system chose."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host!r}: not an address or a known host name ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise DsearchError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def limit_blas_threads() -> int | None:
    """Run BLAS (numpy's OpenBLAS) on one thread in this process, unless ``OPENBLAS_NUM_THREADS`` says otherwise;
    returns the thread count now in force (None: no BLAS library found).

    The worker's search is one batched matrix product at a time, and between them OpenBLAS's helper threads
    busy-wait, burning CPU that the encoder's threads and the HTTP layer need: at 16 clients on 2 cores one
    thread halved the server's CPU per query and raised queries/s on a busy machine (RESULTS.md, "Serving").
    Set at run time (threadpoolctl), not by the environment variable, which OpenBLAS reads only when it loads.
    """
    import numpy  # noqa: F401  (loads OpenBLAS, so that there is a library to set)
    from threadpoolctl import threadpool_info, threadpool_limits

    if "OPENBLAS_NUM_THREADS" not in os.environ:
        threadpool_limits(1, user_api="blas")
    counts = [lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return max(counts) if counts else None


_faiss_limited = threading.local()


def limit_faiss_threads() -> None:
    """Search ANN indexes on one OpenMP thread in the calling thread (the worker), unless ``OMP_NUM_THREADS`` is
    set; a no-op until an ANN index has loaded faiss, and after the first time in each thread.

    FAISS spreads a batch's queries over OpenMP threads, whose idle spinning cost more CPU than the parallel
    search saved: in-process, batches of 16 real queries on a 100k HNSW index cost 0.38 ms of CPU a query on
    two threads and 0.20 on one, in the same wall time (RESULTS.md, "Serving"). ``omp_set_num_threads`` holds
    for the calling thread only, hence a call from the worker itself.
    """
    if getattr(_faiss_limited, "done", False) or "faiss" not in sys.modules or "OMP_NUM_THREADS" in os.environ:
        return
    sys.modules["faiss"].omp_set_num_threads(1)
    _faiss_limited.done = True
    log.debug("FAISS OpenMP threads of the worker: 1")


def run_server(server: Server, sock: socket.socket, access_log: bool, on_ready: Callable[[str], None]) -> None:
    """Serve until SIGTERM or Ctrl-C; then stop accepting, finish every request in flight, and return."""
    import uvicorn

    class _Uvicorn(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after a graceful shutdown (so the process dies of it); dsearch's
            # contract is exit 0 after a clean stop, so catch it, shut down and return instead.
            import signal

            handlers = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            host, port = sock.getsockname()[:2]
            on_ready(f"http://{f'[{host}]' if ':' in host else host}:{port}")

    config = uvicorn.Config(
        server.app,
        log_config=None,  # dsearch's own stderr handler (stdout stays empty)
        access_log=access_log,
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=30,
        timeout_keep_alive=5,
    )
    log.debug("BLAS threads: %s", limit_blas_threads())
    server.batcher.start()
    try:
        _Uvicorn(config).run(sockets=[sock])
    finally:
        server.batcher.stop()
        for slot in server.slots.values():
            slot.close()


def setup_logging(handler: logging.Handler, verbose: int) -> None:
    """uvicorn's loggers go to dsearch's stderr handler: errors always, access lines with -v."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
    logging.getLogger("uvicorn.error").setLevel(logging.INFO if verbose > 1 else logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.INFO if verbose else logging.WARNING)


# --- OpenAPI --------------------------------------------------------------------------------------------------


def openapi(limits: Limits) -> dict[str, Any]:
    """The API described for tools (OpenAPI 3.1); written by hand, as the API is small."""
    from dsearch import __version__

    def param(name: str, kind: str, text: str, required: bool = False) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": required, "schema": {"type": kind}, "description": text}

    error = {
        "description": "an error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    options = [
        param("k", "integer", f"hits per query, 1 to {limits.max_k} (default 10)"),
        param("index", "string", "which index (its name in /info); needed when several are served"),
        param("mode", "string", "dense, lexical or hybrid (default: dense, or hybrid with alpha)"),
        param("alpha", "number", "hybrid: the dense side's weight, 0 to 1"),
        param("where", "string", "a condition over the stored fields, as dsearch query --where"),
        param("min_score", "number", "drop hits scoring below this"),
    ]
    hit_fields = ["qid", "query", "rank", "score", "id", "title", "text", "source", "fields", "window"]
    results = {
        "description": "hits per query",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Results"}}},
    }
    searching = {"200": results, "400": error, "401": error, "413": error, "503": error}
    return {
        "openapi": "3.1.0",
        "info": {"title": "dsearch", "version": __version__, "description": "Dense retrieval over HTTP."},
        "paths": {
            "/search": {
                "get": {
                    "summary": "Search with one query",
                    "parameters": [param("q", "string", "the query text", True), *options],
                    "responses": searching,
                },
                "post": {
                    "summary": "Search with one query or many (a JSON body)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SearchBody"}}},
                    },
                    "responses": searching,
                },
            },
            "/info": {
                "get": {
                    "summary": "What each index holds (dsearch info --json)",
                    "parameters": [options[1]],
                    "responses": {"200": {"description": "the indexes"}, "400": error, "401": error},
                }
            },
            "/health": {
                "get": {
                    "summary": "200 when every index is readable, else 503 (no token needed)",
                    "responses": {
                        "200": {"description": "healthy"},
                        "503": {"description": "an index is not readable"},
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
                "Hit": {
                    "type": "object",
                    "description": "the fields of dsearch query --format jsonl",
                    "required": hit_fields,
                    "properties": {name: {} for name in [*hit_fields, "retrievers"]},
                },
                "Results": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "string"},
                        "version": {"type": "string"},
                        "results": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "qid": {"type": "string"},
                                    "query": {"type": "string"},
                                    "hits": {"type": "array", "items": {"$ref": "#/components/schemas/Hit"}},
                                },
                            },
                        },
                    },
                },
                "SearchBody": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "query": {"type": "string"},
                        "queries": {
                            "type": "array",
                            "maxItems": limits.max_queries,
                            "items": {
                                "oneOf": [
                                    {"type": "string"},
                                    {
                                        "type": "object",
                                        "properties": {"qid": {"type": "string"}, "text": {"type": "string"}},
                                    },
                                ]
                            },
                        },
                        **{p["name"]: p["schema"] for p in options},
                    },
                },
            },
        },
    }


def _docs_html() -> str:
    """A plain page for people: the endpoints and their parameters (no scripts, nothing fetched from outside)."""
    import html

    spec = openapi(Limits())
    parts = [
        "<!doctype html><meta charset=utf-8><title>dsearch API</title><h1>dsearch API</h1>",
        "<p>Machine-readable: <a href=/openapi.json>/openapi.json</a></p>",
    ]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            parts.append(f"<h2>{method.upper()} {html.escape(path)}</h2><p>{html.escape(op['summary'])}</p>")
            params = op.get("parameters", [])
            if params:
                parts.append("<ul>")
                for p in params:
                    parts.append(f"<li><code>{p['name']}</code>: {html.escape(p['description'])}</li>")
                parts.append("</ul>")
    return "".join(parts)
