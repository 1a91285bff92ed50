"""Corpus readers: every input format, and every kind of bad input."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsearch.corpus import CorpusStats, FieldNames, detect_format, read_corpus
from dsearch.errors import InputError, UsageError


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


def test_beir_jsonl_as_is(tmp_path):
    path = write(
        tmp_path / "corpus.jsonl",
        '{"_id": "d1", "title": "T1", "text": "first", "metadata": {"year": 2020}}\n'
        '{"_id": 7, "title": "", "text": "second"}\n',
    )
    passages = list(read_corpus([path]))
    assert [p.id for p in passages] == ["d1", "7"]
    assert passages[0].title == "T1" and passages[0].encoder_text == "T1 first"
    assert passages[0].fields == {"metadata": {"year": 2020}}
    assert passages[1].title is None and passages[1].encoder_text == "second"
    assert passages[0].source == path


def test_jsonl_field_options_keep_other_fields(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"pid": "a", "body": "hello", "head": "H", "lang": "en"}\n')
    [p] = read_corpus([path], names=FieldNames(id="pid", text="body", title="head"))
    assert (p.id, p.text, p.title, p.fields) == ("a", "hello", "H", {"lang": "en"})


def test_msmarco_tsv_without_header(tmp_path):
    path = write(tmp_path / "collection.tsv", '0\tThe "presence" of communication\n1\tsecond passage\n')
    passages = list(read_corpus([path]))
    assert [(p.id, p.text) for p in passages] == [("0", 'The "presence" of communication'), ("1", "second passage")]


def test_tsv_with_header_and_fields(tmp_path):
    path = write(tmp_path / "c.tsv", "docid\tbody\tauthor\nx\thello world\tann\n")
    [p] = read_corpus([path], names=FieldNames(id="docid", text="body"))
    assert (p.id, p.text, p.fields) == ("x", "hello world", {"author": "ann"})


def test_csv_with_quoted_commas(tmp_path):
    path = write(tmp_path / "c.csv", 'id,title,text\n1,"A, B","one, two"\n')
    [p] = read_corpus([path])
    assert (p.id, p.title, p.text) == ("1", "A, B", "one, two")


def test_parquet(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["alpha", "beta"], "year": [1999, 2001]}), path)
    passages = list(read_corpus([str(path)]))
    assert [(p.id, p.text, p.fields) for p in passages] == [
        ("p1", "alpha", {"year": 1999}),
        ("p2", "beta", {"year": 2001}),
    ]


def test_text_and_markdown_directory(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    write(docs / "a.txt", "First paragraph\nstill first.\n\nSecond paragraph.\n")
    write(docs / "sub" / "b.md", "# Guide\n\nIntro text.\n\n## Install\n\nRun pip.\n")
    write(docs / "ignored.bin", b"\x00\x01")
    passages = list(read_corpus([str(docs)]))
    ids = [p.id.split("#")[0] for p in passages]
    assert ids == ["a.txt", "a.txt", "sub/b.md", "sub/b.md"]  # relative to the corpus root, then a content hash
    assert len({p.id for p in passages}) == 4
    assert passages[0].text == "First paragraph\nstill first."
    assert passages[0].source == "a.txt"
    assert [(p.title, p.text) for p in passages[2:]] == [("Guide", "Intro text."), ("Install", "Run pip.")]
    assert passages[1].where == f"{docs}/a.txt:4"


def test_long_paragraph_is_cut_into_overlapping_windows(tmp_path):
    words = [f"w{i}" for i in range(100)]
    path = write(tmp_path / "long.txt", " ".join(words))
    passages = list(read_corpus([path], max_tokens=40))
    windows = [p.text.split() for p in passages]
    assert all(len(w) <= 40 for w in windows)
    assert windows[0][0] == "w0" and windows[-1][-1] == "w99"
    assert set(windows[0]) & set(windows[1])  # consecutive windows overlap
    assert set(sum(windows, [])) == set(words)  # nothing lost


def test_stdin_is_jsonl_by_default():
    stdin = io.BytesIO(b'{"id": "s1", "text": "from stdin"}\n')
    [p] = read_corpus(["-"], stdin=stdin)
    assert (p.id, p.text, p.source, p.where) == ("s1", "from stdin", "<stdin>", "<stdin>:1")


def test_stdin_with_format(tmp_path):
    stdin = io.BytesIO(b"a\tone\nb\ttwo\n")
    assert [p.id for p in read_corpus(["-"], fmt="tsv", stdin=stdin)] == ["a", "b"]


def test_gzipped_jsonl(tmp_path):
    import gzip

    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"_id": "g", "text": "zipped"}\n'))
    assert [p.id for p in read_corpus([str(path)])] == ["g"]


def test_empty_text_is_skipped_and_counted(tmp_path):
    path = write(
        tmp_path / "c.jsonl", '{"id": "a", "text": "  "}\n{"id": "b", "text": "ok"}\n{"id": "c", "text": null}\n'
    )
    stats = CorpusStats()
    assert [p.id for p in read_corpus([path], stats=stats)] == ["b"]
    assert (stats.read, stats.skipped_empty, stats.skipped_bad) == (1, 2, 0)


BAD_INPUTS = {
    "malformed": ('{"id": "a", "text": "ok"}\n{"id": "b", "text": \n', 2, "not valid JSON"),
    "missing id": ('{"id": "a", "text": "ok"}\n{"text": "no id"}\n', 2, "missing id field"),
    "missing text": ('{"id": "a", "words": "x"}\n', 1, "missing text field"),
    "not an object": ('["a", "b"]\n', 1, "must be an object"),
    "duplicate id": (
        '{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n',
        3,
        "duplicate id 'a'",
    ),
    "bad utf-8": (b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n', 2, "not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_and_line(tmp_path, case):
    content, line, problem = BAD_INPUTS[case]
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(InputError) as info:
        list(read_corpus([path]))
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ")
    assert problem in message
    assert "\n" not in message


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_skip_bad_counts_instead(tmp_path, case):
    content, _line, _problem = BAD_INPUTS[case]
    path = write(tmp_path / "bad.jsonl", content)
    stats = CorpusStats()
    good = list(read_corpus([path], skip_bad=True, stats=stats))
    assert stats.skipped_bad == 1
    assert stats.read == len(good)
    assert stats.first_bad.startswith(f"{path}:")


def test_tsv_wrong_column_count(tmp_path):
    path = write(tmp_path / "c.tsv", "a\tone\nb\ttwo\textra\n")
    with pytest.raises(InputError, match=r"c\.tsv:2: expected 2 columns"):
        list(read_corpus([path]))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        list(read_corpus([str(tmp_path / "nope.jsonl")]))


def test_unknown_extension_needs_format(tmp_path):
    path = write(tmp_path / "corpus.dat", "x")
    with pytest.raises(UsageError, match="pass fmt=") as raised:  # str(): as the Python API names it
        detect_format(path)
    assert "pass --format (jsonl|" in raised.value.for_cli()


def test_field_names_in_jsonl_error_hint(tmp_path):
    path = write(tmp_path / "c.jsonl", json.dumps({"key": "a", "text": "x"}) + "\n")
    with pytest.raises(InputError, match="id_field=") as raised:
        list(read_corpus([path]))
    assert "--id-field" in raised.value.for_cli()
