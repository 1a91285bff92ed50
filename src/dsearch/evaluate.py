"""Score retrieval against relevance judgements with ir-measures (trec_eval's definitions, not ours)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsearch.encoder import Encoder
from dsearch.errors import InputError, UsageError
from dsearch.search import Query, run_search
from dsearch.store import OpenIndex

DEFAULT_METRICS = "nDCG@10,R@100,RR@10"
Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]


def read_qrels(path: str) -> Qrels:
    """BEIR ``qrels/*.tsv`` (``query-id<TAB>corpus-id<TAB>score``, header optional) or TREC ``qid 0 docid rel``."""
    qrels: Qrels = {}
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
        try:
            qrels.setdefault(qid, {})[docid] = int(float(rel))
        except ValueError:
            raise InputError(where, f"relevance {rel!r} is not a number") from None
    if not qrels:
        raise InputError(path, "no judgements in the qrels file")
    return qrels


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
    index: OpenIndex,
    encoder: Encoder,
    queries: list[Query],
    qrels: Qrels,
    k: int,
    metrics: list[tuple[str, Any]],
    keep_self: bool = False,
    run_path: Path | None = None,
) -> EvalReport:
    """Run the judged queries, optionally save the TREC run, and score it."""
    judged = [q for q in queries if q.qid in qrels]
    query_ids = {q.qid for q in queries}
    run: Run = {}
    for query, hits in run_search(index, encoder, judged, k, exclude_self=not keep_self):
        run[query.qid] = {hit.id: float(hit.score) for hit in hits}
    if run_path is not None:
        write_trec_run(run, run_path)
    index_ids = {row["id"] for row in index.iter_rows(("id",))}
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


def write_trec_run(run: Run, path: Path, tag: str = "dsearch") -> None:
    """Write the run atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for qid, docs in run.items():
            ranked: Iterable[tuple[str, float]] = sorted(docs.items(), key=lambda d: -d[1])
            for rank, (doc, score) in enumerate(ranked, 1):
                fh.write(f"{qid} Q0 {doc} {rank} {score:.6f} {tag}\n")
    os.replace(tmp, path)
