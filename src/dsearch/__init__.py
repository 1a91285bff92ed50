"""dsearch: dense retrieval (semantic search) from the command line, and the Python library under it.

    import dsearch
    with dsearch.Searcher("sample.idx") as searcher:
        for hit in searcher.search("how do plants make food", k=3)[0]:
            print(hit.rank, hit.id, hit.score)

What ``__all__`` lists is the public API, kept stable (README: Python API); every other module and name is
private. The names are imported on first use, so ``import dsearch`` stays cheap: no model, numpy or FAISS.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name → the module that defines it.
_EXPORTS = {
    "Searcher": "dsearch.api",
    "build_index": "dsearch.api",
    "index_version": "dsearch.api",
    "Hit": "dsearch.search",
    "Query": "dsearch.search",
    "Passage": "dsearch.corpus",
    "BuildSummary": "dsearch.indexer",
    "DsearchError": "dsearch.errors",
    "UsageError": "dsearch.errors",
    "InputError": "dsearch.errors",
    "IndexDirError": "dsearch.errors",
    "ModelError": "dsearch.errors",
    "LockedError": "dsearch.errors",
    "IncompleteError": "dsearch.errors",
    "TooManyRemovedError": "dsearch.errors",
    "unescape_field": "dsearch.output",
}

__all__ = [
    "__version__",
    "Searcher",
    "build_index",
    "index_version",
    "Hit",
    "Query",
    "Passage",
    "BuildSummary",
    "DsearchError",
    "UsageError",
    "InputError",
    "IndexDirError",
    "ModelError",
    "LockedError",
    "IncompleteError",
    "TooManyRemovedError",
    "unescape_field",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from dsearch.api import Searcher, build_index, index_version
    from dsearch.corpus import Passage
    from dsearch.errors import (
        DsearchError,
        IncompleteError,
        IndexDirError,
        InputError,
        LockedError,
        ModelError,
        TooManyRemovedError,
        UsageError,
    )
    from dsearch.indexer import BuildSummary
    from dsearch.output import unescape_field
    from dsearch.search import Hit, Query


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
