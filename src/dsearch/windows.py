"""Cut long passages into overlapping windows that fit the model, so no text is lost to truncation.

A window is a ``(start, end)`` character span of the passage's text. Each window is encoded on its own (led by
the passage's title, as the whole passage would be) and stored as its own row with the passage's id; a search
groups rows back to passages by their best window ("MaxP"). On SciFact this beats truncation at the model's
max_seq_length (benchmarks/RESULTS.md, "Long passages"), so it is the default.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Character spans of a text's tokens, as the model's tokenizer cuts it.
TokenSpans = Callable[[str], list[tuple[int, int]]]
Span = tuple[int, int]

# Tokens shared by neighbouring windows: a sentence cut at a window's edge is whole in one of them.
DEFAULT_OVERLAP = 32
# A window may start up to this share of its length later, to begin at a sentence rather than mid-sentence.
SENTENCE_SNAP = 0.25
_SENTENCE_END = re.compile(r"[.!?。！？][\"')\]]*$")


def window_spans(text: str, token_spans: TokenSpans, max_tokens: int, overlap: int = DEFAULT_OVERLAP) -> list[Span]:
    """Spans of ``text`` of at most ``max_tokens`` tokens each, covering all of it, neighbours overlapping.

    A text that fits gives one span, the whole text. Later windows start at a sentence boundary when one lies
    within the overlap or a little after it, so that a window rarely begins mid-sentence.
    """
    spans = token_spans(text)
    if len(spans) <= max_tokens:
        return [(0, len(text))]
    max_tokens = max(1, max_tokens)
    overlap = min(max(0, overlap), max_tokens // 2)
    out: list[Span] = []
    first = 0
    while True:
        last = min(first + max_tokens, len(spans)) - 1
        out.append((spans[first][0], spans[last][1]))
        if last == len(spans) - 1:
            return out
        nominal = last + 1 - overlap  # where the next window starts without snapping
        first = _sentence_start(text, spans, nominal, last, int(max_tokens * SENTENCE_SNAP))


def _sentence_start(text: str, spans: list[tuple[int, int]], nominal: int, last: int, slack: int) -> int:
    """The first token at or after ``nominal`` (within ``slack``, never past ``last``) that opens a sentence."""
    for candidate in range(max(1, nominal), min(nominal + slack, last) + 1):
        before = text[spans[candidate - 1][0] : spans[candidate - 1][1]]
        if _SENTENCE_END.search(before):
            return candidate
    return max(1, nominal)


def budget(max_text_tokens: int, title: str | None, token_spans: TokenSpans) -> int:
    """Tokens left for a window's text once the title that leads every window is counted."""
    if not title:
        return max_text_tokens
    return max(8, max_text_tokens - len(token_spans(title)) - 1)
