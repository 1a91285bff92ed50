"""The ``dsearch`` command line: flags → one library call → a renderer; errors → exit codes.

Heavy libraries (torch, sentence-transformers, faiss, pyarrow) are imported inside the commands that
need them, so ``dsearch --help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer

from dsearch import __version__
from dsearch.errors import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_USAGE,
    DsearchError,
    IncompleteError,
    IndexDirError,
    OutputError,
    UsageError,
)
from dsearch.streams import nonblocking_fd, patient_reader, patient_text

if TYPE_CHECKING:
    from dsearch.encoder import Encoder
    from dsearch.manifest import ModelInfo

log = logging.getLogger("dsearch")


def default_load_encoder(name: str | None, **options: Any) -> Encoder:
    from dsearch.encoder import load_encoder

    return load_encoder(name, **options)


def default_load_query_encoder(model: ModelInfo, **options: Any) -> Encoder:
    from dsearch.encoder import load_query_encoder

    return load_query_encoder(model, **options)


@dataclass
class Deps:
    """What the commands get from outside; tests pass their own (a tiny encoder, a stdin).

    ``load_encoder(name, precision=, trust_remote_code=, batch_size=)`` loads a model by name;
    ``load_query_encoder(model_info, …)`` loads an index's model for queries (default: the lean path,
    or ``load_encoder`` when a test injected only that).
    """

    load_encoder: Callable[..., Encoder] = default_load_encoder
    load_query_encoder: Callable[..., Encoder] | None = None
    stdin: IO[bytes] | None = None

    def query_encoder(self, model: ModelInfo, **options: Any) -> Encoder:
        if self.load_query_encoder is not None:
            return self.load_query_encoder(model, **options)
        if self.load_encoder is default_load_encoder:
            return default_load_query_encoder(model, **options)
        return self.load_encoder(model.name, **options)

    def stdin_bytes(self) -> IO[bytes]:
        return self.stdin if self.stdin is not None else patient_reader(sys.stdin.buffer)


@dataclass
class Settings:
    """What the error and summary printers need to know about the current run."""

    quiet: bool = False
    debug: bool = False


SETTINGS = Settings()


class _PipeClosed(Exception):
    """stdout's reader went away; not an OSError, so that Typer leaves it to ``run``."""


class _Stdout:
    """``sys.stdout`` during a run: a write that fails for another reason than a closed pipe (a full disk, a
    file size limit, a closed stdout) becomes an ``OutputError`` with one line, not 'unexpected OSError'."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream
        self.failed = False  # a write failed: flushing again would only fail again
        self.error: OutputError | None = None

    def _target(self) -> IO[str]:
        if self.stream is None:  # started with `>&-`: Python has no sys.stdout at all
            raise OutputError("stdout is closed; the results cannot be written (redirect it, e.g. to a file)")
        return self.stream

    def _failed(self, exc: OSError) -> OutputError:
        self.failed = True
        self.error = OutputError(f"stdout: cannot write the results ({exc.strerror or exc}); free space where it "
                                 "goes, or send it elsewhere")
        return self.error

    def write(self, text: str) -> int:
        try:
            return self._target().write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise self._failed(exc) from None

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.stream is None or self.failed:  # nothing was written, or the error was said already
            return
        try:
            self.stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise self._failed(exc) from None

    def isatty(self) -> bool:
        return self.stream is not None and self.stream.isatty()

    def fileno(self) -> int:
        if self.stream is None:
            raise ValueError("stdout is closed")
        return self.stream.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)


class _Stderr:
    """``sys.stderr`` during a run: a message that cannot be written (``2>/dev/full``, a log on a full disk, a
    closed pipe) is dropped. There is nowhere to say so, and the exit code must still say how the run went: the
    error raised while printing an error made it 1, and Python's failed flush of stderr at exit made it 120."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.failed = False  # a write failed: its descriptor is silenced when the run ends

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError:
            self.failed = True
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError:
            self.failed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _patient(stream: Any) -> Any:
    """``stream``, or one that waits on its descriptor instead of failing when that is non-blocking."""
    fd = nonblocking_fd(stream)
    if fd is None:
        return stream
    try:
        stream.flush()  # what the caller wrote before the run comes first
    except OSError:
        # Its reader gone, its disk full: left as it is, the stream fails again at the run's first write or flush,
        # where the proxies make that a quiet end or one error line rather than an exception out of ``run``.
        return stream
    line_buffering = bool(getattr(stream, "line_buffering", False))
    return patient_text(fd, getattr(stream, "errors", None) or "strict", line_buffering)


# The proxies are process-wide (sys.stdout, sys.stderr) and runs may overlap (threads, a nested call): the first
# run to start installs them, the last to end puts back what it found.
_STREAMS_LOCK = threading.Lock()
_streams: dict[str, Any] = {"runs": 0}


def _standard_streams() -> None:
    """Make the standard streams safe to use for a run; ``_restore_streams`` undoes it.

    A stream the shell closed (``<&-``, ``2>&-``) is None in Python: stdin then reads as empty (as ``</dev/null``)
    and stderr goes nowhere (rather than messages landing on stdout, where ``print(file=None)`` sends them).
    stdout is UTF-8 whatever the locale says (PYTHONIOENCODING, a Latin-1 locale): JSON Lines, TSV and TREC
    files are read as UTF-8 by jq and the others, and a passage in any language fits.
    """
    with _STREAMS_LOCK:
        _streams["runs"] += 1
        if _streams["runs"] > 1 or isinstance(sys.stdout, _Stdout):  # another run installed them
            return
        try:
            _install_streams()
        except BaseException:
            # Not counted: ``run`` calls ``_restore_streams`` only once this returned, and a count left raised
            # would have every later run in the process take the streams for another run's and leave them be.
            _streams["runs"] -= 1
            raise


def _install_streams() -> None:
    """``_standard_streams``'s work, under its lock: the proxies are made first, then put in place together."""
    if sys.stdin is None:
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    original = sys.stdout
    encoding = (getattr(original, "encoding", None) or "utf-8").lower().replace("-", "").replace("_", "")
    if encoding != "utf8" and hasattr(original, "reconfigure"):
        try:
            original.reconfigure(encoding="utf-8")  # type: ignore[union-attr]
        except (OSError, ValueError):
            pass
    stdout, stderr = _Stdout(_patient(original)), _Stderr(_patient(sys.stderr))
    _streams["saved"] = (original, sys.stderr)
    sys.stdout, sys.stderr = stdout, stderr  # type: ignore[assignment]


def _restore_streams() -> None:
    """The last run to end puts back the streams the first found; one that failed is silenced first, so that
    the interpreter's flush at exit neither fails nor prints a second time."""
    with _STREAMS_LOCK:
        _streams["runs"] -= 1
        if _streams["runs"] > 0 or "saved" not in _streams:
            return
        for proxy in (sys.stdout, sys.stderr):
            if isinstance(proxy, _Stdout | _Stderr) and proxy.failed:
                _silence(proxy)
        sys.stdout, sys.stderr = _streams.pop("saved")


def _text(value: str) -> str:
    """A path as typed; an empty one (an unset shell variable in a cron line) is refused, never taken as '.'."""
    if not value.strip():
        raise typer.BadParameter("an empty path (is a shell variable unset?)")
    return value


def _path(value: str) -> Path:
    return Path(_text(value))


def _guard(command: Callable[..., None]) -> Callable[..., None]:
    """Turn Ctrl-C/SIGTERM and a closed stdout into our exceptions before Typer maps them to other codes."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
            sys.stdout.flush()
        except KeyboardInterrupt:
            message = "interrupted"
            if command.__name__ == "index" and "-" in (kwargs.get("corpus") or ()):
                # No checkpoint is kept of passages that no rerun can read again (indexer._build).
                message = "interrupted; nothing was published (the passages came from stdin: run it again)"
            elif command.__name__ == "index":
                message = "interrupted; nothing was published (run the same command again to resume)"
            raise IncompleteError(message) from None
        except BrokenPipeError:
            raise _PipeClosed() from None

    return wrapper


class _HelpCommand(typer.core.TyperCommand):
    """Help as a person writes it: metavars (CORPUS..., DIR, N) instead of Python types, required options in the
    usage line, no ``[default: 0]`` on counters or ``x>=1`` on numbers. Only the help text changes; parsing does not.
    """

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        params = self.get_params(ctx)
        pieces = [self.options_metavar] if self.options_metavar else []
        pieces += [_argument_name(p) for p in params if p.param_type_name == "argument"]
        pieces += [f"{_short_first(p.opts)[0]} {_metavar(p)}" for p in params if _is_option(p) and p.required]
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        params = [p for p in self.get_params(ctx) if not getattr(p, "hidden", False)]
        arguments = [(_argument_name(p), _with_extras(p.help, p)) for p in params if p.param_type_name == "argument"]
        options = [(_option_name(p), _with_extras(p.help, p)) for p in params if _is_option(p)]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _is_option(param: Any) -> bool:
    return param.param_type_name == "option"


def _short_first(opts: list[str]) -> list[str]:
    return sorted(opts, key=lambda opt: len(opt) - len(opt.lstrip("-")))


def _metavar(param: Any) -> str:
    """The metavar given, else a word for the value's type (never the Python type itself)."""
    if param.metavar:
        return str(param.metavar)
    kind = getattr(getattr(param, "type_descriptor", None), "annotation", str)
    args = getattr(kind, "__args__", None)
    if args:  # list[int], int | None …: the element type
        kind = next((a for a in args if a is not type(None)), str)
    return {int: "N", float: "NUMBER", Path: "PATH"}.get(kind, "TEXT")


def _argument_name(param: Any) -> str:
    if param.metavar:
        return str(param.metavar)
    name = param.name.upper() + ("..." if param.nargs != 1 else "")
    return name if param.required else f"[{name}]"


def _option_name(param: Any) -> str:
    names = ", ".join(_short_first(list(param.opts) + list(param.secondary_opts)))
    return names if param.is_flag or param.count else f"{names} {_metavar(param)}"


def _with_extras(text: str | None, param: Any) -> str:
    """The help text plus ``[default: …]`` for a real default value, and ``[required]``."""
    extras = []
    default = param.default
    flag = getattr(param, "is_flag", False) or getattr(param, "count", False)
    if param.show_default and not flag and default not in (None, ()):
        extras.append(f"default: {default}")
    if param.required:
        extras.append("required")
    suffix = f" [{'; '.join(extras)}]" if extras else ""
    return (text or "") + suffix


app = typer.Typer(
    name="dsearch",
    help="Dense retrieval from the command line: index passages with a sentence-transformers model, query them.",
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by every command: where they sit on the command line is the user's choice.
Verbose = Annotated[
    int, typer.Option("-v", "--verbose", count=True, help="Log lines with timestamps on stderr (-vv: more).")
]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="Print nothing on stderr but errors.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show a traceback on errors.")]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        metavar="NAME|PATH",
        help="sentence-transformers model: a hub name or a local folder [default: the bundled all-MiniLM-L6-v2]",
    ),
]
QueryModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        metavar="NAME|PATH",
        help="Encode the queries with this model instead of the index's own; it must make vectors of the index's "
        "dimension [default: the model that built the index]",
    ),
]
TrustRemote = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a model to run its own Python code.")]
SearchMode = Annotated[
    str | None,
    typer.Option(
        "--mode",
        metavar="MODE",
        help="dense (the model), lexical (BM25 keywords) or hybrid (both, fused) [default: dense; hybrid with "
        "--alpha]",
    ),
]
Alpha = Annotated[
    float | None,
    typer.Option(
        "--alpha",
        metavar="W",
        help="Hybrid: fuse W x normalised dense score + (1 - W) x normalised BM25 score instead of reciprocal ranks.",
    ),
]
Where = Annotated[
    str | None,
    typer.Option(
        "--where",
        metavar="EXPR",
        help="Search only passages matching this SQL condition on their fields, id, title and source, before the "
        "top-k: \"year >= 2020 AND source LIKE 'docs/%'\".",
    ),
]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, metavar="N", help="Texts per encoder batch.")]
SNIPPET_DEFAULT = 2
Snippet = Annotated[
    int, typer.Option("--snippet", min=1, metavar="LINES", help="Lines of passage text per hit in the table.")
]
Full = Annotated[bool, typer.Option("--full", help="Whole passages in the table, not snippets.")]
IndexTypeOpt = Annotated[
    str | None,
    typer.Option(
        "--index-type",
        metavar="TYPE",
        help="auto|flat|hnsw|ivf|ivfpq or a FAISS factory string such as IVF4096,PQ64 [default: auto; on --update "
        "the index's]",
    ),
]
MemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--memory", metavar="SIZE", help="Memory budget of the index, e.g. 2G; auto fits it [default: half the RAM]"
    ),
]
NProbeOpt = Annotated[
    int | None, typer.Option("--nprobe", min=1, metavar="N", help="IVF lists probed [default: chosen at build time]")
]
EfOpt = Annotated[
    int | None, typer.Option("--ef", min=1, metavar="N", help="HNSW efSearch [default: chosen at build time]")
]
EffortOpt = Annotated[
    float | None,
    typer.Option("--effort", min=0.01, metavar="X", help="Multiply the build-time nprobe/ef (2 = more recall, slower)"),
]
Precision = Annotated[
    str | None,
    typer.Option(
        "--precision",
        metavar="PRECISION",
        help="How the model runs: auto, fp32, bf16 or int8 (README: Speed) [default: auto]",
    ),
]
QueryPrecision = Annotated[
    str | None,
    typer.Option(
        "--precision",
        metavar="PRECISION",
        help="Encode the queries at this precision: auto, fp32, bf16 or int8 [default: the index's]",
    ),
]


def _setup(verbose: int, quiet: bool, debug: bool) -> None:
    SETTINGS.quiet, SETTINGS.debug = quiet, debug
    level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    # Timestamps in verbose mode: these lines end up in cron mail and log files.
    fmt = "%(asctime)s dsearch %(levelname)s: %(message)s" if verbose else "dsearch: %(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, "%Y-%m-%dT%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _deps(ctx: typer.Context) -> Deps:
    return ctx.obj if isinstance(ctx.obj, Deps) else Deps()


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _color() -> bool:
    return _stdout_is_terminal() and "NO_COLOR" not in os.environ


def _info(message: str) -> None:
    """A summary line for people: stderr, unless -q."""
    if not SETTINGS.quiet:
        print(message, file=sys.stderr)


def _version_callback(value: bool) -> None:
    if value:
        print(f"dsearch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Dense retrieval from the command line."""


# --- index -------------------------------------------------------------------------------------------


class _Progress:
    """Progress on stderr: a Rich bar on a terminal, periodic log lines under -v, else nothing.

    While it is open it also shows the ``dsearch.notice`` lines (the first run's model export): a log line under
    -v, else a plain ``dsearch: …`` line (above the bar on a terminal); under -q, nothing.
    """

    def __init__(self, total: int | None) -> None:
        self.done = 0  # passages this run processed
        self.skipped = 0  # passages an interrupted run had done
        # The rate counts from the first encoded chunk: loading and exporting the model before it is not encoding.
        self.rate_from: tuple[float, int] | None = None
        self.last_log = time.perf_counter()
        self.bar: Any = None
        if sys.stderr.isatty() and not SETTINGS.quiet:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("indexing"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]} passages/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),  # stdout carries results only
                transient=True,
            )
            self.task = self.bar.add_task("indexing", total=total, rate="-")
            self.bar.start()
            # -v log lines go through the bar's stderr proxy, which prints them above the bar instead of over it.
            self.streams = [(h, h.stream) for h in log.handlers if isinstance(h, logging.StreamHandler)]
            for handler, _ in self.streams:
                handler.setStream(sys.stderr)
        self.notices = logging.getLogger("dsearch.notice")
        self.handler = _NoticeHandler(self.notice)
        self.notices.addHandler(self.handler)
        self.notices.setLevel(logging.ERROR if SETTINGS.quiet else logging.INFO)
        self.notices.propagate = False

    def notice(self, record: logging.LogRecord) -> None:
        if SETTINGS.quiet:
            return
        if log.isEnabledFor(logging.INFO):
            log.handle(record)  # under -v, a log line like the others
        else:  # while the bar runs, sys.stderr is its proxy, which prints the line above the bar
            print(f"dsearch: {record.getMessage()}", file=sys.stderr)

    def resumed(self, n: int) -> None:
        """Passages an interrupted run already did: they move the bar but are not this run's speed."""
        self.skipped += n
        if self.bar is not None:
            self.bar.update(self.task, advance=n)

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.rate_from is None:
            self.rate_from = (now, self.done)
            rate = None
        else:
            since, base = self.rate_from
            rate = (self.done - base) / max(now - since, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, advance=n, rate="-" if rate is None else f"{rate:.1f}")
        elif now - self.last_log >= 10:
            self.last_log = now
            per_second = "" if rate is None else f" ({rate:.1f} passages/s)"
            log.info("encoded %d passages%s", self.done, per_second)

    def close(self) -> None:
        self.notices.removeHandler(self.handler)
        self.notices.setLevel(logging.NOTSET)
        self.notices.propagate = True
        if self.bar is not None:
            self.bar.stop()
            for handler, stream in self.streams:
                handler.setStream(stream)


class _NoticeHandler(logging.Handler):
    """Hands ``dsearch.notice`` records to the progress display."""

    def __init__(self, show: Callable[[logging.LogRecord], None]) -> None:
        super().__init__(logging.INFO)
        self.show = show

    def emit(self, record: logging.LogRecord) -> None:
        self.show(record)


@app.command(cls=_HelpCommand, short_help="Encode a corpus into an index directory (-o DIR).")
@_guard
def index(
    ctx: typer.Context,
    corpus: Annotated[
        list[str],
        typer.Argument(
            metavar="CORPUS...",
            parser=_text,
            help="Corpus files or directories: JSONL, TSV, CSV, Parquet, text or Markdown, optionally .gz; "
            "'-' reads stdin.",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "-o", "--output", metavar="DIR", parser=_path, help="Index directory to create, replace or update."
        ),
    ],
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            metavar="FORMAT",
            help="Input format: jsonl, tsv, csv, parquet or text [default: from each file's extension; stdin: jsonl]",
        ),
    ] = None,
    id_field: Annotated[
        str | None,
        typer.Option(
            metavar="FIELD", help="Field holding the passage id [default: the first of _id, id, docid, doc_id, pid]"
        ),
    ] = None,
    text_field: Annotated[
        str | None,
        typer.Option(
            metavar="FIELD", help="Field holding the text [default: the first of text, contents, passage, body]"
        ),
    ] = None,
    title_field: Annotated[
        str | None, typer.Option(metavar="FIELD", help="Field holding the title, if any [default: title]")
    ] = None,
    model: ModelOpt = None,
    precision: Precision = None,
    batch_size: BatchSize = 32,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Skip and count bad records instead of stopping.")
    ] = False,
    update: Annotated[
        bool, typer.Option("--update", help="Encode only new and changed passages; drop those gone from the corpus.")
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="Ignore an interrupted run's checkpoint and start over.")
    ] = False,
    split: Annotated[
        bool | None,
        typer.Option(
            "--split/--no-split",
            help="Cut passages longer than the model's window into overlapping windows, each searched, a hit "
            "showing its best one (default); --no-split truncates them. --update keeps the index's choice.",
        ),
    ] = None,
    overlap: Annotated[
        int | None,
        typer.Option("--overlap", min=0, metavar="TOKENS", help="Tokens shared by neighbouring windows [default: 32]."),
    ] = None,
    max_remove: Annotated[
        str | None,
        typer.Option(
            "--max-remove",
            metavar="N|P%",
            help="Refuse (exit 9) to remove more than N passages or P% of the index [default: half of it].",
        ),
    ] = None,
    lexical: Annotated[
        bool | None,
        typer.Option(
            "--lexical/--no-lexical",
            help="Also build the BM25 index for --mode lexical and hybrid (default); --update keeps the index's "
            "choice unless one is given.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")] = False,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Encode on a Ray cluster: --ray-address, else $RAY_ADDRESS, else a new local Ray "
            '(needs pip install "dsearch[ray]").',
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", metavar="HOST:PORT", help="The Ray cluster's head node (with --ray)."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", min=1, metavar="N", help="Ray workers, one model each [default: as many as the cluster fits]."
        ),
    ] = None,
    cpus_per_worker: Annotated[
        int | None,
        typer.Option("--cpus-per-worker", min=1, metavar="N", help="Encoding threads per Ray worker [default: 1]."),
    ] = None,
    gpus_per_worker: Annotated[
        float | None,
        typer.Option(
            "--gpus-per-worker", min=0, metavar="N", help="GPUs per Ray worker; --precision auto is fp16 there."
        ),
    ] = None,
    trust_remote_code: TrustRemote = False,
    index_type: IndexTypeOpt = None,
    memory: MemoryOpt = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Encode the passages of CORPUS and publish them as the index at -o DIR: a new index, an atomic replacement
    of the one there, or with --update only what changed."""
    _setup(verbose, quiet, debug)
    from dsearch.api import build_index
    from dsearch.corpus import FORMATS
    from dsearch.indexer import RemovalLimit, count_records

    limit = RemovalLimit.parse(max_remove)
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_precision(precision)
    budget = _check_index_type(index_type, memory, count_records(corpus) if memory else None)
    if corpus.count("-") > 1:
        raise UsageError("stdin ('-') can be read only once")
    if split is False and overlap is not None:
        raise UsageError("--overlap sets how --split cuts windows; it cannot go with --no-split")
    ray_options = {"--ray-address": ray_address, "--workers": workers, "--cpus-per-worker": cpus_per_worker}
    ray_options["--gpus-per-worker"] = gpus_per_worker
    if not ray and any(v is not None for v in ray_options.values()):
        given = ", ".join(k for k, v in ray_options.items() if v is not None)
        raise UsageError(f"{given} sets up encoding on a Ray cluster: add --ray")
    deps = _deps(ctx)
    chunk_encoder = None
    if ray:  # connect first: an unreachable cluster fails in seconds, before the corpus is read or a model loaded
        from dsearch.distributed import RayEncoder

        chunk_encoder = RayEncoder(
            ray_address,
            workers,
            cpus_per_worker=1 if cpus_per_worker is None else cpus_per_worker,
            gpus_per_worker=gpus_per_worker or 0,
            trust_remote_code=trust_remote_code,
            batch_size=batch_size,
            precision=precision,
        )
    progress = _Progress(count_records(corpus) if sys.stderr.isatty() else None)
    try:
        summary = build_index(
            output,
            corpus,
            model=model,
            update=update,
            precision=precision,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
            fmt=fmt,
            id_field=id_field,
            text_field=text_field,
            title_field=title_field,
            skip_bad=skip_bad,
            split=split,
            overlap=overlap,
            lexical=lexical,
            index_type=index_type,
            memory=budget,
            max_remove=limit,
            restart=restart,
            loader=deps,
            progress=progress.advance,
            on_resume=progress.resumed,
            stdin=deps.stdin_bytes(),
            chunk_encoder=chunk_encoder,
        )
    finally:
        progress.close()
        if chunk_encoder is not None:
            chunk_encoder.close()
    try:
        _print_summary(summary, output, update, as_json)
    except KeyboardInterrupt:
        pass  # the index is published (or was already up to date): that is the outcome, exit 0


def _print_summary(summary: Any, output: Path, update: bool, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.as_dict()))
    s = summary
    resumed = f"; resumed at passage {s.resumed_at}" if s.resumed_at else ""
    windows = f" in {s.windows} windows" if s.windows > s.indexed else ""
    if update:
        verb = "updated" if s.published else "unchanged:"
        _info(
            f"{verb} {output}: {s.added} added, {s.updated} updated, {s.metadata_only} metadata-only, "
            f"{s.unchanged} unchanged, {s.removed} removed; {_passages(s.indexed)}{windows}; encoded {s.encoded} in "
            f"{s.seconds:.1f} s; skipped {s.skipped_empty} empty, {s.skipped_bad} bad{resumed}"
        )
    else:
        truncated = f"; {s.truncated} truncated at the model's max_seq_length (--split keeps them whole)"
        _info(
            f"indexed {_passages(s.indexed)}{windows} into {output} in {s.seconds:.1f} s "
            f"({s.passages_per_second:.1f} passages/s, {s.precision}); skipped {s.skipped_empty} empty, "
            f"{s.skipped_bad} bad{truncated if s.truncated else ''}{resumed}"
        )


def _passages(n: int) -> str:
    """``1 passage``, ``2 passages``: the summary is read by people."""
    return f"{n} passage" if n == 1 else f"{n} passages"


# --- query -------------------------------------------------------------------------------------------


def _check_precision(precision: str | None) -> None:
    from dsearch.encoder import PRECISIONS

    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def _check_index_type(index_type: str | None, memory: str | None, passages: int | None) -> int | None:
    """Refuse a malformed --index-type or an impossible --memory before any passage is read; the budget in bytes."""
    from dsearch.vector_index import INDEX_TYPES, looks_like_factory, minimum_bytes, parse_memory

    if index_type is not None and index_type.lower() not in INDEX_TYPES and not looks_like_factory(index_type):
        raise UsageError(
            f"unknown --index-type {index_type!r}; choose one of {', '.join(INDEX_TYPES)} or a FAISS factory "
            "string such as IVF4096,PQ64"
        )
    if memory is None:
        return None
    try:
        budget = parse_memory(memory)
    except ValueError as exc:
        raise UsageError(f"--memory: {exc}") from None
    if passages is not None and minimum_bytes(passages) > budget:
        raise UsageError(
            f"--memory {memory} cannot hold an index of {passages} passages (at least "
            f"{minimum_bytes(passages):,} bytes even compressed); raise --memory"
        )
    return budget


def _output_format(out_format: str | None) -> str:
    """The --format asked for (an empty one is a usage error, not the default), else by where stdout goes."""
    from dsearch.output import OUTPUT_FORMATS

    fmt = ("table" if _stdout_is_terminal() else "jsonl") if out_format is None else out_format
    if fmt not in OUTPUT_FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    return fmt


@app.command(cls=_HelpCommand, short_help="Search an index and print ranked passages.")
@_guard
def query(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(metavar="DIR", parser=_path, help="Index directory.")],
    queries: Annotated[
        list[str] | None,
        typer.Argument(metavar="[QUERY]...", help="Query texts; none or '-' reads one query a line from stdin."),
    ] = None,
    queries_file: Annotated[
        Path | None,
        typer.Option(
            "--queries",
            metavar="FILE",
            help="Query file: TSV 'qid TAB text', BEIR queries.jsonl, or .txt with one query a line; '-' reads "
            "stdin (JSON Lines or TSV).",
        ),
    ] = None,
    top_k: Annotated[int, typer.Option("-k", "--top-k", min=1, metavar="N", help="Hits per query.")] = 10,
    out_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            metavar="FORMAT",
            help="Output format: table, jsonl, tsv, trec or ids [default: table on a terminal, jsonl in a pipe]",
        ),
    ] = None,
    min_score: Annotated[
        float | None, typer.Option("--min-score", help="Drop hits scoring below this (a query may get fewer than k).")
    ] = None,
    like: Annotated[
        str | None,
        typer.Option("--like", metavar="ID", help="More like this: rank passages by similarity to a stored passage."),
    ] = None,
    mode: SearchMode = None,
    alpha: Alpha = None,
    where: Where = None,
    snippet: Snippet = SNIPPET_DEFAULT,
    full: Full = False,
    model: QueryModelOpt = None,
    precision: QueryPrecision = None,
    batch_size: BatchSize = 32,
    trust_remote_code: TrustRemote = False,
    nprobe: NProbeOpt = None,
    ef: EfOpt = None,
    effort: EffortOpt = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Search the index at DIR for each QUERY and print the ranked passages on stdout. Queries are encoded with
    the model that built the index."""
    _setup(verbose, quiet, debug)
    from dsearch.output import TableOptions, render
    from dsearch.search import (
        PipeLines,
        ReadyIterator,
        SearchStats,
        check_query_arguments,
        decode_lines,
        like_query,
        queries_from_texts,
    )

    fmt = _output_format(out_format)
    if min_score is not None and not math.isfinite(min_score):
        raise UsageError(f"--min-score {min_score} is not a finite number")
    table = TableOptions(snippet_lines=snippet, full=full)
    deps = _deps(ctx)
    texts = [q for q in (queries or []) if q != "-"]
    check_query_arguments(texts)
    stats = SearchStats()
    _check_mode_options(mode, alpha)
    if like is not None:
        if texts or queries_file is not None or queries:
            raise UsageError("--like ranks by a stored passage: give no QUERY and no --queries with it")
        if model or precision:
            raise UsageError("--like uses the stored vectors and loads no model: drop --model/--precision")
        if mode not in (None, "dense") or alpha is not None:
            raise UsageError("--like ranks by a stored vector (dense): it takes no --mode lexical/hybrid or --alpha")
        from dsearch.api import Searcher

        with Searcher(directory, load_encoder=False) as searcher:
            hits = searcher.like(like, top_k, where=where, min_score=min_score, stats=stats)
            written = render([(like_query(like), hits)], fmt, sys.stdout, color=_color(), table=table)
        _log_search(stats, written)
        return
    if queries_file is not None and texts:
        raise UsageError("give queries as arguments or with --queries, not both")
    if queries_file is not None:
        query_list: Any = _read_queries(deps, queries_file)
    elif texts:
        query_list = list(queries_from_texts(texts))
    else:
        stdin = deps.stdin_bytes()
        if deps.stdin is None and sys.stdin.isatty() and not queries:  # '-' asks for the terminal's lines
            raise UsageError("no query given: pass QUERY arguments, --queries FILE, or pipe queries on stdin")
        # Read lazily, so that a pipeline gets each answer as its query arrives.
        lines = _pipe_lines(stdin) if deps.stdin is None else stdin
        query_list = queries_from_texts(decode_lines(lines, "<stdin>"))
        if isinstance(lines, PipeLines):
            query_list = ReadyIterator(query_list, lines.ready)
    searcher, mode = _open_searcher(deps, directory, mode, model, precision, trust_remote_code, batch_size, alpha)
    with searcher:
        results = searcher.iter_search(
            query_list, top_k, mode=mode, alpha=alpha, where=where, min_score=min_score, nprobe=nprobe, ef=ef,
            effort=effort, stats=stats,
        )  # fmt: skip
        retrievers = () if mode == "dense" else ("lexical",) if mode == "lexical" else ("dense", "lexical")
        written = render(results, fmt, sys.stdout, color=_color(), table=table, retrievers=retrievers)
    _log_search(stats, written)


def _check_mode_options(mode: str | None, alpha: float | None) -> None:
    from dsearch.hybrid import MODES

    if mode is not None and mode not in MODES:
        raise UsageError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    if alpha is not None:
        if not 0 <= alpha <= 1:
            raise UsageError(f"--alpha {alpha} is not a weight between 0 and 1")
        if mode in ("dense", "lexical"):
            raise UsageError(f"--alpha weighs the two retrievers of --mode hybrid; it does not go with --mode {mode}")


def _open_searcher(
    deps: Deps,
    directory: Path,
    mode: str | None,
    model: str | None,
    precision: str | None,
    trust_remote_code: bool,
    batch_size: int,
    alpha: float | None = None,
) -> tuple[Any, str]:
    """A Searcher on the index with the flags' model options, the mode settled (its default depends on the
    index), and the model loaded now unless lexical: a model that does not fit fails before any query is read."""
    from dsearch.api import Searcher

    _check_precision(precision)
    searcher = Searcher(
        directory, model=model, precision=precision, trust_remote_code=trust_remote_code, batch_size=batch_size,
        loader=deps,
    )  # fmt: skip
    try:
        mode = searcher.resolve_mode(mode, alpha)
        if mode == "lexical":
            if model or precision:
                raise UsageError("--mode lexical loads no model: drop --model/--precision")
        else:
            searcher.encoder  # noqa: B018 (loads the model)
            log.info("search mode: %s", mode)
    except BaseException:
        searcher.close()
        raise
    return searcher, mode


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _read_queries(deps: Deps, path: Path | str) -> list[Any]:
    """``--queries FILE``; ``-`` is stdin, JSON Lines or TSV as its first line shows."""
    from dsearch.search import read_query_file

    if str(path) == "-":
        return read_query_file("<stdin>", deps.stdin_bytes().read())
    return read_query_file(str(path))


def _pipe_lines(stdin: IO[bytes]) -> Any:
    """stdin's lines; from a pipe or a terminal, a ``PipeLines`` that says which queries have arrived."""
    import stat

    from dsearch.search import PipeLines

    try:
        fd = stdin.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):  # a file (`< queries.txt`) has every line ready
            return stdin
    except (OSError, ValueError, AttributeError):
        return stdin
    return PipeLines(fd)


def _log_search(stats: Any, written: int) -> None:
    """-v: where the time went after the index and model were loaded, and what was written."""
    log.info(
        "searched %s: encode %.3f s, search %.3f s, metadata lookup %.3f s",
        f"{stats.queries} {'query' if stats.queries == 1 else 'queries'}",
        stats.encode,
        stats.search,
        stats.lookup,
    )
    log.info("wrote %s", _plural(written, "hit"))


# --- get ---------------------------------------------------------------------------------------------


@app.command(cls=_HelpCommand, short_help="Print stored passages by id.")
@_guard
def get(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(metavar="DIR", parser=_path, help="Index directory.")],
    ids: Annotated[
        list[str], typer.Argument(metavar="ID...", help="Passage ids; '-' reads one id a line from stdin.")
    ],
    out_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            metavar="FORMAT",
            help="Output format: table, jsonl, tsv or ids [default: table on a terminal, jsonl in a pipe]",
        ),
    ] = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Print stored passages by id; ids not in the index are an error after the others are printed."""
    _setup(verbose, quiet, debug)
    from dsearch.output import render_passages, unescape_field
    from dsearch.search import check_query_arguments, decode_lines

    fmt = _output_format(out_format)
    if fmt == "trec":
        raise UsageError("--format trec is for rankings; get prints table, jsonl, tsv or ids")
    if ids == ["-"]:
        # What 'query -f ids' prints: one escaped id a line.
        ids = [unescape_field(line.rstrip("\r\n")) for line in decode_lines(_deps(ctx).stdin_bytes(), "<stdin>", "ids")]
        ids = [i for i in ids if i]
    check_query_arguments(ids, "id argument")
    from dsearch.api import Searcher

    with Searcher(directory, load_encoder=False) as searcher:
        passages, missing = searcher.get(ids)
    render_passages(passages, fmt, sys.stdout, color=_color())
    if missing:
        others = f" (and {_plural(len(missing) - 1, 'other id')})" if len(missing) > 1 else ""
        sys.stdout.flush()
        raise IndexDirError(f"{directory}: no passage with id {missing[0]!r}{others}; check the ids")


# --- info --------------------------------------------------------------------------------------------


@app.command(cls=_HelpCommand, short_help="Describe an index: model, dimension, passages, size.")
@_guard
def info(
    directory: Annotated[Path, typer.Argument(metavar="DIR", parser=_path, help="Index directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Also check every file's checksum.")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Describe the index at DIR: model, dimension, similarity, passages, size."""
    _setup(verbose, quiet, debug)
    from dsearch.api import Searcher
    from dsearch.output import human_bytes, render_mapping

    with Searcher(directory, verify=verify, load_encoder=False) as searcher:
        data = searcher.info()
    if as_json:
        print(json.dumps(data, ensure_ascii=False))
        return
    words = {
        "model": data["model"],
        "dimension": str(data["dim"]),
        "similarity": f"{data['similarity']} ({'L2-normalised' if data['normalized'] else 'raw vectors'})",
        "passages": f"{data['passages']:,}"
        + (f" in {data['rows']:,} windows" if data["rows"] > data["passages"] else ""),
        "long passages": f"split, overlap {data['split']['overlap']} tokens" if data["split"] else "truncated",
        "index type": " ".join([data["index_type"], *[f"({f})" for f in [data["index_params"].get("factory")] if f]]),
        "recall@10": _describe_recall(data),
        "lexical index": "BM25 (bm25s)" if data["lexical"] else "none (--mode dense only)",
        "fields": ", ".join(f"{name} {kind}" for name, kind in data["fields"].items()) or "none",
        "precision": data["precision"],
        "max_seq_length": str(data["max_seq_length"]),
        "size on disk": human_bytes(data["size_bytes"]),
        "created": data["created_at"],
        "format": f"{data['format']} v{data['format_version']}",
    }
    render_mapping(str(directory), words, sys.stdout, color=_color())


def _describe_recall(data: dict[str, Any]) -> str:
    params = data["index_params"]
    if "recall_at_10" not in params:
        return "1 (exact search)"
    knobs = ", ".join(f"{k} {params[k]}" for k in ("nprobe", "efSearch") if k in params)
    return f"{params['recall_at_10']} on {params.get('recall_sample')} of its own vectors" + (
        f" ({knobs})" if knobs else ""
    )


@app.command("reindex", cls=_HelpCommand, short_help="Rebuild an index's ANN structure from its stored vectors.")
@_guard
def reindex_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", parser=_path, help="Index directory.")],
    index_type: IndexTypeOpt = None,
    memory: MemoryOpt = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Rebuild the ANN structure of DIR from its stored vectors (no model, no encoding); atomic."""
    _setup(verbose, quiet, debug)
    from dsearch.manifest import read_manifest
    from dsearch.vector_index import reindex

    budget = _check_index_type(index_type, memory, None)
    requested = index_type or read_manifest(directory).index_params.get("requested", "auto")
    started = time.perf_counter()
    manifest = reindex(directory, requested, budget)
    recall = manifest.index_params.get("recall_at_10")
    _info(
        f"reindexed {directory} as {manifest.index_type} in {time.perf_counter() - started:.1f} s"
        + (f"; recall@10 {recall}" if recall is not None else " (exact search)")
    )


# --- status ------------------------------------------------------------------------------------------


def _parse_age(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``1d``, ``2w`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        seconds = math.nan
    # Empty (an unset variable), negative or NaN would silently turn the check off or make it always fail.
    if not seconds >= 0:
        raise UsageError(f"--max-age {text!r} is not a duration such as 90s, 30m, 12h, 1d or 2w")
    return seconds


@app.command(cls=_HelpCommand, short_help="Check that an index is healthy (for monitoring and cron).")
@_guard
def status(
    directory: Annotated[Path, typer.Argument(metavar="DIR", parser=_path, help="Index directory.")],
    corpus: Annotated[
        list[str] | None,
        typer.Option(
            "--corpus",
            metavar="PATH",
            parser=_text,
            help="Corpus path to compare with the ones the index was built from; repeat for several "
            "(--corpus a.jsonl --corpus notes/) [default: those].",
        ),
    ] = None,
    max_age: Annotated[
        str | None,
        typer.Option(metavar="AGE", help="Fail (exit 7) when the index is older than this: 90s, 30m, 12h, 1d, 2w."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Check that the index at DIR is healthy: present, complete, intact, fresh, and built from the corpus as it is
    now. Prints one line (or --json) and exits with the code of the first problem (README: Exit codes)."""
    _setup(verbose, quiet, debug)
    from dsearch.health import check_index

    report = check_index(directory, corpus, _parse_age(max_age) if max_age is not None else None)
    try:
        print(json.dumps(report.as_dict()) if as_json else report.line())
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away: the line is lost, not the check's exit code
        _silence(sys.stdout)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


# --- eval --------------------------------------------------------------------------------------------


@app.command("eval", cls=_HelpCommand, short_help="Score judged queries against an index (nDCG, recall, MRR).")
@_guard
def eval_command(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(metavar="DIR", parser=_path, help="Index directory.")],
    queries_file: Annotated[
        Path,
        typer.Option(
            "--queries",
            metavar="FILE",
            parser=_path,
            help="Queries: BEIR queries.jsonl or TSV 'qid TAB text'; '-' reads stdin.",
        ),
    ],
    qrels_file: Annotated[
        Path,
        typer.Option(
            "--qrels", metavar="FILE", parser=_path, help="Judgements: BEIR qrels TSV or TREC 'qid 0 docid rel'."
        ),
    ],
    top_k: Annotated[int, typer.Option("-k", "--top-k", min=1, metavar="N", help="Hits retrieved per query.")] = 100,
    metrics: Annotated[
        str | None,
        typer.Option(
            metavar="NAMES", help="Comma-separated ir-measures names [default: nDCG@10,R@100,RR@10; RR@10 is MRR@10]"
        ),
    ] = None,
    run_file: Annotated[
        Path | None, typer.Option("--run", metavar="FILE", parser=_path, help="Also save the TREC run to this file.")
    ] = None,
    per_query: Annotated[bool, typer.Option("--per-query", help="Add each query's values.")] = False,
    keep_self: Annotated[bool, typer.Option("--keep-self", help="Keep hits whose id equals the query id.")] = False,
    mode: SearchMode = None,
    alpha: Alpha = None,
    where: Where = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    nprobe: NProbeOpt = None,
    ef: EfOpt = None,
    effort: EffortOpt = None,
    model: QueryModelOpt = None,
    precision: QueryPrecision = None,
    batch_size: BatchSize = 32,
    trust_remote_code: TrustRemote = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Run the judged queries against the index at DIR and score the ranking with ir-measures (trec_eval's
    definitions of nDCG, recall, MRR and the rest)."""
    _setup(verbose, quiet, debug)
    from dsearch.evaluate import DEFAULT_METRICS, RunTarget, evaluate, parse_metrics, read_qrels

    measures = parse_metrics(metrics or DEFAULT_METRICS)
    _check_mode_options(mode, alpha)
    run_target = RunTarget.check(run_file) if run_file is not None else None  # before any query runs
    if run_file is not None:
        for flag, given in (("--queries", queries_file), ("--qrels", qrels_file)):
            if _same_file(run_file, given):  # replacing it would lose the judgements or topics
                raise UsageError(f"--run {run_file} is the {flag} file; give --run another path")
        if _index_file(run_file, directory):  # replacing it would lose the index
            raise UsageError(f"--run {run_file} is a file of the index {directory}; give --run another path")
    qrels = read_qrels(str(qrels_file))
    queries = _read_queries(_deps(ctx), queries_file)
    searcher, mode = _open_searcher(
        _deps(ctx), directory, mode, model, precision, trust_remote_code, batch_size, alpha
    )
    with searcher:
        report = evaluate(
            searcher, queries, qrels, top_k, measures, keep_self, run_target, mode=mode, alpha=alpha, where=where,
            nprobe=nprobe, ef=ef, effort=effort,
        )  # fmt: skip
    if report.queries_without_judgements:
        log.warning("%d queries have no judgements; left out of the means", report.queries_without_judgements)
    if report.judged_queries_missing:
        log.warning("%d judged queries are not in %s", report.judged_queries_missing, queries_file)
    if report.judged_ids_missing_from_index:
        log.warning("%d judged passage ids are not in the index", report.judged_ids_missing_from_index)
    if as_json:
        print(json.dumps(report.as_dict(per_query)))
        return
    if _stdout_is_terminal():
        from dsearch.output import render_mapping

        rows = {name: f"{value:.4f}" for name, value in report.metrics.items()}
        rows["queries"] = str(report.queries)
        render_mapping(f"{directory} ({report.queries} queries, k={top_k})", rows, sys.stdout, color=_color())
    else:  # awk-friendly, like trec_eval: metric<TAB>all<TAB>value
        for name, value in report.metrics.items():
            print(f"{name}\tall\t{value:.4f}")
    if per_query:
        from dsearch.output import escape_field

        for qid, values in report.per_query.items():
            for name, value in values.items():
                print(f"{name}\t{escape_field(qid)}\t{value:.4f}")


def _index_file(path: Path, directory: Path) -> bool:
    """Whether ``path`` (through any symlinks) is, or would be, one of dsearch's own files inside the index
    ``directory``: its manifest, lock, a segment or a staging area."""
    from dsearch.manifest import MANIFEST_FILE, SEGMENT_NAME
    from dsearch.store import LOCK_FILE, STAGING_NAME

    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(directory))
    if not real.is_relative_to(root) or real == root:
        return False
    top = real.relative_to(root).parts[0]
    ours = (MANIFEST_FILE, LOCK_FILE, f".{MANIFEST_FILE}.tmp")
    return top in ours or bool(SEGMENT_NAME.fullmatch(top) or STAGING_NAME.fullmatch(top))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False  # one of them does not exist (yet): not the same file


# --- serve -------------------------------------------------------------------------------------------


@app.command(cls=_HelpCommand, short_help="Answer searches over HTTP (a JSON API) with the model kept loaded.")
@_guard
def serve(
    ctx: typer.Context,
    directories: Annotated[
        list[Path], typer.Argument(metavar="DIR...", parser=_path, help="Index directories to serve.")
    ],
    host: Annotated[
        str,
        typer.Option("--host", metavar="ADDRESS", help="Address to listen on; anything but loopback is reachable "
                     "from other machines (use --token-file)."),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, metavar="PORT", help="TCP port; 0 picks a free one.")
    ] = 8000,
    token_file: Annotated[
        Path | None,
        typer.Option("--token-file", metavar="FILE", help="Require 'Authorization: Bearer TOKEN', TOKEN being this "
                     "file's content."),
    ] = None,
    max_k: Annotated[int, typer.Option("--max-k", min=1, metavar="N", help="Largest k a request may ask for.")] = 100,
    max_queries: Annotated[
        int, typer.Option("--max-queries", min=1, metavar="N", help="Most queries in one POST.")
    ] = 100,
    max_body: Annotated[
        int, typer.Option("--max-body", min=1, metavar="BYTES", help="Largest POST body.")
    ] = 1_000_000,
    queue_size: Annotated[
        int, typer.Option("--queue", min=1, metavar="N", help="Requests that may wait; more get 503 + Retry-After.")
    ] = 256,
    model: QueryModelOpt = None,
    precision: QueryPrecision = None,
    trust_remote_code: TrustRemote = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Serve the indexes at DIR... over HTTP: GET/POST /search, GET /info, GET /health, GET /openapi.json. A new
    version published by 'dsearch index' is picked up without a restart. SIGTERM or Ctrl-C stops it after the
    requests in flight are answered (exit 0)."""
    _setup(verbose, quiet, debug)
    from dsearch import serve as serving

    serving.check_installed()
    serving.DEBUG = debug
    serving.sweep_stale_shadows()
    _check_precision(precision)
    token = _read_token(token_file) if token_file is not None else None
    if not serving.is_loopback(host) and token is None:
        log.warning("listening on %s without --token-file: anyone who can reach this machine can search", host)
    names = [d.name or str(d) for d in directories]
    if len(set(names)) < len(names):
        names = [str(d) for d in directories]
    if len(set(names)) < len(names):
        raise UsageError("the same DIR is given twice")
    deps = _deps(ctx)
    encoders: dict[tuple[Any, ...], Encoder] = {}

    def load_encoder(info: ModelInfo) -> Encoder:
        # One encoder per model, shared by the indexes and by each new version of an index.
        key = (model,) if model else (info.name, info.fingerprint, info.precision)
        if key not in encoders:
            options = {"precision": precision, "trust_remote_code": trust_remote_code, "batch_size": 32}
            started = time.perf_counter()
            if model:
                encoders[key] = deps.load_encoder(model, **{**options, "precision": precision or info.precision})
            else:
                encoders[key] = deps.query_encoder(info, **options)
            log.info("load model: %s (%.3f s)", encoders[key].name, time.perf_counter() - started)
        return encoders[key]

    opener = serving.version_opener(load_encoder)
    slots = []
    try:
        for name, directory in zip(names, directories, strict=True):
            slots.append(serving.Slot(name, directory, opener))
        limits = serving.Limits(max_k=max_k, max_queries=max_queries, max_body=max_body, queue=queue_size)
        server = serving.Server(slots, limits, token)
        sock = serving.bind(host, port)
    except BaseException:
        for slot in slots:
            slot.close()
        raise
    serving.setup_logging(log.handlers[0], verbose)
    described = ", ".join(f"{s.name} ({_passages(s.current.info.get('passages') or 0)})" for s in slots)

    def ready(url: str) -> None:
        _info(f"dsearch: serving {described} at {url}")

    serving.run_server(server, sock, access_log=verbose > 0, on_ready=ready)
    _info("dsearch: stopped")


def _read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--token-file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    if not token or any(c.isspace() for c in token):
        raise UsageError(f"--token-file {path}: holds no token (one line, no spaces)")
    return token


# --- entry point -------------------------------------------------------------------------------------


class _Terminated(KeyboardInterrupt):
    """SIGTERM (cron's timeout, systemd stop) unwinds like Ctrl-C so staging areas are cleaned up."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def run(argv: list[str] | None = None, deps: Deps | None = None) -> int:
    """Run the command line and return the exit code (what ``main`` passes to ``sys.exit``)."""
    args = sys.argv[1:] if argv is None else argv
    SETTINGS.debug = "--debug" in args
    _standard_streams()
    try:
        code = _run(args, deps)
        try:  # what click printed itself (--help) is still buffered
            sys.stdout.flush()
        except OutputError as exc:
            return _fail(exc.for_cli(), exc.exit_code)
        except BrokenPipeError:
            return _closed_pipe()
        error = getattr(sys.stdout, "error", None)
        if code == EXIT_OK and error is not None:  # a write failed and something caught it: still not a success
            return _fail(error.for_cli(), error.exit_code)
        return code
    finally:
        _restore_streams()


def _run(args: list[str], deps: Deps | None) -> int:
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (tests running in threads)
        pass
    try:
        deps = deps or _deps_from_environment() or Deps()
        result = app(args=args, prog_name="dsearch", standalone_mode=False, obj=deps)
        sys.stdout.flush()
        return result if isinstance(result, int) else EXIT_OK
    except DsearchError as exc:  # the library's message, with options named as this command's flags
        return _fail(exc.for_cli(), exc.exit_code)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:  # click's usage errors: bad flags, missing arguments
        exit_code = getattr(exc, "exit_code", EXIT_USAGE)
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message(), file=sys.stderr)
            return exit_code
        # The help that lists the option at fault: `dsearch query --help`, not the list of commands.
        ctx = getattr(exc, "ctx", None)
        where = getattr(ctx, "command_path", "") or "dsearch"
        return _fail(f"{exc.format_message()} (see '{where} --help')", exit_code)
    except (BrokenPipeError, _PipeClosed):
        return _closed_pipe()
    except SystemExit as exc:
        # Click's own answer to a closed pipe met outside a command (--help, --version): exit 1, quietly. Ours
        # is the 0 that `| head` gets from every command.
        if isinstance(exc.__context__, BrokenPipeError):
            return _closed_pipe()
        raise
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INCOMPLETE)
    except typer.Abort:
        return _fail("aborted", EXIT_INCOMPLETE)
    except Exception as exc:  # a bug or an unexpected environment problem: still one line
        return _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug and report it)", 1)


def _deps_from_environment() -> Deps | None:
    """Tests only: ``DSEARCH_TEST_ENCODER=MODULE:FACTORY`` makes a ``dsearch`` subprocess (a server, a build) load
    its encoder with ``FACTORY(name, **options)``, as the in-process tests inject one through ``Deps``."""
    spec = os.environ.get("DSEARCH_TEST_ENCODER")
    if not spec:
        return None
    import importlib

    module, _, name = spec.partition(":")
    return Deps(load_encoder=getattr(importlib.import_module(module), name))


def _fail(message: str, code: int) -> int:
    if SETTINGS.debug:
        traceback.print_exc()
    # One line whatever the message quotes: pyarrow's and FAISS's texts carry newlines ("...failed.\n")
    message = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"dsearch: error: {message}", file=sys.stderr)
    return code


def _closed_pipe() -> int:
    """The reader went away (``dsearch query … | head -1``): stop quietly, with success."""
    _silence(sys.stdout)
    return EXIT_OK


def _silence(stream: Any) -> None:
    """Point the stream's descriptor at /dev/null: nothing more is to be written there, and what is still
    buffered for it goes nowhere instead of failing at exit."""
    try:
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):
        return
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)  # dup2 made its own copy; this one would leak, one a run


def main() -> None:
    sys.exit(run())
