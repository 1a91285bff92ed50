"""Renderers: write ranked hits (and index descriptions) to a stream in one of the documented formats.

Machine formats (jsonl, tsv, trec, ids) are a contract: see the README before changing a field.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
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
    }


# One reversible scheme for every line-oriented format (tsv, trec, ids): a backslash escapes itself, tab,
# newline and carriage return become \t \n \r, other control and line-separator characters \xHH or
# \uHHHH; in trec, whose columns are separated by whitespace, a space becomes \s and other whitespace \xHH
# or \uHHHH. Distinct values stay distinct (``a b`` is ``a\sb``, ``a_b`` stays ``a_b``).
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_NEEDS_ESCAPE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NEEDS_ESCAPE_OR_SPACE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029\s]")


def escape_field(value: object, space: bool = False) -> str:
    """``value`` as one reversible token: see the scheme above (``space=True`` for trec)."""
    text = "" if value is None else str(value)
    if not (_NEEDS_ESCAPE_OR_SPACE if space else _NEEDS_ESCAPE).search(text):
        return text
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif space and char == " ":
            out.append("\\s")
        elif (space and char.isspace()) or unicodedata.category(char) in {"Cc", "Zl", "Zp"}:
            out.append(f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


def unescape_field(token: str) -> str:
    """The inverse of ``escape_field`` (for tests and for readers of dsearch's output)."""
    simple = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r", "s": " "}
    return re.sub(
        r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)",
        lambda m: simple.get(m.group(1)) or chr(int(m.group(1)[1:], 16)),
        token,
    )


def json_safe(value: Any) -> Any:
    """JSON has no NaN or Infinity: such numbers (from a record's own fields, say) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(json_safe(record), ensure_ascii=False, allow_nan=False)


def trec_line(qid: str, docid: str, rank: int, score: float, tag: str = RUN_TAG) -> str:
    """One line of a TREC run: ``qid Q0 docid rank score tag``."""
    return f"{escape_field(qid, space=True)} Q0 {escape_field(docid, space=True)} {rank} {score:.6f} {tag}\n"


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
                stream.write(json_line(hit_record(hit)) + "\n")
            elif fmt == "tsv":
                cells = (hit.qid, hit.query, hit.rank, f"{hit.score:.6f}", hit.id, hit.title, hit.text)
                stream.write("\t".join(escape_field(c) for c in cells) + "\n")
            elif fmt == "trec":
                stream.write(trec_line(hit.qid, hit.id, hit.rank, hit.score))
            elif fmt == "ids":
                stream.write(escape_field(hit.id) + "\n")
            else:
                raise ValueError(f"unknown output format {fmt!r}")
            written += 1
        stream.flush()  # a reader at the other end of a pipe sees each query as it is answered
    return written


def console(stream: IO[str], color: bool, width: int | None = None) -> Any:
    """A Rich console on ``stream`` that lets a closed pipe surface as BrokenPipeError.

    Rich's own handling exits with status 1 and says nothing; dsearch ends quietly with 0 instead.
    """
    from rich.console import Console

    class _PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError()

    return _PipeConsole(file=stream, no_color=not color, highlight=False, soft_wrap=False, width=width)


def _render_table(results: Results, stream: IO[str], color: bool) -> int:
    from rich.table import Table

    out = console(stream, color)
    written = 0
    for query, hits in results:
        table = Table(title=f"[{query.qid}] {query.text}", title_justify="left", expand=False)
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        table.add_column("id", overflow="fold")
        table.add_column("title", overflow="fold", max_width=30)
        table.add_column("text", overflow="fold")
        for hit in hits:
            snippet = " ".join(hit.text.split())
            if len(snippet) > SNIPPET_CHARS:
                snippet = snippet[: SNIPPET_CHARS - 1] + "…"
            table.add_row(str(hit.rank), f"{hit.score:.4f}", hit.id, hit.title or "", snippet)
            written += 1
        if not hits:
            table.caption = "no hits"
        out.print(table)
    return written


def render_mapping(title: str, data: dict[str, Any], stream: IO[str], color: bool = False) -> None:
    """A two-column key/value table for a terminal (index info, status, summaries)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in data.items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    console(stream, color).print(table)


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
