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
_SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’)\]]*$")


def window_spans(text: str, token_spans: TokenSpans, max_tokens: int, overlap: int = DEFAULT_OVERLAP) -> list[Span]:
    """Spans of ``text`` of at most ``max_tokens`` tokens each, covering all of it, neighbours overlapping.

    A text that fits gives one span, the whole text. A window after the first starts at a sentence boundary when
    one lies within a quarter window of where it would start; every token is in some window, and each window
    starts later than the one before.
    """
    spans = [s for s in token_spans(text) if s[1] > s[0]]  # tokenizers may give special tokens no characters
    if len(spans) <= max_tokens:
        return [(0, len(text))]
    max_tokens = max(1, max_tokens)
    overlap = min(max(0, overlap), max_tokens // 2)
    reach = max(1, max_tokens // 4)
    out: list[Span] = []
    first = 0
    while True:
        end = min(first + max_tokens, len(spans))  # one past the window's last token
        out.append((spans[first][0], spans[end - 1][1]))
        if end == len(spans):
            return out
        nominal = max(first + 1, end - overlap)
        candidates = [i for i in range(max(first + 1, nominal - reach), end + 1) if _starts_sentence(text, spans, i)]
        first = min(candidates, key=lambda i: (abs(i - nominal), i)) if candidates else nominal


def _starts_sentence(text: str, spans: list[tuple[int, int]], i: int) -> bool:
    """Whether token ``i`` begins a sentence: space before it, sentence-ending punctuation before that."""
    if i >= len(spans):
        return False
    begin = spans[i][0]
    if begin == spans[i - 1][1] or not text[spans[i - 1][1] : begin].isspace():
        return False
    return bool(_SENTENCE_END.search(text[max(0, begin - 8) : begin].rstrip())) and not text[begin].islower()


def budget(max_text_tokens: int, title: str | None, token_spans: TokenSpans) -> int:
    """Tokens left for a window's text once the title that leads every window is counted."""
    if not title:
        return max_text_tokens
    return max(8, max_text_tokens - len(token_spans(title)) - 1)
