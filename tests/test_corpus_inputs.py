"""Corpus reading, issues 9 and 10: directories of every format, bad gzip and JSON, standard CSV, an index inside
its own corpus, stable text ids, skipped records named under -v, sentence-aligned windows, headings, odd ids."""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_cli import one_error_line

from dsearch.corpus import MAX_LOGGED_BAD, CorpusStats, FieldNames, corpus_files, read_corpus
from dsearch.errors import InputError


def write(path: Path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def stored_ids(index: Path) -> list[str]:
    [parquet] = index.glob("seg-*/passages.parquet")
    return pq.read_table(parquet, columns=["id"]).column("id").to_pylist()


# --- 1. directories hold every format ----------------------------------------------------------------


def test_directory_reads_every_supported_format_in_sorted_order(tmp_path):
    docs = tmp_path / "docs"
    write(docs / "a.jsonl", jsonl({"id": "j1", "text": "json line"}))
    write(docs / "b.ndjson.gz", gzip.compress(jsonl({"id": "n1", "text": "gzipped ndjson"}).encode()))
    write(docs / "c.tsv", "t1\ttab separated\n")
    write(docs / "d.csv", "id,text\nc1,comma separated\n")
    pq.write_table(pa.table({"id": ["p1"], "text": ["parquet row"]}), docs / "e.parquet")
    write(docs / "f.parquet.gz", b"")  # replaced below with a real gzipped Parquet file
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["pg1"], "text": ["gzipped parquet"]}), buffer)
    write(docs / "f.parquet.gz", gzip.compress(buffer.getvalue().to_pybytes()))
    write(docs / "sub" / "g.txt", "plain text paragraph.\n")
    write(docs / "sub" / "h.md.gz", gzip.compress(b"# Head\n\nmarkdown in gzip.\n"))
    write(docs / "sub" / "i.txt.gz", gzip.compress(b"text in gzip.\n"))
    write(docs / "notes.bin", b"\x00\x01")  # unknown extension: not read
    write(docs / ".hidden.jsonl", jsonl({"id": "h", "text": "hidden file"}))
    write(docs / ".git" / "x.jsonl", jsonl({"id": "g", "text": "hidden directory"}))
    passages = list(read_corpus([str(docs)]))
    texts = [p.text for p in passages]
    assert texts == [
        "json line",
        "gzipped ndjson",
        "tab separated",
        "comma separated",
        "parquet row",
        "gzipped parquet",
        "plain text paragraph.",
        "markdown in gzip.",
        "text in gzip.",
    ]
    assert passages[7].title == "Head"  # a gzipped Markdown file keeps its headings as titles
    assert passages[0].source == str(docs / "a.jsonl")


def test_directory_of_jsonl_through_the_cli(cli, tmp_path):
    docs = tmp_path / "docs"
    write(docs / "part-1.jsonl", jsonl({"id": "a", "text": "alpha"}, {"id": "b", "text": "beta"}))
    write(docs / "part-2.jsonl", jsonl({"id": "c", "text": "gamma"}))
    result = cli("index", docs, "-o", tmp_path / "idx", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["indexed"] == 3
    assert result.stderr == ""
    assert stored_ids(tmp_path / "idx") == ["a", "b", "c"]


def test_mixed_directory_cuts_its_text_files_with_the_models_tokenizer(cli, tmp_path):
    docs = tmp_path / "docs"
    write(docs / "a.jsonl", jsonl({"id": "a", "text": "alpha"}))
    write(docs / "b.txt", " ".join(f"w{i}" for i in range(100)) + "\n")
    result = cli("index", docs, "-o", tmp_path / "idx", "--json")
    assert result.exit_code == 0, result.stderr
    # The hashing encoder's max_seq_length is 40 (38 text tokens): 100 words make 3 windows, not 1 of 256.
    assert json.loads(result.stdout)["indexed"] == 1 + 3
    ids = stored_ids(tmp_path / "idx")
    assert ids[0] == "a" and all(i.startswith("b.txt#") for i in ids[1:])


def test_directory_without_corpus_files_is_an_error(cli, tmp_path):
    docs = tmp_path / "docs"
    write(docs / "data.bin", b"\x00")
    result = cli("index", docs, "-o", tmp_path / "idx")
    one_error_line(result, 1, f"no corpus files in {docs}", ".jsonl", "nothing was written")
    assert not (tmp_path / "idx").exists()


# --- 2. bad gzip -------------------------------------------------------------------------------------


def test_truncated_gzip_names_the_file_and_exits_1(cli, tmp_path):
    rows = jsonl(*({"id": f"d{i}", "text": f"passage number {i} " * 20} for i in range(200)))
    data = gzip.compress(rows.encode())
    path = tmp_path / "corpus.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    result = cli("index", path, "-o", tmp_path / "idx")
    one_error_line(result, 1, f"{path}: truncated gzip file")
    assert not (tmp_path / "idx").exists()
    # A whole file is lost, not a record: --skip-bad does not skip it.
    one_error_line(cli("index", path, "-o", tmp_path / "idx", "--skip-bad"), 1, f"{path}: truncated gzip")


def test_plain_file_named_gz_is_one_line_exit_1(cli, tmp_path):
    path = Path(write(tmp_path / "corpus.jsonl.gz", jsonl({"id": "a", "text": "not compressed"})))
    one_error_line(cli("index", path, "-o", tmp_path / "idx"), 1, f"{path}: not a gzip file", "rename it")
    plain = Path(write(tmp_path / "x.gz", "a\tb\n"))
    one_error_line(cli("index", plain, "-f", "tsv", "-o", tmp_path / "idx"), 1, f"{plain}: not a gzip file")


def test_corrupt_gzip_in_library_is_input_error(tmp_path):
    data = bytearray(gzip.compress(jsonl(*({"id": str(i), "text": "x" * i} for i in range(300))).encode()))
    data[-8] ^= 0xFF  # the CRC in the trailer: every record decompresses, the check at the end fails
    path = write(tmp_path / "c.jsonl.gz", bytes(data))
    with pytest.raises(InputError) as info:
        list(read_corpus([path], skip_bad=True))
    assert str(info.value).startswith(f"{path}: ")
    assert "corrupt gzip file (CRC check failed" in str(info.value) and "\n" not in str(info.value)


# --- 3. JSON that parses but cannot be stored ---------------------------------------------------------

SURROGATE = '{"id": "a", "text": "ok"}\n{"id": "b", "text": "bad \\ud800 here"}\n{"id": "c", "text": "fine"}\n'
DEEP = '{"id": "a", "text": "ok"}\n{"id": "b", "text": "x", "m": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
SHALLOW_DEEP = '{"id": "b", "text": "x", "m": ' + "[" * 150 + "]" * 150 + "}\n"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (SURROGATE, "lone surrogate \\ud800"),
        ('{"id": "a", "text": "ok"}\n{"id": "b", "text": "x", "meta": {"k\\udfff": 1}}\n', "lone surrogate"),
        (DEEP, "nested more than"),
        ('{"id": "a", "text": "ok"}\n' + SHALLOW_DEEP, "nested more than"),
    ],
    ids=["surrogate", "surrogate-in-key", "100k-deep", "150-deep"],
)
def test_unstorable_json_names_file_line_and_is_skippable(tmp_path, content, problem):
    path = write(tmp_path / "c.jsonl", content)
    with pytest.raises(InputError) as info:
        list(read_corpus([path]))
    assert str(info.value).startswith(f"{path}:2: ") and problem in str(info.value)
    stats = CorpusStats()
    kept = list(read_corpus([path], skip_bad=True, stats=stats))
    assert "b" not in [p.id for p in kept] and "a" in [p.id for p in kept]
    assert stats.skipped_bad == 1


def test_valid_surrogate_pair_is_kept(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"id": "e", "text": "smile \\ud83d\\ude00"}\n')
    [p] = read_corpus([path])
    assert p.text == "smile \U0001f600"


def test_surrogate_and_deep_json_through_the_cli(cli, tmp_path):
    path = tmp_path / "c.jsonl"
    write(path, SURROGATE)
    one_error_line(cli("index", path, "-o", tmp_path / "idx"), 1, f"{path}:2:", "surrogate", "--skip-bad")
    result = cli("index", path, "-o", tmp_path / "idx", "--skip-bad", "--json")
    assert result.exit_code == 0, result.stderr
    assert (json.loads(result.stdout)["indexed"], json.loads(result.stdout)["skipped_bad"]) == (2, 1)
    deep = tmp_path / "deep.jsonl"
    write(deep, DEEP)
    one_error_line(cli("index", deep, "-o", tmp_path / "idx2"), 1, f"{deep}:2:", "nested")


# --- 4. standard CSV ----------------------------------------------------------------------------------


def test_csv_quoted_newline_is_one_record_and_lines_stay_right(tmp_path):
    path = write(
        tmp_path / "c.csv",
        'id,title,text\r\n1,"T","first line\r\nsecond line"\r\n2,T2,"a ""quoted"" word"\r\n3,T3\r\n',
    )
    with pytest.raises(InputError) as info:
        list(read_corpus([path]))
    assert str(info.value).startswith(f"{path}:5: expected 3 columns")  # the record after the two-line one
    stats = CorpusStats()
    passages = list(read_corpus([path], skip_bad=True, stats=stats))
    assert [(p.id, p.text) for p in passages] == [("1", "first line\r\nsecond line"), ("2", 'a "quoted" word')]
    assert [p.where for p in passages] == [f"{path}:2", f"{path}:4"]
    assert stats.skipped_bad == 1


def test_csv_unclosed_quote_names_the_record_start(tmp_path):
    path = write(tmp_path / "c.csv", 'id,text\na,fine\nb,"never closed\nc,more\n')
    with pytest.raises(InputError, match=r"c\.csv:3: malformed CSV record"):
        list(read_corpus([path]))


def test_csv_bad_utf8_names_its_line_and_the_rest_is_read(tmp_path):
    path = write(tmp_path / "c.csv", b'id,text\na,"multi\nline"\nb,caf\xe9\nc,last\n')
    with pytest.raises(InputError, match=r"c\.csv:4: not valid UTF-8"):
        list(read_corpus([path]))
    stats = CorpusStats()
    assert [p.id for p in read_corpus([path], skip_bad=True, stats=stats)] == ["a", "c"]
    assert stats.skipped_bad == 1


# --- 5. a directory with an explicit format -----------------------------------------------------------


def test_directory_with_explicit_format_reads_that_formats_files(cli, tmp_path):
    docs = tmp_path / "docs"
    write(docs / "a.jsonl", jsonl({"id": "a", "text": "alpha"}))
    write(docs / "b.json.gz", gzip.compress(jsonl({"id": "b", "text": "beta"}).encode()))
    write(docs / "readme.txt", "not read with -f jsonl\n")
    write(docs / "c.tsv", "c\tnot read either\n")
    result = cli("index", docs, "-f", "jsonl", "-o", tmp_path / "idx", "--json")
    assert result.exit_code == 0, result.stderr
    assert stored_ids(tmp_path / "idx") == ["a", "b"]
    empty = tmp_path / "only-text"
    write(empty / "x.txt", "words\n")
    one_error_line(cli("index", empty, "-f", "jsonl", "-o", tmp_path / "idx2"), 1, f"no corpus files in {empty}")


# --- 6. the index inside its own corpus -----------------------------------------------------------------


def test_index_inside_its_corpus_is_not_read_and_status_stays_ok(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "docs" / "a.jsonl", jsonl({"id": "a", "text": "alpha"}, {"id": "b", "text": "beta"}))
    first = cli("index", "docs", "-o", "docs/idx", "--json")
    assert first.exit_code == 0, first.stderr
    assert json.loads(first.stdout)["indexed"] == 2
    status = cli("status", "docs/idx")
    assert (status.exit_code, status.stdout.split(":")[0]) == (0, "ok"), status.stdout
    again = cli("index", "docs", "-o", "docs/idx", "--update", "--json")
    assert again.exit_code == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["indexed"], summary["unchanged"], summary["published"]) == (2, 2, False)
    rebuilt = cli("index", "docs", "-o", "docs/idx", "--json")  # a full rebuild over the existing index
    assert rebuilt.exit_code == 0 and json.loads(rebuilt.stdout)["indexed"] == 2
    assert cli("status", "docs/idx").exit_code == 0
    assert stored_ids(tmp_path / "docs" / "idx") == ["a", "b"]


def test_corpus_files_skips_index_dirs_staging_and_excluded(tmp_path):
    docs = tmp_path / "docs"
    write(docs / "a.jsonl", "")
    write(docs / "idx" / "manifest.json", json.dumps({"format": "dsearch-index"}))
    write(docs / "idx" / "seg-1" / "passages.parquet", b"")
    write(docs / ".idx.staging-1" / "seg-1" / "passages.parquet", b"")
    write(docs / "out" / "x.jsonl", "")  # not (yet) an index, excluded by name
    write(docs / "app" / "manifest.json", json.dumps({"name": "a web app"}))  # someone else's manifest
    write(docs / "app" / "data.json", "")
    assert [p.relative_to(docs).as_posix() for p in corpus_files(docs, exclude=[docs / "out"])] == [
        "a.jsonl",
        "app/data.json",
        "app/manifest.json",
    ]


# --- 7. stable text ids -----------------------------------------------------------------------------------


def test_text_ids_are_relative_and_stable_under_insertion(tmp_path):
    docs = tmp_path / "docs"
    write(docs / "guide.md", "# Guide\n\nFirst part.\n\nSecond part.\n\nFirst part.\n")
    before = list(read_corpus([str(docs)]))
    ids = [p.id for p in before]
    assert all(i.startswith("guide.md#") for i in ids)
    assert ids[2] == ids[0] + "-2"  # the same text twice in one file: a counter
    assert len(set(ids)) == 3 and all(p.source == "guide.md" for p in before)
    write(docs / "guide.md", "# Guide\n\nA new first paragraph.\n\nFirst part.\n\nSecond part.\n\nFirst part.\n")
    after = {p.id: p.text for p in read_corpus([str(docs)])}
    assert {p.id: p.text for p in before}.items() <= after.items()
    # A file given by itself is named by its file name, however the path was typed.
    assert [p.id for p in read_corpus([str(docs / "guide.md")])][1:] == ids
    relative = os.path.relpath(docs / "guide.md")
    assert [p.id for p in read_corpus([relative])][1:] == ids


def test_window_ids_are_stable_when_a_paragraph_is_inserted(tmp_path):
    long = " ".join(f"w{i}" for i in range(100))
    path = tmp_path / "long.txt"
    write(path, long + "\n")
    before = {p.id: p.text for p in read_corpus([str(path)], max_tokens=40)}
    assert len(before) > 2
    write(path, "Inserted on top.\n\n" + long + "\n")
    after = {p.id: p.text for p in read_corpus([str(path)], max_tokens=40)}
    assert before.items() <= after.items() and len(after) == len(before) + 1


def test_update_from_inside_the_folder_and_after_an_insertion_reencodes_little(cli, tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    paragraphs = [f"Paragraph {i} talks about topic {i}." for i in range(20)]
    write(docs / "notes.txt", "\n\n".join(paragraphs) + "\n")
    target = tmp_path / "idx"
    assert cli("index", docs, "-o", target).exit_code == 0
    monkeypatch.chdir(docs)
    same = cli("index", ".", "-o", target, "--update", "--json")
    assert same.exit_code == 0, same.stderr
    assert (json.loads(same.stdout)["encoded"], json.loads(same.stdout)["published"]) == (0, False)
    write(docs / "notes.txt", "A new opening paragraph.\n\n" + "\n\n".join(paragraphs) + "\n")
    grown = json.loads(cli("index", ".", "-o", target, "--update", "--json").stdout)
    assert (grown["added"], grown["encoded"], grown["unchanged"], grown["removed"]) == (1, 1, 20, 0)


# --- 8. skipped records named under -v ----------------------------------------------------------------------


def test_skip_bad_names_each_skipped_record_under_verbose(cli, tmp_path):
    path = tmp_path / "c.jsonl"
    write(path, '{"id": "a", "text": "ok"}\n{"id": "b" "text": "x"}\n{"text": "no id"}\n')
    result = cli("index", path, "-o", tmp_path / "idx", "--skip-bad", "-v")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    skipped = [line for line in result.stderr.splitlines() if "(skipped)" in line]
    assert len(skipped) == 2
    assert f"{path}:2: not valid JSON" in skipped[0] and f"{path}:3: missing id field" in skipped[1]
    quiet = cli("index", path, "-o", tmp_path / "idx2", "--skip-bad")
    assert "(skipped)" not in quiet.stderr
    # --update reads the corpus twice when something changed: each skipped record is still named once.
    write(path, '{"id": "a", "text": "changed"}\n{"id": "b" "text": "x"}\n{"text": "no id"}\n')
    update = cli("index", path, "-o", tmp_path / "idx", "--skip-bad", "--update", "-v", "--json")
    assert update.exit_code == 0, update.stderr
    assert json.loads(update.stdout)["updated"] == 1
    assert [line.split(" INFO: ")[1] for line in update.stderr.splitlines() if "(skipped)" in line] == [
        f"{path}:2: not valid JSON (Expecting ',' delimiter at column 12) (skipped)",
        f"{path}:3: missing id field '_id/id/docid/doc_id/pid' (skipped)",
    ]


def test_skipped_record_log_is_capped(tmp_path):
    path = write(tmp_path / "c.jsonl", "not json\n" * (MAX_LOGGED_BAD + 50) + '{"id": "a", "text": "ok"}\n')
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("dsearch")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        stats = CorpusStats()
        assert [p.id for p in read_corpus([path], skip_bad=True, stats=stats)] == ["a"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert stats.skipped_bad == MAX_LOGGED_BAD + 50
    assert sum("(skipped)" in m for m in messages) == MAX_LOGGED_BAD
    assert messages[0].startswith(f"{path}:1: not valid JSON")
    assert messages[-1] == "50 more bad records skipped, not listed"


# --- 9. windows, headings, gzipped text ---------------------------------------------------------------------


def test_windows_start_at_a_sentence_boundary_when_one_is_near(tmp_path):
    sentences = [" ".join(f"s{n}w{i}" for i in range(9)) + "." for n in range(20)]  # 9 words a sentence
    text = " ".join(s[0].upper() + s[1:] for s in sentences)
    path = write(tmp_path / "long.txt", text + "\n")
    windows = [p.text for p in read_corpus([path], max_tokens=40)]
    assert len(windows) > 2
    assert all(w[0].isupper() for w in windows)  # every window begins a sentence
    words = text.split()
    assert {w for window in windows for w in window.split()} == set(words)  # nothing lost
    assert all(len(w.split()) <= 40 for w in windows)


def test_windows_without_sentences_still_overlap_and_cover(tmp_path):
    path = write(tmp_path / "long.txt", " ".join(f"w{i}" for i in range(100)))
    windows = [p.text.split() for p in read_corpus([path], max_tokens=40)]
    assert windows[0][0] == "w0" and windows[-1][-1] == "w99"
    assert all(set(a) & set(b) for a, b in zip(windows, windows[1:], strict=False))


def test_underlined_headings_title_the_passages_below(tmp_path):
    rst = "Install guide\n=============\n\nRun the installer.\n\n-----\n\nUsage\n-----\nCall it daily.\n"
    path = write(tmp_path / "guide.rst", rst)
    passages = list(read_corpus([path]))
    assert [(p.title, p.text) for p in passages] == [
        ("Install guide", "Run the installer."),
        ("Usage", "Call it daily."),
    ]
    assert [p.where for p in passages] == [f"{path}:4", f"{path}:10"]
    over = write(tmp_path / "over.txt", "=======\n Title\n=======\n\nBody text.\n")
    assert [(p.title, p.text) for p in read_corpus([over])] == [("Title", "Body text.")]


def test_markdown_rules_are_not_headings_but_rst_takes_any_underline(tmp_path):
    md = write(tmp_path / "a.md", "# Top\n\nSome text.\n***\n\nMore text.\n")
    assert [(p.title, p.text) for p in read_corpus([md])] == [("Top", "Some text."), ("Top", "More text.")]
    rst = write(tmp_path / "a.rst", "Part\n****\n\nBody.\n")
    assert [(p.title, p.text) for p in read_corpus([rst])] == [("Part", "Body.")]


def test_markdown_headings_inside_paragraphs_and_code_fences(tmp_path):
    md = "---\ntitle: front matter\n---\n\n# Setup\nInstall it.\n\n```sh\n# not a heading\n\nmake\n```\n"
    path = write(tmp_path / "a.md", md)
    passages = list(read_corpus([path]))
    assert [(p.title, p.text) for p in passages] == [
        ("Setup", "Install it."),
        ("Setup", "```sh\n# not a heading"),
        ("Setup", "make\n```"),
    ]
    assert passages[0].where == f"{path}:6"


# --- 10. ids kept exactly; empty ids refused -------------------------------------------------------------------


def test_ids_with_space_and_tab_round_trip_through_the_index(cli, tmp_path):
    path = tmp_path / "c.jsonl"
    ids = ["doc one", "doc\ttwo", " x ", "line\nbreak", "bell\x07"]
    write(path, jsonl(*({"id": i, "text": f"text {n}"} for n, i in enumerate(ids))))
    result = cli("index", path, "-o", tmp_path / "idx")
    assert result.exit_code == 0, result.stderr
    assert stored_ids(tmp_path / "idx") == ids


@pytest.mark.parametrize("bad_id", ["", "   ", "\t"])
def test_empty_or_blank_id_names_file_line(tmp_path, bad_id):
    path = write(tmp_path / "c.jsonl", jsonl({"id": "a", "text": "ok"}, {"id": bad_id, "text": "x"}))
    with pytest.raises(InputError, match=r"c\.jsonl:2: empty id in field 'id'"):
        list(read_corpus([path]))
    tsv = write(tmp_path / "c.tsv", f"a\tok\n{bad_id}\tx\n" if bad_id != "\t" else "a\tok\n \tx\n")
    with pytest.raises(InputError, match=r"c\.tsv:2: empty id"):
        list(read_corpus([tsv]))


def test_structured_id_is_refused(tmp_path):
    path = write(tmp_path / "c.jsonl", jsonl({"id": {"a": 1}, "text": "x"}))
    with pytest.raises(InputError, match=r"c\.jsonl:1: id field 'id' is not a string or a number"):
        list(read_corpus([path], names=FieldNames()))


@pytest.mark.slow
def test_windows_with_the_real_tokenizer_start_at_sentences(tmp_path, bundled_encoder):
    sentences = [f"Sentence number {n} says something about topic {n}, quite briefly." for n in range(60)]
    path = write(tmp_path / "long.txt", " ".join(sentences) + "\n")
    spans = bundled_encoder.token_spans
    windows = [p.text for p in read_corpus([path], token_spans=spans, max_tokens=64)]
    assert len(windows) > 3
    assert all(w.startswith("Sentence number ") for w in windows)
    assert all(len(spans(w)) <= 64 for w in windows)
    assert {s for w in windows for s in sentences if s in w} == set(sentences)  # every sentence whole somewhere


# --- Parquet binary columns (Spark and others write strings without the UTF8 annotation) -------------------


def test_parquet_binary_id_title_and_text_are_read_as_utf8_not_as_python_reprs(tmp_path, cli):
    """Ids from a binary column were stored as "b'a1'": silently wrong ids that no qrels or 'get a1' could find."""
    corpus = tmp_path / "spark.parquet"
    table = pa.table(
        {
            "id": pa.array([b"a1", "é2".encode()], pa.binary()),
            "title": pa.array([b"T\xc3\xa9", None], pa.binary()),
            "text": pa.array([b"northern lights", b"volcano lava"], pa.binary()),
        }
    )
    pq.write_table(table, corpus)
    index = tmp_path / "idx"
    assert cli("index", corpus, "-o", index).exit_code == 0
    got = [json.loads(line) for line in cli("get", index, "a1", "é2", "-f", "jsonl").stdout.splitlines()]
    assert [(g["id"], g["title"], g["text"]) for g in got] == [
        ("a1", "Té", "northern lights"),
        ("é2", None, "volcano lava"),
    ]


@pytest.mark.parametrize(
    ("column", "values", "problem"),
    [
        ("id", pa.array([b"a1", b"\xff\xfe"], pa.binary()), "id field 'id' holds bytes that are not UTF-8"),
        ("text", pa.array([b"ok", b"bad\xff"], pa.binary()), "text field 'text' holds bytes that are not UTF-8"),
        ("id", pa.array([1.5, float("nan")]), "id field 'id' is not a string or a number"),
    ],
)
def test_parquet_ids_and_texts_that_cannot_be_text_are_errors_naming_the_row(tmp_path, cli, column, values, problem):
    columns = {"id": pa.array(["a1", "a2"]), "text": pa.array(["x", "y"])}
    columns[column] = values
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table(columns), corpus)
    one_error_line(cli("index", corpus, "-o", tmp_path / "idx"), 1, f"{corpus}:row 2", problem)
    assert not (tmp_path / "idx").exists()


# --- symlinked folders inside a corpus folder ----------------------------------------------------------------


def test_a_linked_folder_in_the_corpus_is_read_and_its_changes_seen_by_status(cli, tmp_path):
    docs, elsewhere = tmp_path / "docs", tmp_path / "other-disk"
    write(docs / "a.jsonl", jsonl({"id": "a", "text": "alpha"}))
    write(elsewhere / "b.jsonl", jsonl({"id": "b", "text": "beta"}))
    (docs / "linked").symlink_to(elsewhere, target_is_directory=True)
    result = cli("index", docs, "-o", tmp_path / "idx")
    assert result.exit_code == 0, result.stderr
    assert stored_ids(tmp_path / "idx") == ["a", "b"]  # it used to skip the linked folder and exit 0
    assert cli("status", tmp_path / "idx").exit_code == 0
    write(elsewhere / "b.jsonl", jsonl({"id": "b", "text": "beta, changed"}))
    assert cli("status", tmp_path / "idx").exit_code == 8


def test_status_sees_a_renamed_linked_folder_or_file_whose_totals_are_the_same(cli, tmp_path):
    """A renamed link (or file) changes the ids of its text passages, and an --update removes and re-adds them;
    status compared only the folder's totals (files, bytes, newest mtime) and said ok, exit 0."""
    docs, elsewhere = tmp_path / "docs", tmp_path / "other-disk"
    write(docs / "own.txt", "second doc\n")
    write(elsewhere / "doc.txt", "hello world text\n")
    (docs / "link").symlink_to(elsewhere, target_is_directory=True)
    index = tmp_path / "idx"
    assert cli("index", docs, "-o", index).exit_code == 0
    assert cli("status", index).exit_code == 0
    for old, new in (("link", "renamed"), ("own.txt", "mine.txt")):
        (docs / old).rename(docs / new)
        status = cli("status", index)
        assert (status.exit_code, status.stderr) == (8, ""), status.stdout
        assert status.stdout.startswith(f"corpus-changed: {docs} changed since the index was built")
        update = cli("index", docs, "-o", index, "--update", "--json")
        assert update.exit_code == 0, update.stderr
        assert (json.loads(update.stdout)["removed"], json.loads(update.stdout)["added"]) == (1, 1)  # what changed
        assert cli("status", index).exit_code == 0


def test_a_folder_reached_twice_through_links_is_read_once(tmp_path):
    docs = tmp_path / "docs"
    write(docs / "sub" / "a.jsonl", "")
    (docs / "sub" / "up").symlink_to("..", target_is_directory=True)  # a loop
    (docs / "same").symlink_to("sub", target_is_directory=True)  # the same folder by another name
    (docs / "self").symlink_to(".", target_is_directory=True)
    assert [p.relative_to(docs).as_posix() for p in corpus_files(docs)] == ["same/a.jsonl"]


def test_a_linked_folder_to_nothing_is_one_error_line(cli, tmp_path):
    docs = tmp_path / "docs"
    write(docs / "a.jsonl", jsonl({"id": "a", "text": "alpha"}))
    (docs / "archive").symlink_to(tmp_path / "unmounted" / "archive")
    result = cli("index", docs, "-o", tmp_path / "idx")
    one_error_line(result, 1, "archive: a symlink to", "which does not exist (a disk not mounted?)")
    assert not (tmp_path / "idx").exists()
    (docs / "notes.docx").symlink_to(tmp_path / "gone.docx")  # not a corpus file, not a folder: left alone
    (docs / "archive").unlink()
    assert cli("index", docs, "-o", tmp_path / "idx").exit_code == 0
