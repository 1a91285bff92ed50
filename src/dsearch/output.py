"""Renderers: write ranked hits (and index descriptions) to a stream in one of the documented formats.

Machine formats (jsonl, tsv, trec, ids) are a contract: see the README before changing a field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import IO, Any

from dsearch.search import Hit, Query

OUTPUT_FORMATS = ("table", "jsonl", "tsv", "trec", "ids")
TSV_COLUMNS = ("qid", "query", "rank", "score", "id", "title", "text")
RUN_TAG = "dsearch"
SNIPPET_CHARS = 160

Results = Iterable[tuple[Query, list[Hit]]]


def hit_record(hit: Hit) -> dict[str, Any]:
    """The JSON Lines object for one hit."""
    return {
        "qid": hit.qid,
        "query": hit.query,
        "rank": hit.rank,
        "score": round(float(hit.score), 6),
        "id": hit.id,
        "title": hit.title,
        "text": hit.text,
        "source": hit.source,
        "fields": hit.fields,
        "window": list(hit.window) if hit.window else None,
    }


def _one_line(value: object) -> str:
    """TSV cells may hold neither tabs nor newlines."""
    return "" if value is None else " ".join(str(value).split())


def render(results: Results, fmt: str, stream: IO[str], color: bool = False) -> int:
    """Write every query's hits in ``fmt``; returns the number of hits written."""
    if fmt == "table":
        return _render_table(results, stream, color)
    written = 0
    if fmt == "tsv":
        stream.write("\t".join(TSV_COLUMNS) + "\n")
    for _query, hits in results:
        for hit in hits:
            if fmt == "jsonl":
                stream.write(json.dumps(hit_record(hit), ensure_ascii=False) + "\n")
            elif fmt == "tsv":
                cells = (hit.qid, hit.query, hit.rank, f"{hit.score:.6f}", hit.id, hit.title, hit.text)
                stream.write("\t".join(_one_line(c) for c in cells) + "\n")
            elif fmt == "trec":
                stream.write(f"{_trec_token(hit.qid)} Q0 {_trec_token(hit.id)} {hit.rank} {hit.score:.6f} {RUN_TAG}\n")
            elif fmt == "ids":
                stream.write(f"{hit.id}\n")
            else:
                raise ValueError(f"unknown output format {fmt!r}")
            written += 1
        stream.flush()  # a reader at the other end of a pipe sees each query as it is answered
    return written


def _trec_token(value: str) -> str:
    # TREC run files are whitespace-separated: an id with spaces would shift every column after it.
    return "_".join(value.split()) if any(c.isspace() for c in value) else value


def _render_table(results: Results, stream: IO[str], color: bool) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=stream, no_color=not color, highlight=False, soft_wrap=False)
    written = 0
    for query, hits in results:
        table = Table(title=f"[{query.qid}] {query.text}", title_justify="left", expand=False)
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        table.add_column("id", overflow="fold")
        table.add_column("title", overflow="fold", max_width=30)
        table.add_column("text", overflow="fold")
        for hit in hits:
            matched = hit.text[hit.window[0] : hit.window[1]] if hit.window else hit.text
            snippet = " ".join(matched.split())
            if len(snippet) > SNIPPET_CHARS:
                snippet = snippet[: SNIPPET_CHARS - 1] + "…"
            table.add_row(str(hit.rank), f"{hit.score:.4f}", hit.id, hit.title or "", snippet)
            written += 1
        if not hits:
            table.caption = "no hits"
        console.print(table)
    return written


def render_mapping(title: str, data: dict[str, Any], stream: IO[str], color: bool = False) -> None:
    """A two-column key/value table for a terminal (index info, status, summaries)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in data.items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    Console(file=stream, no_color=not color, highlight=False).print(table)


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
