"""The ``dsearch`` command line: flags → one library call → a renderer; errors → exit codes.

Heavy libraries (torch, sentence-transformers, faiss, pyarrow) are imported inside the commands that
need them, so ``dsearch --help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
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
    ModelError,
    UsageError,
)

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
        return self.stdin if self.stdin is not None else sys.stdin.buffer


@dataclass
class Settings:
    """What the error and summary printers need to know about the current run."""

    quiet: bool = False
    debug: bool = False


SETTINGS = Settings()


class _PipeClosed(Exception):
    """stdout's reader went away; not an OSError, so that Typer leaves it to ``run``."""


def _guard(command: Callable[..., None]) -> Callable[..., None]:
    """Turn Ctrl-C/SIGTERM and a closed stdout into our exceptions before Typer maps them to other codes."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
            sys.stdout.flush()
        except KeyboardInterrupt:
            message = "interrupted"
            if command.__name__ == "index":
                message = "interrupted; nothing was published (run the same command again to resume)"
            raise IncompleteError(message) from None
        except BrokenPipeError:
            raise _PipeClosed() from None

    return wrapper


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
Verbose = Annotated[int, typer.Option("-v", "--verbose", count=True, help="Log progress lines to stderr (-vv: more).")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="Print nothing on stderr but errors.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show a traceback on errors.")]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="sentence-transformers model: hub name or local folder [default: bundled all-MiniLM-L6-v2]",
    ),
]
TrustRemote = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a model to run its own Python code.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Texts per encoder batch.")]
Precision = Annotated[
    str | None,
    typer.Option("--precision", help="auto|fp32|bf16|int8 [index default: auto; query default: the index's]"),
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
    """Progress on stderr: a Rich bar on a terminal, periodic log lines under -v, else nothing."""

    def __init__(self, total: int | None) -> None:
        self.done = 0  # passages this run processed
        self.skipped = 0
        self.started = time.perf_counter()
        self.last_log = self.started
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
            self.task = self.bar.add_task("index", total=total, rate="0")
            self.bar.start()

    def resumed(self, n: int) -> None:
        """Passages an interrupted run already did: they move the bar but are not this run's speed."""
        self.skipped += n
        if self.bar is not None:
            self.bar.update(self.task, advance=n)

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        rate = self.done / max(now - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f}")
        elif now - self.last_log >= 10:
            self.last_log = now
            log.info("encoded %d passages (%.1f passages/s)", self.done, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
@_guard
def index(
    ctx: typer.Context,
    corpus: Annotated[
        list[str],
        typer.Argument(help="Corpus files or directories (JSONL, TSV, CSV, Parquet, text/Markdown); '-' reads stdin."),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Index directory to create or replace.")],
    fmt: Annotated[
        str | None,
        typer.Option("--format", "-f", help="Input format: jsonl|tsv|csv|parquet|text [default: by extension]"),
    ] = None,
    id_field: Annotated[str | None, typer.Option(help="Field holding the passage id [default: _id or id]")] = None,
    text_field: Annotated[str | None, typer.Option(help="Field holding the text [default: text]")] = None,
    title_field: Annotated[str | None, typer.Option(help="Field holding the title [default: title]")] = None,
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
    max_remove: Annotated[
        str | None,
        typer.Option(
            "--max-remove",
            metavar="N|P%",
            help="Refuse (exit 9) to remove more than N passages or P% of the index [default: half of it].",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")] = False,
    trust_remote_code: TrustRemote = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Encode a corpus and write (or atomically replace, or --update) the index at DIR."""
    _setup(verbose, quiet, debug)
    from dsearch.corpus import FORMATS, FieldNames
    from dsearch.indexer import RemovalLimit, build_index, count_records

    limit = RemovalLimit.parse(max_remove)
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_precision(precision)
    if corpus.count("-") > 1:
        raise UsageError("stdin ('-') can be read only once")
    deps = _deps(ctx)
    from dsearch.encoder import canonical_model_name

    # What the user asked for, to check an index being updated against (None: whatever it was built with).
    model_name = canonical_model_name(model) if model is not None else None

    def load() -> Encoder:
        # On --update without --model, the index's own model (read from its manifest) is the one to load.
        from dsearch.manifest import MANIFEST_FILE, read_manifest

        name, chosen = model, precision or "auto"
        if update and name is None and (output / MANIFEST_FILE).exists():
            info = read_manifest(output).model
            name, chosen = info.name, precision or info.precision
        return deps.load_encoder(name, precision=chosen, trust_remote_code=trust_remote_code, batch_size=batch_size)

    progress = _Progress(count_records(corpus) if sys.stderr.isatty() else None)
    try:
        summary = build_index(
            corpus,
            output,
            load,
            fmt=fmt,
            names=FieldNames(id_field, text_field, title_field),
            skip_bad=skip_bad,
            batch_size=batch_size,
            progress=progress.advance,
            stdin=deps.stdin_bytes(),
            update=update,
            restart=restart,
            model_name=model_name,
            precision=precision,
            max_remove=limit,
            on_resume=progress.resumed,
        )
    finally:
        progress.close()
    try:
        _print_summary(summary, output, update, as_json)
    except KeyboardInterrupt:
        pass  # the index is published (or was already up to date): that is the outcome, exit 0


def _print_summary(summary: Any, output: Path, update: bool, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.as_dict()))
    s = summary
    resumed = f"; resumed at passage {s.resumed_at}" if s.resumed_at else ""
    if update:
        verb = "updated" if s.published else "unchanged:"
        _info(
            f"{verb} {output}: {s.added} added, {s.updated} updated, {s.metadata_only} metadata-only, "
            f"{s.unchanged} unchanged, {s.removed} removed; {s.indexed} passages; encoded {s.encoded} in "
            f"{s.seconds:.1f} s; skipped {s.skipped_empty} empty, {s.skipped_bad} bad{resumed}"
        )
    else:
        _info(
            f"indexed {s.indexed} passages into {output} in {s.seconds:.1f} s "
            f"({s.passages_per_second:.1f} passages/s, {s.precision}); skipped {s.skipped_empty} empty, "
            f"{s.skipped_bad} bad; {s.truncated} truncated at the model's max_seq_length{resumed}"
        )


# --- query -------------------------------------------------------------------------------------------


def _check_precision(precision: str | None) -> None:
    from dsearch.encoder import PRECISIONS

    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def open_index_and_encoder(
    deps: Deps, directory: Path, model: str | None, precision: str | None, trust_remote_code: bool, batch_size: int
) -> tuple[Any, Encoder]:
    """Open the index, then load the model it was built with (or a compatible override)."""
    from dsearch.store import OpenIndex

    _check_precision(precision)
    opened = OpenIndex(directory)
    info = opened.manifest.model
    options = {"precision": precision, "trust_remote_code": trust_remote_code, "batch_size": batch_size}
    if model:
        encoder = deps.load_encoder(model, **{**options, "precision": precision or info.precision})
    else:
        encoder = deps.query_encoder(info, **options)
    if encoder.dim != info.dim:
        raise ModelError(
            f"model {encoder.name!r} makes {encoder.dim}-d vectors but the index holds {info.dim}-d ones "
            f"(built with {info.name!r}); query with that model or rebuild the index"
        )
    if encoder.fingerprint != info.fingerprint:
        log.warning(
            "model %s differs from the one that built the index (fingerprint %s, index has %s); "
            "scores may be meaningless",
            encoder.name,
            encoder.fingerprint[:12],
            info.fingerprint[:12],
        )
    if encoder.similarity != info.similarity:
        log.warning("model similarity %s differs from the index's %s", encoder.similarity, info.similarity)
    return opened, encoder


@app.command()
@_guard
def query(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Index directory.")],
    queries: Annotated[
        list[str] | None,
        typer.Argument(metavar="[QUERY]...", help="Query texts; none or '-' reads one query a line from stdin."),
    ] = None,
    queries_file: Annotated[
        Path | None,
        typer.Option("--queries", help="Query file: TSV qid<TAB>text, BEIR queries.jsonl, or .txt one a line."),
    ] = None,
    top_k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Hits per query.")] = 10,
    out_format: Annotated[
        str | None,
        typer.Option("--format", "-f", help="table|jsonl|tsv|trec|ids [default: table on a terminal, jsonl in a pipe]"),
    ] = None,
    model: ModelOpt = None,
    precision: Precision = None,
    batch_size: BatchSize = 32,
    trust_remote_code: TrustRemote = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Search the index at DIR and print ranked passages on stdout."""
    _setup(verbose, quiet, debug)
    from dsearch.output import OUTPUT_FORMATS, render
    from dsearch.search import queries_from_texts, read_query_file, run_search

    fmt = out_format or ("table" if _stdout_is_terminal() else "jsonl")
    if fmt not in OUTPUT_FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    deps = _deps(ctx)
    texts = [q for q in (queries or []) if q != "-"]
    if queries_file is not None and texts:
        raise UsageError("give queries as arguments or with --queries, not both")
    if queries_file is not None:
        query_list: Any = read_query_file(str(queries_file))
    elif texts:
        query_list = list(queries_from_texts(texts))
    else:
        stdin = deps.stdin_bytes()
        if deps.stdin is None and sys.stdin.isatty():
            raise UsageError("no query given: pass QUERY arguments, --queries FILE, or pipe queries on stdin")
        query_list = queries_from_texts(line.decode("utf-8", errors="replace") for line in stdin)
    opened, encoder = open_index_and_encoder(deps, directory, model, precision, trust_remote_code, batch_size)
    written = render(run_search(opened, encoder, query_list, top_k), fmt, sys.stdout, color=_color())
    log.info("wrote %d hits", written)


# --- info --------------------------------------------------------------------------------------------


def describe_index(opened: Any) -> dict[str, Any]:
    m = opened.manifest
    return {
        "path": str(opened.directory),
        "model": m.model.name,
        "model_fingerprint": m.model.fingerprint,
        "dim": m.model.dim,
        "similarity": m.model.similarity,
        "normalized": m.model.similarity == "cosine",
        "max_seq_length": m.model.max_seq_length,
        "precision": m.model.precision,
        "prompts": m.model.prompts,
        "passages": m.rows,
        "index_type": m.index_type,
        "segments": len(m.segments),
        "size_bytes": opened.size_on_disk(),
        "created_at": m.created_at,
        "format": m.format,
        "format_version": m.format_version,
        "versions": m.versions,
        "stats": m.stats,
    }


@app.command()
@_guard
def info(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Index directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Also check every file's checksum.")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Describe the index at DIR: model, dimension, similarity, passages, size."""
    _setup(verbose, quiet, debug)
    from dsearch.output import human_bytes, render_mapping
    from dsearch.store import OpenIndex

    data = describe_index(OpenIndex(directory, verify=verify))
    if as_json:
        print(json.dumps(data, ensure_ascii=False))
        return
    words = {
        "model": data["model"],
        "dimension": str(data["dim"]),
        "similarity": f"{data['similarity']} ({'L2-normalised' if data['normalized'] else 'raw vectors'})",
        "passages": f"{data['passages']:,}",
        "index type": data["index_type"],
        "precision": data["precision"],
        "max_seq_length": str(data["max_seq_length"]),
        "size on disk": human_bytes(data["size_bytes"]),
        "created": data["created_at"],
        "format": f"{data['format']} v{data['format_version']}",
    }
    render_mapping(str(directory), words, sys.stdout, color=_color())


# --- status ------------------------------------------------------------------------------------------


def _parse_age(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``1d``, ``2w`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise UsageError(f"--max-age {text!r} is not a duration such as 90s, 30m, 12h, 1d or 2w") from None


@app.command()
@_guard
def status(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Index directory.")],
    corpus: Annotated[
        list[str] | None,
        typer.Option(
            "--corpus",
            metavar="PATH",
            help="Corpus path to compare with the ones the index was built from; repeat for several "
            "(--corpus a.jsonl --corpus notes/) [default: those].",
        ),
    ] = None,
    max_age: Annotated[str | None, typer.Option(help="Fail when the index is older than this (e.g. 1d, 12h).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Check that the index at DIR is healthy: present, complete, intact, fresh, built from the current corpus."""
    _setup(verbose, quiet, debug)
    from dsearch.health import check_index

    report = check_index(directory, corpus, _parse_age(max_age) if max_age else None)
    if as_json:
        print(json.dumps(report.as_dict()))
    else:
        print(report.line())
    if report.exit_code:
        raise typer.Exit(report.exit_code)


# --- eval --------------------------------------------------------------------------------------------


@app.command("eval")
@_guard
def eval_command(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Index directory.")],
    queries_file: Annotated[Path, typer.Option("--queries", help="Queries: BEIR queries.jsonl or TSV qid<TAB>text.")],
    qrels_file: Annotated[Path, typer.Option("--qrels", help="Judgements: BEIR qrels TSV or TREC 'qid 0 docid rel'.")],
    top_k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Hits retrieved per query.")] = 100,
    metrics: Annotated[
        str | None, typer.Option(help="Comma-separated ir-measures names [default: nDCG@10,R@100,RR@10].")
    ] = None,
    run_file: Annotated[Path | None, typer.Option("--run", help="Also save the TREC run to this file.")] = None,
    per_query: Annotated[bool, typer.Option("--per-query", help="Add each query's values.")] = False,
    keep_self: Annotated[bool, typer.Option("--keep-self", help="Keep hits whose id equals the query id.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    model: ModelOpt = None,
    precision: Precision = None,
    batch_size: BatchSize = 32,
    trust_remote_code: TrustRemote = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Run judged queries against DIR and score them (nDCG, recall, MRR…) with ir-measures."""
    _setup(verbose, quiet, debug)
    from dsearch.evaluate import DEFAULT_METRICS, evaluate, parse_metrics, read_qrels
    from dsearch.search import read_query_file

    measures = parse_metrics(metrics or DEFAULT_METRICS)
    qrels = read_qrels(str(qrels_file))
    queries = read_query_file(str(queries_file))
    opened, encoder = open_index_and_encoder(_deps(ctx), directory, model, precision, trust_remote_code, batch_size)
    report = evaluate(opened, encoder, queries, qrels, top_k, measures, keep_self, run_file)
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
        for qid, values in report.per_query.items():
            for name, value in values.items():
                print(f"{name}\t{qid}\t{value:.4f}")


# --- entry point -------------------------------------------------------------------------------------


class _Terminated(KeyboardInterrupt):
    """SIGTERM (cron's timeout, systemd stop) unwinds like Ctrl-C so staging areas are cleaned up."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def run(argv: list[str] | None = None, deps: Deps | None = None) -> int:
    """Run the command line and return the exit code (what ``main`` passes to ``sys.exit``)."""
    args = sys.argv[1:] if argv is None else argv
    SETTINGS.debug = "--debug" in args
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (tests running in threads)
        pass
    try:
        result = app(args=args, prog_name="dsearch", standalone_mode=False, obj=deps or Deps())
        sys.stdout.flush()
        return result if isinstance(result, int) else EXIT_OK
    except DsearchError as exc:
        return _fail(str(exc), exc.exit_code)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:  # click's usage errors: bad flags, missing arguments
        exit_code = getattr(exc, "exit_code", EXIT_USAGE)
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message(), file=sys.stderr)
            return exit_code
        return _fail(f"{exc.format_message()} (see 'dsearch --help')", exit_code)
    except (BrokenPipeError, _PipeClosed):
        return _closed_pipe()
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INCOMPLETE)
    except typer.Abort:
        return _fail("aborted", EXIT_INCOMPLETE)
    except Exception as exc:  # a bug or an unexpected environment problem: still one line
        return _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug and report it)", 1)


def _fail(message: str, code: int) -> int:
    if SETTINGS.debug:
        traceback.print_exc()
    print(f"dsearch: error: {message}", file=sys.stderr)
    return code


def _closed_pipe() -> int:
    """The reader went away (``dsearch query … | head -1``): stop quietly, with success."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_OK


def main() -> None:
    sys.exit(run())
