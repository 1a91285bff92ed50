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
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dsearch.errors import UsageError

BUILTIN = ("id", "title", "source")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?$")
READ_BATCH = 5000
# Every type field_types can record. A manifest is input: a type outside this set would be pasted into SQL.
SCALAR_TYPES = ("BOOLEAN", "BIGINT", "DOUBLE", "DATE", "TIMESTAMP", "VARCHAR")
FIELD_TYPES = frozenset((*SCALAR_TYPES, "JSON", *(f"{kind}[]" for kind in SCALAR_TYPES)))


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
        return f"{inner or 'VARCHAR'}[]"
    return _scalar_type(value)


def field_types(passages: Path) -> dict[str, str]:
    """Each stored field's DuckDB type, inferred from every passage's value (nulls do not count).

    Numbers, booleans and strings keep JSON's types; ISO dates (``2024-05-01``) and timestamps read as DATE and
    TIMESTAMP; lists as lists of their items' type; a field whose values disagree is JSON.
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
                if old is not None and old != kind and (old.endswith("]") or kind.endswith("]")):
                    types[name] = "JSON"
                else:
                    types[name] = _merge(old, kind)
    return {name: kind or "VARCHAR" for name, kind in sorted(types.items())}


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _column(name: str, kind: str) -> str:
    path = _quote_string("$." + json.dumps(name))
    if kind == "JSON":
        return f"json_extract(fields, {path})"
    if kind == "VARCHAR":
        return f"json_extract_string(fields, {path})"
    if kind.endswith("[]"):
        return f"TRY_CAST(json_extract(fields, {path}) AS {kind})"
    return f"TRY_CAST(json_extract_string(fields, {path}) AS {kind})"


def allowed_rows(index: Any, where: str) -> Any:
    """A boolean mask over the index's rows: True where the passage satisfies ``where``."""
    import duckdb
    import numpy as np

    if "field_types" not in index.manifest.corpus:
        raise UsageError(
            f"{index.directory}: this index was built before dsearch recorded field types, which --where needs; "
            "run 'dsearch index … --update' (or rebuild it) first"
        )
    types: dict[str, str] = index.manifest.corpus["field_types"]
    if any(kind not in FIELD_TYPES for kind in types.values()):  # read_manifest refuses these; never trust SQL to it
        raise UsageError(f"{index.directory}: the manifest's field types are damaged; rebuild the index")
    # DuckDB reads the Parquet files itself (handing it an Arrow table makes it import pandas: 0.6 s), only the
    # small columns; file_row_number + the segment's first row is the row.
    scans = [
        f"SELECT file_row_number + {seg.first_row} AS __row, id, title, source, fields "
        f"FROM read_parquet({_quote_string(str(index.directory / seg.segment.path / 'passages.parquet'))}, "
        "file_row_number = true)"
        for seg in index.segments
    ]
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"CREATE TEMP TABLE stored AS {' UNION ALL '.join(scans)}")
        columns = ["__row", *BUILTIN] + [
            f"{_column(name, kind)} AS {_quote_identifier(name)}" for name, kind in types.items() if name not in BUILTIN
        ]
        con.execute(f"CREATE TEMP VIEW passages AS SELECT {', '.join(columns)} FROM stored")
        # From here on the condition runs: it may not read or write files, nor switch this back on.
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        sql = f"SELECT __row FROM passages WHERE ({where}\n)"
        try:
            if len(duckdb.extract_statements(sql)) != 1:
                raise UsageError(f"--where {where!r}: give one condition, not SQL statements")
            rows = con.execute(sql).fetchnumpy()["__row"]
        except duckdb.Error as exc:
            raise _usage_error(where, exc, ["id", "title", "source", *types]) from None
    finally:
        con.close()
    mask = np.zeros(index.rows, dtype=bool)
    mask[np.asarray(rows, dtype=np.int64)] = True
    return mask


def _quote_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _usage_error(where: str, exc: Exception, fields: list[str]) -> UsageError:
    """One line that names the field (or what DuckDB could not parse) and what can be used."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    unknown = re.search(r'Referenced column "?(.+?)"? not found', message)
    if unknown:
        return UsageError(
            f"--where: unknown field {unknown.group(1)!r}; the passages have {', '.join(fields)} "
            "(see 'dsearch info DIR' for the fields and their types)"
        )
    message = re.sub(r"^[A-Za-z ]*Error: ", "", message)
    return UsageError(f"--where {where!r}: {message}")
