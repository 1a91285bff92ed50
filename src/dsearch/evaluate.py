"""Score retrieval against relevance judgements with ir-measures (trec_eval's definitions, not ours)."""

from __future__ import annotations

import logging
import math
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsearch.errors import DsearchError, InputError, UsageError
from dsearch.output import trec_line
from dsearch.search import Query
from dsearch.streams import patient_text

if TYPE_CHECKING:
    from dsearch.api import Searcher

log = logging.getLogger("dsearch")

DEFAULT_METRICS = "nDCG@10,R@100,RR@10"
Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]


def read_qrels(path: str) -> Qrels:
    """BEIR ``qrels/*.tsv`` (``query-id<TAB>corpus-id<TAB>score``, header optional) or TREC ``qid 0 docid rel``.

    Relevance must be a whole number (trec_eval's grades). A judgement repeated with the same grade is kept
    once with a warning; with another grade it is an error, since either grade would silently change the
    metrics.
    """
    qrels: Qrels = {}
    first_line: dict[tuple[str, str], int] = {}
    repeats: list[str] = []
    try:
        raw_lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise InputError(path, f"cannot read the qrels file ({exc.strerror or exc})") from None
    for lineno, raw in enumerate(raw_lines, 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError:
            raise InputError(where, "not valid UTF-8", "re-encode the file as UTF-8") from None
        parts = line.split()
        if not parts:
            continue
        tabbed = [part.strip() for part in line.split("\t")] if "\t" in line else []
        if len(tabbed) in (3, 4) and all(tabbed):
            parts = tabbed  # BEIR's TSV: ids may hold spaces (they are kept as given), so split at tabs only
        if lineno == 1 and parts[0].lower() in {"query-id", "query_id", "qid", "query"}:
            continue  # BEIR's header
        if len(parts) == 4:
            qid, _iteration, docid, rel = parts
        elif len(parts) == 3:
            qid, docid, rel = parts
        else:
            raise InputError(
                where, f"expected 'qid docid rel' (BEIR) or 'qid 0 docid rel' (TREC), found {len(parts)} columns"
            )
        grade = _grade(rel, where)
        judged = qrels.setdefault(qid, {})
        if docid in judged:
            first = first_line[(qid, docid)]
            if judged[docid] != grade:
                raise InputError(
                    where,
                    f"{qid} {docid} is judged {grade} here but {judged[docid]} on line {first}",
                    "keep one judgement per query and passage",
                )
            repeats.append(f"{where} (same as line {first})")
            continue
        judged[docid] = grade
        first_line[(qid, docid)] = lineno
    if not qrels:
        raise InputError(path, "no judgements in the qrels file")
    if repeats:
        more = f" and {len(repeats) - 1} more" if len(repeats) > 1 else ""
        log.warning("%s: repeated judgement kept once%s", repeats[0], more)
    return qrels


def _grade(rel: str, where: str) -> int:
    """A relevance grade: a whole number, such as 0, 1, 2 or -1 (``2.0`` is accepted as 2)."""
    try:
        value = float(rel)
    except ValueError:
        raise InputError(where, f"relevance {rel!r} is not a number", "use a whole number such as 0, 1 or 2") from None
    if not math.isfinite(value) or value != int(value):
        raise InputError(where, f"relevance {rel!r} is not a whole number", "use a whole number such as 0, 1 or 2")
    return int(value)


def parse_metrics(spec: str) -> list[tuple[str, Any]]:
    """``"nDCG@10,R@100"`` → [(name as given, ir_measures measure)]."""
    import ir_measures

    metrics = []
    for name in (s.strip() for s in spec.split(",")):
        if not name:
            continue
        try:
            metrics.append((name, ir_measures.parse_measure(name)))
        except (ValueError, NameError, SyntaxError, TypeError):
            raise UsageError(
                f"unknown metric {name!r}; use ir-measures names such as nDCG@10, R@100, RR@10, P@5, AP"
            ) from None
    if not metrics:
        raise UsageError("--metrics names no metric")
    return metrics


@dataclass
class EvalReport:
    metrics: dict[str, float]
    queries: int  # judged queries that were run and scored
    queries_without_judgements: int
    judged_queries_missing: int  # in the qrels but not in the queries file
    judged_ids_missing_from_index: int
    k: int
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self, with_per_query: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "metrics": self.metrics,
            "queries": self.queries,
            "queries_without_judgements": self.queries_without_judgements,
            "judged_queries_missing": self.judged_queries_missing,
            "judged_ids_missing_from_index": self.judged_ids_missing_from_index,
            "k": self.k,
        }
        if with_per_query:
            data["per_query"] = self.per_query
        return data


def score_run(
    run: Run, qrels: Qrels, metrics: list[tuple[str, Any]]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean and per-query values; queries without judgements are left out, as trec_eval does."""
    import ir_measures

    judged_run = {qid: docs for qid, docs in run.items() if qid in qrels}
    # Only queries that were run count, as in trec_eval without -c; judged queries missing from the
    # queries file are reported by the caller instead of scoring zero here.
    qrels = {qid: qrels[qid] for qid in judged_run}
    measures = [m for _, m in metrics]
    names = {m: name for name, m in metrics}
    per_query: dict[str, dict[str, float]] = {}
    for value in ir_measures.iter_calc(measures, qrels, judged_run):
        per_query.setdefault(value.query_id, {})[names[value.measure]] = float(value.value)
    aggregate = ir_measures.calc_aggregate(measures, qrels, judged_run) if judged_run else {}
    means = {name: float(aggregate.get(m, 0.0)) for name, m in metrics}
    return means, per_query


def evaluate(
    searcher: Searcher,
    queries: list[Query],
    qrels: Qrels,
    k: int,
    metrics: list[tuple[str, Any]],
    keep_self: bool = False,
    run_target: RunTarget | None = None,
    **search_options: Any,
) -> EvalReport:
    """Run the judged queries (with ``Searcher.iter_search``'s options: mode, where…), optionally save the TREC
    run, and score it."""
    judged = [q for q in queries if q.qid in qrels]
    if not judged:
        # Means over no query would print 0.0 for every metric, as if the index found nothing.
        raise DsearchError(
            f"no judged query to run: none of the {len(queries)} queries has a judgement in the qrels "
            f"(query ids such as {queries[0].qid!r}, judged ids such as {next(iter(qrels))!r}); "
            "check that the queries and the qrels belong together"
        )
    query_ids = {q.qid for q in queries}
    run: Run = {}
    for query, hits in searcher.iter_search(judged, k, exclude_self=not keep_self, **search_options):
        run[query.qid] = {hit.id: float(hit.score) for hit in hits}
    if run_target is not None:
        write_trec_run(run, run_target)
    index_ids = set(searcher.iter_ids())
    judged_ids = {doc for docs in qrels.values() for doc in docs}
    means, per_query = score_run(run, qrels, metrics)
    return EvalReport(
        metrics=means,
        queries=len(per_query),
        queries_without_judgements=len(queries) - len(judged),
        judged_queries_missing=len(set(qrels) - query_ids),
        judged_ids_missing_from_index=len(judged_ids - index_ids),
        k=k,
        per_query=per_query,
    )


@dataclass(frozen=True)
class RunTarget:
    """Where ``--run`` writes, decided before any query runs.

    A regular file (or a new one) is replaced atomically by a temporary file beside it. Anything else is
    written through, never replaced: a symlink's target (a regular target atomically, beside the target),
    a FIFO, ``/dev/stdout`` or another character device. A regular file in a directory we cannot write to
    (so no temporary file can go beside it) is overwritten in place.
    """

    path: Path  # what to open or replace: a symlink resolved to its target
    atomic: bool
    # ``-``, or a path that is this process's own stdout (``/dev/stdout``, ``/proc/self/fd/1``): written through
    # ``sys.stdout``, in order with the metrics and with a closed pipe ending quietly. Opened anew, a stdout
    # redirected to a file was truncated by the open and the metrics written before it were lost.
    stdout: bool = False
    # A path that is this process's own stderr (``/dev/stderr``, the log that ``2>log`` opened): written through
    # stderr's own open file, in order with the log lines. As a path it led to the log file itself, which the
    # run replaced: the -v lines before it were lost, and those after it went to the replaced file.
    stderr: bool = False

    @classmethod
    def check(cls, path: Path) -> RunTarget:
        def refuse(problem: str) -> InputError:
            return InputError(str(path), problem, "give --run a file path")

        if str(path) == "-":
            return cls(path, atomic=False, stdout=True)
        try:
            info = path.stat()  # follows symlinks
        except FileNotFoundError:
            if path.is_symlink():
                raise refuse("a symlink to a missing file") from None
            parent = path.parent
            if not parent.is_dir():
                raise refuse(f"directory {str(parent)!r} does not exist") from None
            if not os.access(parent, os.W_OK):
                raise refuse(f"directory {str(parent)!r} is not writable") from None
            return cls(path, atomic=True)
        except OSError as exc:
            raise refuse(f"cannot use it ({exc.strerror or exc})") from None
        if stat.S_ISDIR(info.st_mode):
            raise refuse("is a directory")
        if _is_stream(info, sys.stdout):
            return cls(path, atomic=False, stdout=True)
        if _is_stream(info, sys.stderr):
            return cls(path, atomic=False, stderr=True)
        if not stat.S_ISREG(info.st_mode):
            return cls(path, atomic=False)  # a FIFO or a device: write to it, never replace it
        real = Path(os.path.realpath(path))
        if real.parts[:2] == ("/", "proc") or not os.access(real.parent, os.W_OK):
            # /dev/stdout and friends lead into /proc: the file is someone's open descriptor; write through.
            if not os.access(path, os.W_OK):
                raise refuse("is not writable")
            return cls(path, atomic=False)
        return cls(real, atomic=True)


def _is_stream(info: os.stat_result, stream: Any) -> bool:
    """Whether ``info`` is the file that ``stream`` (``sys.stdout``, ``sys.stderr``) writes to."""
    try:
        return os.path.samestat(info, os.fstat(stream.fileno()))
    except (OSError, ValueError, AttributeError):  # no such stream, or one without a descriptor (a test's capture)
        return False


def write_trec_run(run: Run, target: RunTarget, tag: str = "dsearch") -> None:
    """Write the run; a regular file atomically, so a crash leaves the old file or the new one."""
    if target.stdout:  # its errors are stdout's: a closed pipe ends quietly, a full disk is one line
        _write_run(run, sys.stdout, tag)
        sys.stdout.flush()
        return
    try:
        if target.stderr:  # through stderr's own open file (a duplicate of its descriptor): nothing is truncated
            sys.stderr.flush()  # the log lines so far come first
            # A writer that waits when a parent left stderr non-blocking: a plain file failed with EAGAIN once
            # the run filled the pipe.
            with patient_text(os.dup(sys.stderr.fileno()), closefd=True) as fh:
                _write_run(run, fh, tag)
            return
        if not target.atomic:
            with open(target.path, "w", encoding="utf-8") as fh:
                _write_run(run, fh, tag)
            return
        tmp = target.path.with_name(f".{target.path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                _write_run(run, fh, tag)
            os.replace(tmp, target.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # no litter, whatever went wrong
            raise
    except OSError as exc:
        raise InputError(str(target.path), f"cannot write the run ({exc.strerror or exc})") from None


def _write_run(run: Run, fh: Any, tag: str) -> None:
    for qid, docs in run.items():
        ranked: Iterable[tuple[str, float]] = sorted(docs.items(), key=lambda d: -d[1])
        for rank, (doc, score) in enumerate(ranked, 1):
            fh.write(trec_line(qid, doc, rank, score, tag))
