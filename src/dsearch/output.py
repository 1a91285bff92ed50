"""Renderers: write ranked hits (and index descriptions) to a stream in one of the documented formats.

Machine formats (jsonl, tsv, trec, ids) are a contract: see the README before changing a field.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

from dsearch.search import Hit, Query

OUTPUT_FORMATS = ("table", "jsonl", "tsv", "trec", "ids")
TSV_COLUMNS = ("qid", "query", "rank", "score", "id", "title", "text")
RUN_TAG = "dsearch"
SNIPPET_LINES = 2  # lines of passage text per hit in the table, by default
PASSAGE_TSV_COLUMNS = ("id", "title", "text", "source")

Results = Iterable[tuple[Query, list[Hit]]]


def hit_record(hit: Hit) -> dict[str, Any]:
    """The JSON Lines object for one hit (``Hit.to_dict``, which the Python API shares)."""
    return hit.to_dict()


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
    """A field of dsearch's ``tsv``, ``trec`` or ``ids`` output as it was before escaping (the inverse of
    ``escape_field``): ``unescape_field("a\\sb") == "a b"``."""
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


def render(
    results: Results,
    fmt: str,
    stream: IO[str],
    color: bool = False,
    table: TableOptions | None = None,
    retrievers: tuple[str, ...] = (),
) -> int:
    """Write every query's hits in ``fmt``; returns the number of hits written.

    ``retrievers`` (lexical and hybrid modes) adds a ``NAME_rank`` tsv column per retriever: the hit's rank in
    that retriever's list, empty when it did not find it.
    """
    if fmt == "table":
        return _render_table(results, stream, color, table or TableOptions())
    written = 0
    if fmt == "tsv":
        stream.write("\t".join((*TSV_COLUMNS, *(f"{name}_rank" for name in retrievers))) + "\n")
    for _query, hits in results:
        for hit in hits:
            if fmt == "jsonl":
                stream.write(json_line(hit_record(hit)) + "\n")
            elif fmt == "tsv":
                cells = (hit.qid, hit.query, hit.rank, f"{hit.score:.6f}", hit.id, hit.title, hit.text)
                ranks = hit.retrievers or {}
                cells += tuple(ranks.get(name) for name in retrievers)
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

    # markup and emoji off: passages are shown as they are ("[/]" was a MarkupError, "[b]id[/b]" printed "id",
    # "[link=URL]" a hyperlink, ":fire:" an emoji); dsearch styles its own parts with Text objects.
    # Whether the stream is a terminal is ours to say: Rich would take FORCE_COLOR (set by some CI systems and
    # dotfiles) as one, and send escape codes into `dsearch info DIR | grep …`.
    try:
        terminal = color or stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    out = _PipeConsole(
        file=stream, no_color=not color, highlight=False, soft_wrap=False, width=width, markup=False, emoji=False,
        force_terminal=terminal,
    )  # fmt: skip
    if out.width < 1:  # COLUMNS=0, or a terminal that reports no size (some containers): Rich would print nothing
        out.width = 80
    return out


@dataclass
class TableOptions:
    """How ``table`` output is laid out; every table fits ``width`` (default: the terminal's, else $COLUMNS or 80)."""

    width: int | None = None
    snippet_lines: int = SNIPPET_LINES  # lines of text per hit
    full: bool = False  # the whole passage instead of a snippet


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """Text for a terminal: control characters (ESC, NUL, BEL…) shown as ``\\xHH``, never sent raw, so a
    passage cannot recolour or clear the user's terminal. Tabs and newlines are left to the layout."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _cells(text: str) -> int:
    """Terminal columns a string takes (CJK and emoji take two)."""
    from rich.cells import cell_len

    return cell_len(text)


def wrap_words(text: str, width: int) -> list[str]:
    """Greedy word wrap by terminal columns; only a word wider than a whole line is cut."""
    from rich.cells import chop_cells

    lines: list[str] = []
    line: list[str] = []
    used = 0
    for word in text.split():
        size = _cells(word)
        if size > width:
            if line:
                lines.append(" ".join(line))
            *full, rest = chop_cells(word, max(width, 1))
            lines.extend(full)
            line, used = [rest], _cells(rest)
            continue
        if line and used + 1 + size > width:
            lines.append(" ".join(line))
            line, used = [], 0
        used = used + 1 + size if line else size
        line.append(word)
    if line:
        lines.append(" ".join(line))
    return lines


def ellipsize(text: str, width: int) -> str:
    """``text`` on one line of at most ``width`` columns, cut after a whole word with "…" when too long."""
    text = " ".join(text.split())
    if _cells(text) <= width:
        return text
    if width < 2:
        return "…"[:width]
    return _before_ellipsis(wrap_words(text, width - 1)[0])


def snippet_lines(text: str, width: int, lines: int, full: bool = False) -> list[str]:
    """The passage wrapped at word boundaries to ``width``: its first ``lines`` lines, "…" where it was cut."""
    wrapped = wrap_words(text, width)
    if full or len(wrapped) <= lines:
        return wrapped
    kept = wrapped[:lines]
    if _cells(kept[-1]) + 1 > width:
        kept[-1] = wrap_words(kept[-1], width - 1)[0]
    kept[-1] = _before_ellipsis(kept[-1])
    return kept


def _before_ellipsis(text: str) -> str:
    # "sides…" reads better than "sides,…"; a line of nothing but punctuation keeps it.
    return (text.rstrip(",;:") or text) + "…"


# Column gaps of the hit tables (box.SIMPLE_HEAD, no outer edge): a space, the box's inner edge, a space.
_GAP = 3


def _hits_table(
    title: str, rows: list[dict[str, str]], text_rows: list[str], width: int, options: TableOptions
) -> Any:
    """A hit table laid out for ``width``: short columns sized to their content (id and title capped and
    ellipsised on one line), the text column gets the rest and holds ``snippet_lines`` wrapped lines."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    names = [name for name in ("rank", "score", "id", "title") if name in rows[0]] if rows else []
    if "title" in names and not any(r["title"] for r in rows):
        names.remove("title")  # no passage has a title: give its room to the text
    # Ids are for copying: they get more room than titles, which are cut (at a word) first.
    caps = {"rank": 6, "score": 10, "id": max(14, width // 4), "title": max(12, width // 5)}
    widths = {n: min(caps[n], max([len(n)] + [_cells(visible(r[n])) for r in rows])) for n in names}
    text_width = width - sum(widths.values()) - _GAP * len(names)
    while text_width < 20 and any(widths[n] > len(n) for n in ("title", "id") if n in widths):
        shrink = "title" if "title" in widths and widths["title"] > len("title") else "id"
        widths[shrink] -= 1
        text_width += 1
    text_width = max(text_width, 8)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    for name in names:
        table.add_column(name, justify="right" if name in ("rank", "score") else "left", width=widths[name])
        table.columns[-1].no_wrap = True
    table.add_column("text", width=text_width, no_wrap=True)
    for row, text in zip(rows, text_rows, strict=True):
        cells = [ellipsize(visible(row[n]), widths[n]) for n in names]
        lines = snippet_lines(visible(text), text_width, options.snippet_lines, options.full)
        table.add_row(*cells, "\n".join(lines))
    heading = Text(ellipsize(visible(title), width), no_wrap=True, overflow="ellipsis", style="bold")
    return heading, table


def _matched(hit: Hit, full: bool) -> str:
    """What a table shows of a hit: the window that matched (of a split passage), or the whole text."""
    return hit.text[hit.window[0] : hit.window[1]] if hit.window and not full else hit.text


def _render_table(results: Results, stream: IO[str], color: bool, options: TableOptions) -> int:
    out = console(stream, color, options.width)
    written = 0
    for query, hits in results:
        rows = [
            {"rank": str(h.rank), "score": f"{h.score:.4f}", "id": h.id, "title": h.title or ""} for h in hits
        ]
        texts = [_matched(h, options.full) for h in hits]
        heading, table = _hits_table(f"[{query.qid}] {query.text}", rows, texts, out.width, options)
        out.print(heading)
        if hits:
            out.print(table)
        else:
            out.print("no hits")
        out.print()
        written += len(hits)
    return written


def render_passages(passages: list[Hit], fmt: str, stream: IO[str], color: bool = False, **table: Any) -> int:
    """Stored passages (``dsearch get``), in the formats that make sense without a query; the table shows
    whole passages unless ``full=False``."""
    if fmt == "table":
        if not passages:
            return 0  # no header over nothing: the error line says which ids were not found
        options = TableOptions(**{"full": True, **table})
        out = console(stream, color, options.width)
        rows = [{"id": p.id, "title": p.title or ""} for p in passages]
        _heading, body = _hits_table("", rows, [p.text for p in passages], out.width, options)
        out.print(body)
        return len(passages)
    if fmt == "tsv":
        stream.write("\t".join(PASSAGE_TSV_COLUMNS) + "\n")
    for p in passages:
        if fmt == "jsonl":
            record = {"id": p.id, "title": p.title, "text": p.text, "source": p.source, "fields": p.fields}
            stream.write(json_line(record) + "\n")
        elif fmt == "tsv":
            stream.write("\t".join(escape_field(c) for c in (p.id, p.title, p.text, p.source)) + "\n")
        elif fmt == "ids":
            stream.write(escape_field(p.id) + "\n")
        else:
            raise ValueError(f"unknown passage format {fmt!r}")
    return len(passages)


def render_mapping(
    title: str, data: dict[str, Any], stream: IO[str], color: bool = False, width: int | None = None
) -> None:
    """A two-column key/value table for a terminal (index info, eval): the title on a line of its own, so
    it never wraps to the narrow table's width; long values wrap at spaces in the value column."""
    from rich.table import Table
    from rich.text import Text

    out = console(stream, color, width)
    values = {
        visible(k): visible(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)) for k, v in data.items()
    }
    key_width = max((_cells(k) for k in values), default=0)
    value_width = max(out.width - key_width - 2, 8)
    table = Table(show_header=False, box=None, pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True, width=key_width)
    table.add_column(no_wrap=True)
    for key, value in values.items():
        table.add_row(key, "\n".join(snippet_lines(value, value_width, 0, full=True)) or "")
    out.print(Text(ellipsize(visible(title), out.width), style="bold", no_wrap=True))
    out.print(table)


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
