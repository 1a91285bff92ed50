"""Long passages: windows that cover the whole text, grouped back to one hit per passage (MaxP)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fakes import HashingEncoder

from dsearch.store import OpenIndex
from dsearch.windows import budget, window_spans


def words(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", text)]


def test_windows_cover_the_text_overlap_and_fit():
    text = " ".join(f"w{i}" for i in range(100))
    spans = window_spans(text, words, max_tokens=30, overlap=5)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (_start, end), (next_start, _) in zip(spans, spans[1:], strict=False):
        assert next_start < end  # neighbours overlap: nothing falls between two windows
    assert all(len(words(text[s:e])) <= 30 for s, e in spans)
    assert window_spans("short text", words, max_tokens=30) == [(0, len("short text"))]


def test_windows_prefer_to_start_at_a_sentence():
    sentences = [" ".join(f"{'S' if i == 0 else 's'}{n}w{i}" for i in range(9)) + "." for n in range(12)]
    text = " ".join(sentences)
    spans = window_spans(text, words, max_tokens=30, overlap=4)
    assert len(spans) > 2
    for start, _ in spans[1:]:
        assert text[:start].rstrip().endswith(".")  # every later window opens a sentence


def test_budget_leaves_room_for_the_title():
    assert budget(100, None, words) == 100
    assert budget(100, "a three word", words) == 100 - 3 - 1


def long_corpus(path: Path) -> Path:
    """Ten passages of 120 words; passage 'long-7' alone ends with the rare word 'zanzibar'."""
    rows = []
    for n in range(10):
        filler = " ".join(f"common{n}x{i}" for i in range(120))
        tail = " zanzibar zanzibar spice island" if n == 7 else ""
        rows.append({"_id": f"long-{n}", "title": f"Passage {n}", "text": filler + tail})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_split_finds_text_past_the_model_window_and_returns_each_passage_once(cli, tmp_path):
    corpus = long_corpus(tmp_path / "long.jsonl")
    result = cli("index", corpus, "-o", tmp_path / "split", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["indexed"] == 10 and summary["windows"] > 10 and summary["truncated"] == 0

    result = cli("query", tmp_path / "split", "zanzibar spice island", "-k", "5", "-f", "jsonl")
    assert result.exit_code == 0, result.stderr
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert hits[0]["id"] == "long-7"
    assert len({h["id"] for h in hits}) == len(hits) == 5  # one hit per passage, not per window
    start, end = hits[0]["window"]
    assert "zanzibar" in hits[0]["text"][start:end] and end == len(hits[0]["text"])
    assert hits[0]["text"].startswith("common7x0")  # the hit carries the whole passage


def test_no_split_truncates_and_says_so(cli, tmp_path):
    corpus = long_corpus(tmp_path / "long.jsonl")
    result = cli("index", corpus, "-o", tmp_path / "cut", "--no-split", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["indexed"] == summary["windows"] == 10 and summary["truncated"] == 10
    result = cli("index", corpus, "-o", tmp_path / "cut2", "--no-split")
    assert "10 truncated" in result.stderr and "--split" in result.stderr
    result = cli("query", tmp_path / "cut", "zanzibar spice island", "-k", "1", "-f", "jsonl")
    hit = json.loads(result.stdout)
    assert hit["window"] is None  # truncation: the tail was never encoded, so long-7 has no edge
    assert hit["score"] < 0.5


def test_update_keeps_the_index_windows_and_refuses_another_choice(cli, tmp_path):
    corpus = long_corpus(tmp_path / "long.jsonl")
    assert cli("index", corpus, "-o", tmp_path / "idx", "--overlap", "8").exit_code == 0

    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    rows[3]["text"] += " a new closing sentence."
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = cli("index", corpus, "-o", tmp_path / "idx", "--update", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["encoded"] == 1
    assert cli("index", corpus, "-o", tmp_path / "fresh", "--overlap", "8").exit_code == 0
    updated, fresh = OpenIndex(tmp_path / "idx"), OpenIndex(tmp_path / "fresh")
    assert list(updated.iter_rows()) == list(fresh.iter_rows())
    assert (updated.vectors(0, updated.rows) == fresh.vectors(0, fresh.rows)).all()

    result = cli("index", corpus, "-o", tmp_path / "idx", "--update", "--no-split")
    assert result.exit_code == 1 and result.stdout == ""
    assert "cut with --split --overlap 8, not --no-split;" in result.stderr and "without --update" in result.stderr
    assert "not not" not in result.stderr


def test_overlap_needs_split(cli, tmp_path):
    result = cli("index", long_corpus(tmp_path / "c.jsonl"), "-o", tmp_path / "x", "--no-split", "--overlap", "4")
    assert result.exit_code == 2 and "--overlap" in result.stderr
    assert not (tmp_path / "x").exists()


def test_info_counts_passages_and_windows(cli, tmp_path):
    assert cli("index", long_corpus(tmp_path / "c.jsonl"), "-o", tmp_path / "idx").exit_code == 0
    data = json.loads(cli("info", tmp_path / "idx", "--json").stdout)
    assert data["passages"] == 10 and data["rows"] > 10 and data["split"] == {"overlap": 32}


def test_split_windows_fit_the_encoder(tmp_path):
    """Every stored window, led by its title, fits the model: nothing is truncated when split."""
    from dsearch.indexer import build_index

    encoder = HashingEncoder()
    build_index([str(long_corpus(tmp_path / "c.jsonl"))], tmp_path / "idx", encoder)
    for row in OpenIndex(tmp_path / "idx").iter_rows():
        window = row["text"][row["window_start"] : row["window_end"]]
        assert encoder.count_truncated([f"{row['title']} {window}"]) == 0


def test_the_removal_limit_counts_passages_not_windows(cli, tmp_path):
    corpus = long_corpus(tmp_path / "long.jsonl")
    assert cli("index", corpus, "-o", tmp_path / "idx").exit_code == 0
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))  # 4 of 10 passages gone: within half
    result = cli("index", corpus, "-o", tmp_path / "idx", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["indexed"] == 6
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))  # 4 of 6 gone: more than half
    result = cli("index", corpus, "-o", tmp_path / "idx")
    assert result.exit_code == 9 and result.stdout == ""
    assert "refusing to remove 4 of the index's 6 passages" in result.stderr
