"""``--where``: an SQL condition over a passage's stored fields, id, title and source → a mask of allowed rows.

Design. Stored fields stay one JSON string column in ``passages.parquet`` (any record shape fits one schema, and
``--update`` compares it as it is); what a filter needs on top is each field's *type*, which the build infers
once from the values (``field_types``) and records in the manifest. A query evaluates the condition with DuckDB
over the rows' id, title, source and fields (text is left out: it is the bulk of the file), each field
extracted from the JSON and cast to its type, so ``year >= 2020`` compares numbers and ``day < DATE
'2021-01-01'`` dates. DuckDB, rather than a language of our own over pyarrow compute, because SQL's WHERE is
what users already write (LIKE, IN, BETWEEN, IS NULL, list functions) and its errors name the column. DuckDB runs
in memory with external access switched off once the rows are loaded, so a condition cannot read or write files.

The mask marks every row (window) of a passage alike: they share its fields. Dense, lexical and hybrid search
all apply it before their top-k.

The fast path. Importing DuckDB and scanning the Parquet file cost a cold query about 0.1 s, more than the search a
1% filter saves. So the common subset of WHERE — comparisons, AND/OR/NOT, IN, BETWEEN, LIKE, IS [NOT] NULL between
one column and literals, on id, title, source and the BOOLEAN, BIGINT, DOUBLE, DATE and VARCHAR fields, and
``list_contains`` on lists of those — is evaluated here with numpy, over only the columns it names: id, title and
source from ``passages.parquet``, the fields from ``fields.parquet``, which the build writes next to it with one
typed column per field (so no JSON is parsed at query time). Repeating strings (source, the fields) are read
dictionary-encoded and a condition is evaluated once per distinct value; ids and titles as plain strings. Results
follow SQL's three-valued logic (a NULL never matches, NOT NULL is NULL), and DuckDB's quirks where it has them
(``list_contains([], NULL)`` is false). Anything outside the subset — other functions, casts, timestamps, column
against column, a literal whose type DuckDB would convert, an index without ``fields.parquet`` — goes to DuckDB as
before, so both paths give the same rows (tests/test_filters_fast.py checks that on thousands of generated
conditions).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from dsearch.errors import IndexDirError, UsageError, option, spell

BUILTIN = ("id", "title", "source")
ROW_COLUMN = "__row"  # DuckDB's view: each passage's row number, beside its columns
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?$")
READ_BATCH = 5000
# Every type field_types can record. A manifest is input: a type outside this set would be pasted into SQL.
SCALAR_TYPES = ("BOOLEAN", "BIGINT", "DOUBLE", "DATE", "TIMESTAMP", "VARCHAR")
FIELD_TYPES = frozenset((*SCALAR_TYPES, "JSON", *(f"{kind}[]" for kind in SCALAR_TYPES)))
# Typed columns of the stored fields, one per field of a type the fast path reads (see the module's docstring).
FIELDS_FILE = "fields.parquet"
FAST_SCALARS = ("BOOLEAN", "BIGINT", "DOUBLE", "DATE", "VARCHAR")
FAST_TYPES = (*FAST_SCALARS, *(f"{kind}[]" for kind in FAST_SCALARS))  # lists: for list_contains


def _scalar_type(value: Any) -> str:
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, int):
        return "BIGINT"
    if isinstance(value, float):
        return "DOUBLE"
    if isinstance(value, str):
        if _DATE.match(value):
            return "DATE"
        if _TIMESTAMP.match(value):
            return "TIMESTAMP"
        return "VARCHAR"
    return "JSON"  # an object


def _merge(a: str | None, b: str) -> str:
    """The type that holds values of both types: int with float is DOUBLE, a date with text is text."""
    if a is None or a == b:
        return b
    pair = {a, b}
    if pair == {"BIGINT", "DOUBLE"}:
        return "DOUBLE"
    if pair <= {"DATE", "TIMESTAMP"}:
        return "TIMESTAMP"
    if pair <= {"DATE", "TIMESTAMP", "VARCHAR"}:
        return "VARCHAR"
    return "JSON"


def _value_type(value: Any) -> str:
    if isinstance(value, list):
        inner: str | None = None
        for item in value:
            if item is not None:
                inner = _merge(inner, _value_type(item))
        if inner == "JSON" or (inner or "").endswith("]"):
            return "JSON"  # lists of objects or of lists: compared as JSON
        return f"{inner or ''}[]"  # "[]": empty, or nulls only; it takes the type of the field's other lists
    return _scalar_type(value)


def field_types(passages: Path) -> dict[str, str]:
    """Each stored field's DuckDB type, inferred from every passage's value (nulls do not count).

    Numbers, booleans and strings keep JSON's types; ISO dates (``2024-05-01``) and timestamps read as DATE and
    TIMESTAMP; lists as lists of their items' type (an empty list fits any); a field whose values disagree is
    JSON.
    """
    import pyarrow.parquet as pq

    types: dict[str, str | None] = {}
    for batch in pq.ParquetFile(passages).iter_batches(batch_size=READ_BATCH, columns=["fields"]):
        for raw in batch.column(0).to_pylist():
            if not raw:
                continue
            for name, value in json.loads(raw).items():
                if value is None:
                    types.setdefault(name, None)
                    continue
                kind = _value_type(value)
                old = types.get(name)
                if kind == "[]" and old is not None and old.endswith("]"):
                    continue  # an empty list fits a list of any type
                if old == "[]" and kind.endswith("]"):
                    types[name] = kind
                elif old is not None and old != kind and (old.endswith("]") or kind.endswith("]")):
                    types[name] = "JSON"
                else:
                    types[name] = _merge(old, kind)
    return {name: "VARCHAR[]" if kind == "[]" else kind or "VARCHAR" for name, kind in sorted(types.items())}


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _column(name: str, kind: str) -> str:
    # A JSON Pointer (RFC 6901: ~ and / escaped, nothing else), not $."name": DuckDB reads no \u escapes in a $
    # path, which json.dumps writes for control characters ("nul\x00x", "a\tb": such a field was always NULL on
    # this path while the fast path read it), and $."" is a path error.
    path = _quote_string("/" + name.replace("~", "~0").replace("/", "~1"))
    if kind == "JSON":  # an explicit null is SQL's NULL, as in the fields of one type (not the JSON value null)
        return f"NULLIF(json_extract(fields, {path}), 'null'::JSON)"
    if kind == "VARCHAR":
        return f"json_extract_string(fields, {path})"
    if kind.endswith("[]"):
        return f"TRY_CAST(json_extract(fields, {path}) AS {kind})"
    return f"TRY_CAST(json_extract_string(fields, {path}) AS {kind})"


# --- which column a name in a condition means --------------------------------------------------------------------
#
# SQL (and DuckDB) folds the case of a name, even quoted, so fields that differ only in case ("Year", "year"), or
# from id/title/source ("ID"), could not all be reached: DuckDB bound the first, and the second as "year_1". The
# rule here, on both paths: a quoted name spelled exactly as a column names that column; otherwise a name means
# the passage's own id, title or source when it is one of them in any case (as it always has), else the one field
# it matches in any case of its ASCII letters; several such fields are an error that says to quote the one meant.
# A field named exactly id, title or source stays in the output's fields, but the passage's own answers to its name.

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def filter_columns(types: dict[str, str]) -> list[str]:
    """The names a condition can use: id, title and source first, then the fields."""
    return [*BUILTIN, *(name for name in types if name not in BUILTIN)]


def bind(name: str, quoted: bool, columns: list[str]) -> str | None:
    """The column ``name`` means among ``columns`` (``filter_columns``), None when none; ambiguous is an error."""
    if quoted and name in columns:
        return name
    folded = name.translate(_ASCII_LOWER)
    matches = [column for column in columns if column.translate(_ASCII_LOWER) == folded]
    if not matches or matches[0] in BUILTIN:
        return matches[0] if matches else None
    if len(matches) > 1:
        choices = " or ".join(repr(m) for m in matches)
        raise UsageError(
            f"{spell('--where', 'where')}: {name!r} could be the field {choices} (names that differ only in case); "
            f"quote the one you mean, spelled exactly, such as {_quote_identifier(matches[0])}"
        )
    return matches[0]


def _clashing(columns: list[str]) -> set[str]:
    """The fields whose names equal another column's but for the case of ASCII letters."""
    folded: dict[str, list[str]] = {}
    for column in columns:
        folded.setdefault(column.translate(_ASCII_LOWER), []).append(column)
    return {name for group in folded.values() if len(group) > 1 for name in group if name not in BUILTIN}


def _private_names(fields: set[str], taken: set[str]) -> dict[str, str]:
    """A name for each of ``fields`` in DuckDB's view that no column has in any case: ``__field_N``."""
    folded = {name.translate(_ASCII_LOWER) for name in taken}
    names = {}
    for number, name in enumerate(sorted(fields)):
        alias = f"__field_{number}"
        while alias in folded:
            alias += "_"
        names[name] = alias
    return names


def allowed_rows(index: Any, where: str) -> Any:
    """A boolean mask over the index's rows: True where the passage satisfies ``where``."""
    if not where.strip():  # DuckDB's own answer would be "Unimplemented type for cast (TUPLE -> BOOLEAN)"
        where_ = option("where")
        raise UsageError(f"{where_} is empty; give a condition such as \"year >= 2020\", or leave {where_} out")
    try:
        where.encode("utf-8")
    except UnicodeEncodeError:  # bytes from the shell that are not UTF-8, or a lone surrogate from a program
        raise UsageError(f"{_where(where)}: not valid UTF-8; write the condition in UTF-8") from None
    if "field_types" not in index.manifest.corpus:
        update = spell("run 'dsearch index … --update'", "update it with build_index(…, update=True)")
        raise UsageError(
            f"{index.directory}: this index was built before dsearch recorded field types, which {option('where')} "
            f"needs; {update} (or rebuild it) first"
        )
    types: dict[str, str] = index.manifest.corpus["field_types"]
    if any(kind not in FIELD_TYPES for kind in types.values()):  # read_manifest refuses these; never trust SQL to it
        raise UsageError(f"{index.directory}: the manifest's field types are damaged; rebuild the index")
    mask = fast_allowed_rows(index, where, types)
    return mask if mask is not None else duckdb_allowed_rows(index, where, types)


def duckdb_allowed_rows(index: Any, where: str, types: dict[str, str]) -> Any:
    """``allowed_rows`` through DuckDB: any condition DuckDB accepts, over the fields as the manifest types them."""
    with DuckDBFilter(index, types) as evaluate:
        return evaluate(where)


class DuckDBFilter:
    """A DuckDB connection over the index's id, title, source and typed fields, answering conditions as masks
    (a context manager; one connection can answer many, as the differential tests do)."""

    def __init__(self, index: Any, types: dict[str, str]) -> None:
        import duckdb

        self.rows = index.rows
        self.fields = filter_columns(types)
        self._shape: tuple[str, str] | None = None  # a plain filter's parse tree around its condition
        # Fields that differ from another column only in case get private names in the view (DuckDB would bind
        # one name to both), and a condition's names are bound by `bind` and rewritten to them (_rename).
        # The view's own __row column is taken too: a field named so (in any case) gets a private name as well.
        clashing = _clashing([*self.fields, ROW_COLUMN]) & set(types)
        clashing |= {""} & set(types)  # JSON allows the key "", DuckDB no zero-length identifier
        self.private = _private_names(clashing, {*self.fields, ROW_COLUMN})
        # DuckDB reads the Parquet files itself (handing it an Arrow table makes it import pandas: 0.6 s), only
        # the small columns; file_row_number + the segment's first row is the row.
        scans = [
            f"SELECT file_row_number + {seg.first_row} AS __row, id, title, source, fields "
            f"FROM read_parquet({_quote_string(str(index.directory / seg.segment.path / 'passages.parquet'))}, "
            "file_row_number = true)"
            for seg in index.segments
        ]
        self.con = duckdb.connect(":memory:")
        try:
            self.con.execute(f"CREATE TEMP TABLE stored AS {' UNION ALL '.join(scans)}")
            columns = ["__row", *BUILTIN] + [
                f"{_column(name, kind)} AS {_quote_identifier(self.private.get(name, name))}"
                for name, kind in types.items()
                if name not in BUILTIN
            ]
            self.con.execute(f"CREATE TEMP VIEW passages AS SELECT {', '.join(columns)} FROM stored")
            # From here on conditions run: they may not read or write files, nor switch this back on.
            self.con.execute("SET enable_external_access = false")
            self.con.execute("SET lock_configuration = true")
        except duckdb.Error as exc:  # a file gone (a newer publish removed it) or damaged: the index's error
            self.con.close()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise IndexDirError(
                f"{index.directory}: cannot read the passages' stored fields ({first}); check it with "
                f"'dsearch status {index.directory}' and rebuild the index"
            ) from None
        except BaseException:
            self.con.close()
            raise

    def _one_condition(self, sql: str) -> bool:
        """Whether ``sql`` is the view's SELECT with one condition and nothing more, by DuckDB's parse tree.

        A condition can close the WHERE's parenthesis and go on (``true) UNION ALL SELECT 7 …``, ``LIMIT``,
        ``GROUP BY``), which adds rows or drops matches, or hold a subquery (``id IN (SELECT …)``, ``(FROM
        range(…))``), which runs a query of its own over table functions and DuckDB's catalog. So the tree
        (json_serialize_sql's text) must be the plain filter's around its condition, and the condition hold no
        query. The text is compared, not loaded: json.loads recurses, and a condition may nest deeply. Quotes
        inside names and strings are escaped there, so no name or string can pass for the tree's own keys. A
        condition that does not parse passes here: running it gives DuckDB's own error."""
        if self._shape is None:
            plain = self._serialize("SELECT __row FROM passages WHERE (true)")
            head, _, rest = plain.partition('"where_clause":')
            self._shape = (head + '"where_clause":', rest[rest.index(',"group_expressions":') :])
        text = self._serialize(sql)
        if text.startswith('{"error":true'):
            return True
        head, tail = self._shape
        if not (text.startswith(head) and text.endswith(tail)) or len(text) < len(head) + len(tail):
            return False
        condition = text[len(head) : len(text) - len(tail)]
        return not any(marker in condition for marker in _QUERY_MARKERS)

    def _serialize(self, sql: str) -> str:
        (text,) = self.con.execute(f"SELECT json_serialize_sql({_quote_string(sql)})").fetchone()
        return text

    def __enter__(self) -> DuckDBFilter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.con.close()

    def __call__(self, where: str) -> Any:
        import duckdb
        import numpy as np

        condition = _rename(where, self.fields, self.private) if self.private else where
        sql = f"SELECT __row FROM passages WHERE ({condition}\n)"
        try:
            if len(duckdb.extract_statements(sql)) != 1 or not self._one_condition(sql):
                raise UsageError(
                    f"{_where(where)}: give one condition on the passages' fields (no SQL statements, clauses or "
                    "subqueries)"
                )
            rows = self.con.execute(sql).fetchnumpy()["__row"]
        except duckdb.Error as exc:
            raise _usage_error(where, exc, self.fields, self.private) from None
        mask = np.zeros(self.rows, dtype=bool)
        mask[np.asarray(rows, dtype=np.int64)] = True
        return mask


# In json_serialize_sql's text of a condition, what only a query inside it writes.
_QUERY_MARKERS = (
    '"class":"SUBQUERY"', '"subquery":', '"type":"SELECT_NODE"', '"type":"SET_OPERATION_NODE"', '"from_table":'
)  # fmt: skip


def _quote_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _usage_error(where: str, exc: Exception, fields: list[str], private: dict[str, str] | None = None) -> UsageError:
    """One line that names the field (or what DuckDB could not parse) and what can be used."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if private:  # the user's names, not the view's
        names = {alias: name for name, alias in private.items()}
        message = re.sub(r"__field_\d+_*", lambda m: names.get(m.group(), m.group()), message)
    unknown = re.search(r'Referenced column "?(.+?)"? not found', message)
    if unknown:
        info = spell("'dsearch info DIR'", "Searcher.info()['fields']")
        return UsageError(
            f"{spell('--where', 'where')}: unknown field {unknown.group(1)!r}; the passages have {', '.join(fields)} "
            f"(see {info} for the fields and their types)"
        )
    message = re.sub(r"^[A-Za-z ]*Error: ", "", message)
    if "max_expression_depth" in message:  # its advice, a SET, is not one a condition can take
        message = "nested too deeply (DuckDB takes 1000 levels of expressions); write it with fewer parentheses"
    return UsageError(f"{_where(where)}: {message}")


# A condition as DuckDB reads it, enough to find its names: strings (also E'…' and $$…$$) and comments whole.
_SQL_TOKEN = re.compile(
    r"""(?P<skip>\s+|--[^\n]*|/\*.*?\*/)|(?P<str>'(?:[^']|'')*'|[eE]'(?:[^'\\]|\\.|'')*'|\$(?P<tag>[A-Za-z_]*)\$.*?\$(?P=tag)\$)"""
    r"""|(?P<qid>"(?:[^"]|"")*")|(?P<id>[^\W\d][\w$]*)|(?P<op>::|.)""",
    re.DOTALL,
)


def _rename(where: str, columns: list[str], private: dict[str, str]) -> str:
    """``where`` with each name that ``bind`` takes for a field in ``private`` written as its private name.

    Names that are not columns are left alone: a function (``year(day)``), a type (``x::DATE``, ``DATE '…'``,
    ``AS DATE``), a struct key or lambda member (``s.year``), a keyword."""
    tokens = [(str(m.lastgroup), m.group()) for m in _SQL_TOKEN.finditer(where)]
    code = [i for i, (kind, _) in enumerate(tokens) if kind != "skip"]  # what DuckDB parses
    out = [text for _, text in tokens]
    for position, i in enumerate(code):
        kind, text = tokens[i]
        if kind not in ("id", "qid"):
            continue
        previous = tokens[code[position - 1]] if position else ("start", "")
        before = previous[1]
        after = tokens[code[position + 1]] if position + 1 < len(code) else ("end", "")
        if before in (".", "::") or before.lower() == "as" or after[1] == "(" or after[1] == ".":
            continue
        # A date part: extract(year FROM day), or an interval's unit after its amount (INTERVAL 1 YEAR,
        # INTERVAL '1' year, INTERVAL (n) YEAR): no column stands right after a literal or a ")".
        opening = tokens[code[position - 2]][1] if position > 1 else ""
        if kind == "id" and (
            (before == "(" and opening.lower() == "extract") or previous[0] == "str" or before[-1:].isdigit()
            or before == ")"
        ):  # fmt: skip
            continue
        if kind == "id" and (text.lower() in _KEYWORDS or text.lower() in _RESERVED or after[0] == "str"):
            continue
        name = text[1:-1].replace('""', '"') if kind == "qid" else text
        column = bind(name, kind == "qid", columns)
        if column in private:
            out[i] = _quote_identifier(private[column])
    return "".join(out)


def _where(where: str) -> str:
    """How a message names the condition: ``--where 'year >'`` (as the shell took it) or ``where='year >'``."""
    return spell(f"--where {where!r}", f"where={where!r}")


# --- fields.parquet: the stored fields as typed columns, written at build time ---------------------------------


def _typed_value(kind: str, value: Any) -> Any:
    """``value`` as DuckDB's ``TRY_CAST(json_extract_string(...) AS kind)`` reads it; ValueError where this
    cannot be sure of giving the same (the field then has no column and its conditions go to DuckDB)."""
    if value is None:
        return None
    if kind.endswith("[]") and isinstance(value, list):  # TRY_CAST(json_extract(...) AS kind), item by item
        return [_typed_value(kind[:-2], item) for item in value]
    if kind == "BOOLEAN" and isinstance(value, bool):
        return value
    if kind == "BIGINT" and isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return value
    if kind == "DOUBLE" and isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)  # OverflowError (an int past float's range) is an ArithmeticError, caught below
        if math.isfinite(number):
            return number
    if kind == "DATE" and isinstance(value, str) and _DATE.match(value):
        return dt.date.fromisoformat(value)  # ValueError for a day that does not exist (DuckDB: NULL)
    if kind == "VARCHAR" and isinstance(value, str) and "\x00" not in value:
        return value
    raise ValueError(value)


def write_field_columns(segment_dir: Path, passages_file: str, types: dict[str, str]) -> str:
    """Write ``fields.parquet``: one typed column per stored field the fast ``--where`` path can read, row-aligned
    with ``passages_file``; returns its name. Streams a batch at a time. A field with a value that would not
    read back exactly as DuckDB reads it is left out (its conditions then go to DuckDB)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = {"BOOLEAN": pa.bool_(), "BIGINT": pa.int64(), "DOUBLE": pa.float64(), "DATE": pa.date32(),
             "VARCHAR": pa.string()}  # fmt: skip
    arrow.update({f"{kind}[]": pa.list_(arrow[kind]) for kind in FAST_SCALARS})
    wanted = {name: kind for name, kind in types.items() if kind in FAST_TYPES and name not in BUILTIN}
    while True:
        broken: set[str] = set()
        schema = pa.schema([(name, arrow[kind]) for name, kind in wanted.items()])
        target = segment_dir / FIELDS_FILE
        with pq.ParquetWriter(target, schema, compression="zstd") as writer:
            source = pq.ParquetFile(segment_dir / passages_file)
            for batch in source.iter_batches(batch_size=READ_BATCH, columns=["fields"]):
                columns: dict[str, list[Any]] = {name: [] for name in wanted}
                for raw in batch.column(0).to_pylist():
                    record = json.loads(raw) if raw else {}
                    for name, values in columns.items():
                        try:
                            values.append(_typed_value(wanted[name], record.get(name)))
                        except (ValueError, ArithmeticError):
                            broken.add(name)
                            values.append(None)
                if wanted:
                    writer.write_table(pa.table(columns, schema=schema))
        if not broken:
            return FIELDS_FILE
        wanted = {name: kind for name, kind in wanted.items() if name not in broken}


def has_field_columns(index: Any) -> bool:
    """True when every segment of an open index has ``fields.parquet`` (indexes from before it have not)."""
    return all(FIELDS_FILE in seg.segment.files for seg in index.segments)


# --- the fast path: the common subset of WHERE, evaluated with numpy ---------------------------------------------


class _Unsupported(Exception):
    """The condition is outside the fast path's subset: DuckDB evaluates it."""


_TOKEN = re.compile(
    r"""\s+|(?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)(?![\w.])|(?P<str>'(?:[^']|'')*')|(?P<qid>"(?:[^"]|"")+")"""
    r"""|(?P<id>[A-Za-z_][A-Za-z0-9_]*)(?![\w$])|(?P<op><=|>=|<>|!=|==|=|<|>|\(|\)|,|-(?!-))"""
)
_KEYWORDS = frozenset({"and", "or", "not", "in", "is", "null", "between", "like", "true", "false"})
# Words that DuckDB reads as something other than a column where one could stand: never taken for a field here.
# Its reserved and type_function keywords (duckdb_keywords(), DuckDB 2.0) are among them: `order = 1` is a
# syntax error there, so the fast path must not answer it either (the field is written "order" = 1).
_RESERVED = frozenset(
    {"all", "any", "array", "case", "cast", "collate", "current_date", "current_time", "current_timestamp",
     "current_user", "default", "distinct", "else", "end", "escape", "exists", "from", "glob", "ilike", "interval",
     "localtime", "localtimestamp", "map", "row", "select", "session_user", "similar", "some", "struct",
     "then", "timestamp", "try_cast", "user", "when", "where",
     "analyse", "analyze", "anti", "as", "asc", "asof", "asymmetric", "at", "authorization", "binary", "both",
     "by", "check", "collation", "column", "columns", "concurrently", "constraint", "create", "cross",
     "deferrable", "desc", "describe", "do", "except", "fetch", "for", "foreign", "freeze", "full", "generated",
     "group", "having", "initially", "inner", "intersect", "into", "isnull", "join", "lambda", "lateral",
     "leading", "left", "limit", "natural", "notnull", "offset", "on", "only", "order", "outer", "overlaps",
     "pivot", "pivot_longer", "pivot_wider", "placing", "positional", "primary", "qualify", "references",
     "returning", "right", "semi", "show", "summarize", "symmetric", "table", "tablesample", "to", "trailing",
     "tuple", "union", "unique", "unpack", "unpivot", "using", "variadic", "verbose", "window", "with"}
)  # fmt: skip


def _tokens(where: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    at = 0
    while at < len(where):
        match = _TOKEN.match(where, at)
        if match is None or match.end() == at:
            raise _Unsupported(where[at:])
        if match.lastgroup:
            out.append((match.lastgroup, match.group(match.lastgroup)))
        at = match.end()
    return out


# A literal: ("int", int), ("dec", Decimal), ("float", float), ("str", str), ("date", days since 1970),
# ("bool", bool) or ("null", None).
Literal = tuple[str, Any]
_EPOCH = dt.date(1970, 1, 1)


def _date_literal(text: str) -> Literal:
    if not _DATE.match(text):
        raise _Unsupported(text)  # DuckDB reads looser forms ('2021-1-2'); leave those to it
    try:
        return ("date", (dt.date.fromisoformat(text) - _EPOCH).days)
    except ValueError:
        raise _Unsupported(text) from None


MAX_NESTING = 50  # parentheses the fast path follows; each level costs a few Python frames


class _Parser:
    """A recursive-descent parser of the subset into a small tree of tuples; _Unsupported for anything else.

    Precedence as in SQL: OR < AND < NOT < a predicate (comparison, IN, BETWEEN, LIKE, IS NULL)."""

    def __init__(self, where: str) -> None:
        self.tokens = _tokens(where)
        self.at = 0
        self.depth = 0  # parentheses open

    def parse(self) -> tuple:
        if not self.tokens:
            raise _Unsupported("empty")
        tree = self._or()
        if self.at != len(self.tokens):
            raise _Unsupported(self.tokens[self.at][1])
        return tree

    def _peek(self, offset: int = 0) -> tuple[str, str]:
        at = self.at + offset
        return self.tokens[at] if at < len(self.tokens) else ("end", "")

    def _word(self, *words: str) -> bool:
        kind, text = self._peek()
        if kind == "id" and text.lower() in words:
            self.at += 1
            return True
        return False

    def _op(self, *ops: str) -> str | None:
        kind, text = self._peek()
        if kind == "op" and text in ops:
            self.at += 1
            return text
        return None

    def _expect_op(self, op: str) -> None:
        if self._op(op) is None:
            raise _Unsupported(self._peek()[1])

    # A chain of ORs (ANDs) is one node of many parts, and NOTs are counted, not nested: a program's filter of
    # thousands of "id = '…' OR …" must not recurse once per term (RecursionError) in _resolve and eval.
    def _or(self) -> tuple:
        parts = [self._and()]
        while self._word("or"):
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else ("or_all", parts)

    def _and(self) -> tuple:
        parts = [self._not()]
        while self._word("and"):
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else ("and_all", parts)

    def _not(self) -> tuple:
        negations = 0
        while self._word("not"):
            negations += 1
        tree = self._predicate()
        return ("not", tree) if negations % 2 else tree  # NOT NOT x is x, NULL included

    def _predicate(self) -> tuple:
        if self._op("("):
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise _Unsupported("nesting")  # DuckDB's path answers it (or says it is too deep)
            tree = self._or()
            self._expect_op(")")
            self.depth -= 1
            return tree
        if self._peek()[0] == "id" and self._peek()[1].lower() == "list_contains" and self._peek(1) == ("op", "("):
            self.at += 2
            column = self._operand()
            if column[0] != "col" or self._op(",") is None:
                raise _Unsupported("list_contains")
            item = self._literal()
            self._expect_op(")")
            return ("contains", column[1], item)
        left = self._operand()
        op = self._op("=", "==", "!=", "<>", "<", "<=", ">", ">=")
        if op:
            right = self._operand()
            op = {"==": "=", "<>": "!="}.get(op, op)
            if left[0] == "col" and right[0] == "lit":
                return ("cmp", op, left[1], right[1])
            if left[0] == "lit" and right[0] == "col":  # 2020 < year: year > 2020
                flipped = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
                return ("cmp", flipped, right[1], left[1])
            raise _Unsupported("a comparison of two columns or two literals")
        if left[0] != "col":
            raise _Unsupported("a literal alone")
        column = left[1]
        if self._word("is"):
            negated = self._word("not")
            if not self._word("null"):
                raise _Unsupported(self._peek()[1])  # IS TRUE, IS DISTINCT FROM, ...
            tree: tuple = ("isnull", column)
            return ("not", tree) if negated else tree
        negated = self._word("not")
        if self._word("in"):
            self._expect_op("(")
            items = [self._literal()]
            while self._op(","):
                items.append(self._literal())
            self._expect_op(")")
            tree = ("or_all", [("cmp", "=", column, item) for item in items])
        elif self._word("between"):
            low = self._literal()
            if not self._word("and"):
                raise _Unsupported(self._peek()[1])
            high = self._literal()
            tree = ("and", ("cmp", ">=", column, low), ("cmp", "<=", column, high))
        elif self._word("like"):
            tree = ("like", column, self._literal())
        elif negated:
            raise _Unsupported(self._peek()[1])
        else:
            return ("truth", column)  # a bare column: a boolean field is its own condition
        return ("not", tree) if negated else tree

    def _operand(self) -> tuple[str, Any]:
        kind, text = self._peek()
        if kind in ("qid", "id") and not (kind == "id" and text.lower() in ("date", "null", "true", "false")):
            if kind == "id" and (text.lower() in _KEYWORDS or text.lower() in _RESERVED):
                raise _Unsupported(text)
            self.at += 1
            if self._peek() == ("op", "("):
                raise _Unsupported(f"{text}(...)")  # a function call
            return ("col", _Ref(text[1:-1].replace('""', '"'), True) if kind == "qid" else _Ref(text, False))
        return ("lit", self._literal())

    def _literal(self) -> Literal:
        kind, text = self._peek()
        self.at += 1
        if kind == "op" and text == "-":
            kind, text = self._peek()
            self.at += 1
            if kind != "num":
                raise _Unsupported("-")
            text = "-" + text
        if kind == "num":
            if "e" in text.lower():
                return ("float", float(text))
            if "." in text:
                from decimal import Decimal  # imported only here: 5 ms of a cold query

                return ("dec", Decimal(text))
            return ("int", int(text))
        if kind == "str":
            return ("str", text[1:-1].replace("''", "'"))
        if kind == "id":
            word = text.lower()
            if word == "null":
                return ("null", None)
            if word in ("true", "false"):
                return ("bool", word == "true")
            if word == "date" and self._peek()[0] == "str":
                self.at += 1
                return _date_literal(self.tokens[self.at - 1][1][1:-1].replace("''", "'"))
        raise _Unsupported(text)


_INT64 = (-(2**63), 2**63 - 1)
# How fields.parquet stores each type (read_dictionary turns strings into dictionaries of them).
_ARROW_TYPES = {"BOOLEAN": "bool", "BIGINT": "int64", "DOUBLE": "double", "DATE": "date32[day]",
                "VARCHAR": "dictionary<values=string, indices=int32, ordered=0>"}  # fmt: skip
_ARROW_TYPES.update({f"{kind}[]": f"list<{_ARROW_TYPES[kind]}>" for kind in ("BOOLEAN", "BIGINT", "DOUBLE", "DATE")})
_ARROW_TYPES["VARCHAR[]"] = "list<string>"  # read as plain strings (read_dictionary names top-level columns)


def _arrow_type_name(kind: Any) -> str:
    """A column's Arrow type as _ARROW_TYPES names it (a list's element name, "item" or "element", left out)."""
    if str(kind).startswith("list<"):
        return f"list<{kind.value_type}>"
    return str(kind)


def _coerce(kind: str, literal: Literal) -> Literal:
    """The literal as the column's type would meet it in DuckDB, or _Unsupported where DuckDB converts in a way
    this does not repeat (a string against a number, a number against a date, ...)."""
    lit_kind, value = literal
    if lit_kind == "null":
        return literal
    if kind in ("BIGINT", "DOUBLE"):
        if lit_kind == "int" and _INT64[0] <= value <= _INT64[1]:
            return ("float", float(value)) if kind == "DOUBLE" else literal
        if lit_kind == "float":
            return literal  # DuckDB: a DOUBLE literal; a BIGINT column is cast to DOUBLE, as numpy does
        if lit_kind == "dec":
            digits = value.as_tuple().digits
            if kind == "DOUBLE" and len(digits) <= 15:  # exact in a double, so DuckDB's cast rounds like float()
                return ("float", float(value))
            if kind == "BIGINT" and len(digits) <= 18:  # DuckDB compares BIGINT and DECIMAL exactly
                return literal
    elif kind == "DATE":
        if lit_kind == "date":
            return literal
        if lit_kind == "str":
            return _date_literal(value)
    elif kind == "VARCHAR" and lit_kind == "str" or kind == "BOOLEAN" and lit_kind == "bool":
        return literal
    raise _Unsupported(f"{kind} against {lit_kind}")


class _Column:
    """One column of the rows being filtered: numbers (int64, float64, bool, days) with a validity mask, or
    strings as codes into their distinct values (-1: NULL)."""

    def __init__(self, values: Any, valid: Any, distinct: list[str] | None = None, offsets: Any = None) -> None:
        self.values, self.valid, self.distinct = values, valid, distinct
        self.offsets = offsets  # a list column: row i's elements are values[offsets[i]:offsets[i + 1]]


def _bits(buffer: Any, offset: int, length: int) -> Any:
    import numpy as np

    bits = np.unpackbits(np.frombuffer(buffer, np.uint8), bitorder="little")
    return bits[offset : offset + length].astype(bool)


def _valid(chunk: Any) -> Any:
    import numpy as np

    if chunk.null_count == 0:
        return np.ones(len(chunk), bool)
    return _bits(chunk.buffers()[0], chunk.offset, len(chunk))


def _read_column(chunked: Any, kind: str) -> _Column:
    """A column from Arrow buffers with numpy alone (pyarrow.compute costs a cold query 25 ms to import)."""
    import numpy as np

    chunks = [c for c in chunked.chunks if len(c)]
    if kind.endswith("[]"):  # offsets per chunk, shifted onto the elements of all chunks read one after another
        import pyarrow as pa

        offsets, elements, valid_parts, start = [np.zeros(1, np.int64)], [], [], 0
        for chunk in chunks:
            local = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
            first, last = int(local[0]), int(local[-1])
            elements.append(chunk.values.slice(first, last - first))
            offsets.append(local[1:].astype(np.int64) - first + start)
            valid_parts.append(_valid(chunk))
            start += last - first
        items = _read_column(pa.chunked_array(elements, chunked.type.value_type), kind[:-2])
        valid = np.concatenate(valid_parts) if valid_parts else np.zeros(0, bool)
        return _Column(items, valid, offsets=np.concatenate(offsets))
    if kind == "VARCHAR" and not _is_dictionary(chunked):  # plain strings: each row its own entry
        values = chunked.to_pylist()
        valid = np.fromiter((v is not None for v in values), bool, len(values))
        return _Column(np.where(valid, np.arange(len(values)), -1), valid, values)
    if kind == "VARCHAR":  # read dictionary-encoded: indices per chunk, into one list of distinct values
        codes_of: dict[str, int] = {}
        parts, valid_parts = [], []
        for chunk in chunks:
            lut = np.array([codes_of.setdefault(v, len(codes_of)) for v in chunk.dictionary.to_pylist()] or [0])
            ind = chunk.indices
            local = np.frombuffer(ind.buffers()[1], np.int32)[ind.offset : ind.offset + len(ind)]
            valid = _valid(ind)
            parts.append(np.where(valid, lut[np.where(valid, local, 0)], -1))
            valid_parts.append(valid)
        codes = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        valid = np.concatenate(valid_parts) if valid_parts else np.zeros(0, bool)
        return _Column(codes, valid, list(codes_of))
    dtype = {"BIGINT": np.int64, "DOUBLE": np.float64, "DATE": np.int32, "BOOLEAN": bool}[kind]
    values, valid_parts = [], []
    for chunk in chunks:
        if dtype is bool:
            values.append(_bits(chunk.buffers()[1], chunk.offset, len(chunk)))
        else:
            values.append(np.frombuffer(chunk.buffers()[1], dtype)[chunk.offset : chunk.offset + len(chunk)])
        valid_parts.append(_valid(chunk))
    return _Column(
        np.concatenate(values) if values else np.zeros(0, dtype),
        np.concatenate(valid_parts) if valid_parts else np.zeros(0, bool),
    )


def _is_dictionary(chunked: Any) -> bool:
    return str(chunked.type).startswith("dictionary<")


_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "=": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}  # fmt: skip


def _like(pattern: str) -> Callable[[str], bool]:
    """SQL LIKE as a regular expression: % any run of characters, _ one character, case-sensitive."""
    if "\\" in pattern:
        raise _Unsupported("a backslash in a LIKE pattern")  # escapes: DuckDB's rules, not repeated here
    body = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.compile(body, re.DOTALL).fullmatch  # type: ignore[return-value]


class _Evaluator:
    """Evaluates a parsed condition over one segment's columns as SQL's three-valued logic: each node gives
    (true, null) masks; false is neither."""

    def __init__(self, columns: dict[str, _Column], kinds: dict[str, str], rows: int) -> None:
        self.columns, self.kinds, self.rows = columns, kinds, rows

    def eval(self, tree: tuple) -> tuple[Any, Any]:
        import numpy as np

        op = tree[0]
        if op in ("and", "or", "or_all", "and_all"):
            parts = [self.eval(t) for t in (tree[1] if op in ("or_all", "and_all") else tree[1:])]
            true, null = parts[0]
            for t2, n2 in parts[1:]:
                false = ~true & ~null
                f2 = ~t2 & ~n2
                if op in ("and", "and_all"):
                    true, false = true & t2, false | f2
                else:
                    true, false = true | t2, false & f2
                null = ~true & ~false
            return true, null
        if op == "not":
            true, null = self.eval(tree[1])
            return ~true & ~null, null
        column = self.columns[tree[2] if op == "cmp" else tree[1]]
        if op == "contains":  # list_contains: NULL for a NULL list or item, else whether an element equals it
            literal = tree[2]
            if literal[0] == "null":  # DuckDB: false for an empty list, NULL for any other
                empty = column.valid & (column.offsets[1:] == column.offsets[:-1])
                return np.zeros(self.rows, bool), ~empty
            items = column.values  # the elements, all rows' one after another
            equal = (
                self._strings(items, lambda value: value == literal[1])[0]
                if items.distinct is not None
                else items.valid & (items.values == literal[1])
            )
            before = np.concatenate([[0], np.cumsum(equal)])  # equal elements before each position
            found = before[column.offsets[1:]] > before[column.offsets[:-1]]
            return column.valid & found, ~column.valid
        if op == "isnull":
            return ~column.valid, np.zeros(self.rows, bool)
        if op == "truth":
            return column.valid & column.values, ~column.valid
        if op == "like":
            literal = tree[2]
            if literal[0] == "null":
                return np.zeros(self.rows, bool), np.ones(self.rows, bool)
            match = _like(literal[1])
            return self._strings(column, lambda value: match(value) is not None)
        _, cmp, name, literal = tree
        if literal[0] == "null":  # anything compared with NULL is NULL
            return np.zeros(self.rows, bool), np.ones(self.rows, bool)
        compare = _COMPARE[cmp]
        if column.distinct is not None:
            return self._strings(column, lambda value: compare(value, literal[1]))
        if literal[0] == "dec":  # a BIGINT column against a decimal, exactly: 5 < 5.5 is 5 <= floor(5.5)
            value = literal[1]
            if value == value.to_integral_value():
                result = compare(column.values, int(value))
            elif cmp in ("=", "!="):
                result = np.full(self.rows, cmp == "!=")
            else:
                below = cmp in ("<", "<=")  # x < 5.5 is x <= 5; x > 5.5 is x >= 6
                bound = math.floor(value) if below else math.ceil(value)
                if not _INT64[0] <= bound <= _INT64[1]:
                    raise _Unsupported("a decimal beyond BIGINT")
                result = column.values <= bound if below else column.values >= bound
        else:
            result = compare(column.values, literal[1])
        return column.valid & result, ~column.valid

    def _strings(self, column: _Column, test: Callable[[str], bool]) -> tuple[Any, Any]:
        """A condition on a string column, decided once per distinct value (the last entry stands for NULL)."""
        import numpy as np

        lut = np.array([v is not None and bool(test(v)) for v in column.distinct] + [False], dtype=bool)
        return lut[column.values], ~column.valid


class _Ref(NamedTuple):
    """A name in a condition, and whether it was quoted (``bind`` decides the column it means)."""

    name: str
    quoted: bool


def _resolve(tree: tuple, kinds: dict[str, str], used: dict[str, str]) -> tuple:
    """Binds column names (``bind``: as DuckDB does, but a quoted name spelled exactly is that column) and coerces
    literals to each column's type."""
    op = tree[0]
    if op in ("and", "or"):
        return (op, _resolve(tree[1], kinds, used), _resolve(tree[2], kinds, used))
    if op in ("or_all", "and_all"):
        return (op, [_resolve(t, kinds, used) for t in tree[1]])
    if op == "not":
        return (op, _resolve(tree[1], kinds, used))
    position = 2 if op == "cmp" else 1
    # DuckDB folds the case of ASCII letters only: "été" does not name the field "ÉTÉ" there, nor here.
    ref: _Ref = tree[position]
    name = bind(ref.name, ref.quoted, list(kinds))  # several fields: the error DuckDB's path gives too
    if name is None:
        raise _Unsupported(ref.name)  # unknown: DuckDB says so, with the fields there are
    kind = kinds[name]
    used[name] = kind
    if op == "truth":
        if kind != "BOOLEAN":
            raise _Unsupported(f"{kind} as a condition")
        return (op, name)
    if op == "isnull":
        return (op, name)
    if op == "contains":
        if not kind.endswith("[]"):
            raise _Unsupported("list_contains on a non-list")
        return (op, name, _coerce(kind[:-2], tree[2]))
    if kind.endswith("[]"):
        raise _Unsupported("a list compared as a whole")
    if op == "like":
        if kind != "VARCHAR" or tree[2][0] not in ("str", "null"):
            raise _Unsupported("LIKE on a non-string")
        if tree[2][0] == "str":
            _like(tree[2][1])  # a pattern it cannot translate goes to DuckDB before any column is read
        return (op, name, tree[2])
    return (op, tree[1], name, _coerce(kind, tree[3]))


def fast_allowed_rows(index: Any, where: str, types: dict[str, str]) -> Any:
    """``allowed_rows`` without DuckDB for the common subset of WHERE (see the module's docstring); None when the
    condition, or the index, needs DuckDB."""
    import numpy as np

    kinds = {name: "VARCHAR" for name in BUILTIN}
    kinds.update({name: kind for name, kind in types.items() if name not in BUILTIN})
    used: dict[str, str] = {}
    try:
        tree = _resolve(_Parser(where).parse(), kinds, used)
        if any(kind not in FAST_TYPES for kind in used.values()):
            raise _Unsupported("a type the fast path does not read")
        fields = [name for name in used if name not in BUILTIN]
        builtin = [name for name in used if name in BUILTIN]
        masks = []
        for seg in index.segments:
            seg_dir = index.directory / seg.segment.path
            try:
                columns = _fast_columns(seg, seg_dir, fields, builtin, used)
            except (OSError, ValueError, IndexError, KeyError) as exc:
                # A damaged file of the right size (undetected until status compares checksums): a bad footer
                # (ArrowInvalid, a ValueError), a column name or dictionary index out of range. One line, not a crash.
                raise IndexDirError(
                    f"{seg_dir}: cannot read the stored fields ({exc}); check it with 'dsearch status "
                    f"{index.directory}' and rebuild the index"
                ) from exc
            if any(len(c.valid) != seg.segment.rows for c in columns.values()):
                raise _Unsupported("columns that do not match the segment")  # DuckDB's path reports the damage
            true, _ = _Evaluator(columns, used, seg.segment.rows).eval(tree)
            masks.append(np.asarray(true, dtype=bool))
    except _Unsupported:
        return None
    return np.concatenate(masks) if masks else np.zeros(index.rows, dtype=bool)


def _fast_columns(seg: Any, seg_dir: Path, fields: list[str], builtin: list[str], used: dict[str, str]) -> dict:
    """The columns a fast ``--where`` reads from one segment: fields from fields.parquet, the rest from passages."""
    import pyarrow.parquet as pq

    columns: dict[str, _Column] = {}
    if fields:
        if FIELDS_FILE not in seg.segment.files:
            raise _Unsupported("an index from before fields.parquet")
        strings = [name for name in fields if used[name] == "VARCHAR"]  # lists of strings stay plain
        table = pq.ParquetFile(seg_dir / FIELDS_FILE, read_dictionary=strings)
        stored = {field.name: _arrow_type_name(field.type) for field in table.schema_arrow}
        if any(stored.get(name) != _ARROW_TYPES[used[name]] for name in fields):
            raise _Unsupported("a field written without its column, or as another type than the manifest's")
        read = table.read(columns=fields, use_threads=False)  # one thread: 2.5 ms where a pool took 6
        columns.update({name: _read_column(read.column(name), used[name]) for name in fields})
    if builtin:
        # Ids and titles are (nearly) all distinct: read as plain strings, which costs 100k ids 0.03 s
        # where a dictionary of them took 0.14 s. Sources repeat, so they are read as a dictionary.
        dictionary = [name for name in builtin if name == "source"]
        passages = pq.ParquetFile(seg_dir / "passages.parquet", read_dictionary=dictionary)
        read = passages.read(columns=builtin, use_threads=False)
        columns.update({name: _read_column(read.column(name), "VARCHAR") for name in builtin})
    return columns
