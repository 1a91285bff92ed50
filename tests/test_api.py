"""Issue 14 (part 1): the Python API. ``Searcher`` answers as ``dsearch query`` does, typed errors, no cross-talk."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE
from fakes import HashingEncoder

from dsearch.api import Searcher, build_index, index_version
from dsearch.errors import DsearchError, IndexDirError, InputError, ModelError, UsageError
from dsearch.search import Query

QUERIES = [
    "which planet is closest to the sun",
    "volcano eruption lava",
    "how do vaccines train the immune system",
    "the largest ocean on earth",
    "nuclear fusion in stars",
]
SUN = "The Sun is a G-type main-sequence star that holds about 99.8 percent of the mass of the Solar System"
# (CLI flags, the same options for Searcher.search)
MODES = [
    ((), {}),
    (("--mode", "lexical"), {"mode": "lexical"}),
    (("--mode", "hybrid"), {"mode": "hybrid"}),
    (("--alpha", "0.3"), {"alpha": 0.3}),
    (("--where", "topic = 'astronomy'"), {"where": "topic = 'astronomy'"}),
    (("--mode", "hybrid", "--where", "topic <> 'astronomy'"), {"mode": "hybrid", "where": "topic <> 'astronomy'"}),
    (("--min-score", "0.3"), {"min_score": 0.3}),
    (("--mode", "lexical", "--min-score", "2", "--where", "title LIKE 'M%'"),
     {"mode": "lexical", "min_score": 2.0, "where": "title LIKE 'M%'"}),
]  # fmt: skip


def searcher(directory: Path, **options) -> Searcher:
    return Searcher(directory, encoder=HashingEncoder(), **options)


def cli_records(cli, index: Path, *args: str) -> list[dict]:
    result = cli("query", index, *QUERIES, "-k", "7", "--format", "jsonl", *args)
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize(("flags", "options"), MODES, ids=[" ".join(f) or "dense" for f, _ in MODES])
def test_search_equals_the_cli_jsonl_in_every_mode(cli, sample_index, flags, options):
    expected = cli_records(cli, sample_index, *flags)
    with searcher(sample_index) as s:
        results = s.search(QUERIES, 7, **options)
    assert len(results) == len(QUERIES)
    got = [hit.to_dict() for hits in results for hit in hits]
    assert got == expected
    assert got, "the comparison must not be between two empty lists"
    # Query ids are the positions, as the CLI numbers its arguments; each list belongs to its query.
    for number, (text, hits) in enumerate(zip(QUERIES, results, strict=True), 1):
        assert all(h.qid == str(number) and h.query == text for h in hits)


def test_vectors_give_the_same_hits_as_texts(sample_index):
    with searcher(sample_index) as s:
        vectors = s.encode_queries(QUERIES)
        assert vectors.shape == (len(QUERIES), 64)
        for options in ({}, {"mode": "hybrid"}, {"where": "topic = 'astronomy'"}):
            by_text = s.search(QUERIES, 5, **options)
            by_vector = s.search(QUERIES, 5, vectors=vectors, **options)
            assert [[h.to_dict() for h in hits] for hits in by_vector] == [
                [h.to_dict() for h in hits] for hits in by_text
            ]


def test_vectors_are_actually_used(sample_index):
    """Vectors that belong to other queries give those queries' rankings: the texts were not re-encoded."""
    with searcher(sample_index) as s:
        swapped = s.encode_queries(list(reversed(QUERIES)))
        by_vector = s.search(QUERIES, 5, vectors=swapped)
        by_text = s.search(list(reversed(QUERIES)), 5)
    assert [[h.id for h in hits] for hits in by_vector] == [[h.id for h in hits] for hits in by_text]


def test_a_querys_hits_do_not_depend_on_the_other_queries(sample_index):
    with searcher(sample_index) as s:
        for options in ({}, {"mode": "lexical"}, {"mode": "hybrid"}, {"where": "topic <> 'biology'"}):
            together = s.search(QUERIES, 6, **options)
            alone = [s.search(q, 6, **options)[0] for q in QUERIES]
            shuffled = s.search(QUERIES[::-1], 6, **options)[::-1]
            ids = [[(h.id, round(h.score, 6)) for h in hits] for hits in together]
            assert ids == [[(h.id, round(h.score, 6)) for h in hits] for hits in alone]
            assert ids == [[(h.id, round(h.score, 6)) for h in hits] for hits in shuffled]


def test_split_passages_need_no_deeper_search_from_batch_mates(cli, tmp_path):
    """A query whose windows crowd its top rows is searched deeper alone; its batch-mate keeps its own answer."""
    long_text = " ".join(f"alpha word{i}" for i in range(200))  # many windows, all about "alpha"
    rows = [{"id": "long", "text": long_text}] + [{"id": f"p{i}", "text": f"alpha beta note {i}"} for i in range(30)]
    rows += [{"id": f"g{i}", "text": f"gamma delta item {i}"} for i in range(30)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("index", corpus, "-o", tmp_path / "idx").exit_code == 0
    with searcher(tmp_path / "idx") as s:
        assert s.rows > s.passages  # the long passage was split
        together = s.search(["alpha", "gamma delta"], 10)
        alone = [s.search("alpha", 10)[0], s.search("gamma delta", 10)[0]]
    assert [[h.id for h in hits] for hits in together] == [[h.id for h in hits] for hits in alone]
    assert len(together[0]) == 10 and len({h.id for h in together[0]}) == 10


def test_like_and_get_equal_the_cli(cli, sample_index):
    expected = [json.loads(line) for line in cli("query", sample_index, "--like", "astronomy-01", "-k", "4",
                                                 "--where", "topic = 'astronomy'").stdout.splitlines()]  # fmt: skip
    got = cli("get", sample_index, "astronomy-02", "astronomy-01", "-f", "jsonl")
    with Searcher(sample_index, load_encoder=False) as s:
        like = s.like("astronomy-01", 4, where="topic = 'astronomy'")
        found, missing = s.get(["astronomy-02", "nope", "astronomy-01"])
        assert not s.encoder_loaded  # neither needs the model
    assert [h.to_dict() for h in like] == expected and len(like) == 4
    assert [p.id for p in found] == ["astronomy-02", "astronomy-01"] and missing == ["nope"]
    assert [{"id": p.id, "title": p.title, "text": p.text, "source": p.source, "fields": p.fields} for p in found] == [
        json.loads(line) for line in got.stdout.splitlines()
    ]


def test_info_is_what_info_json_prints(cli, sample_index):
    printed = json.loads(cli("info", sample_index, "--json").stdout)
    with Searcher(sample_index) as s:
        assert s.info() == printed
        assert (s.rows, s.passages) == (printed["rows"], printed["passages"]) == (200, 200)
        assert sorted(set(s.iter_ids())) == sorted(json.loads(line)["_id"] for line in
                                                   (SAMPLE / "passages.jsonl").read_text().splitlines())  # fmt: skip


def test_lexical_search_never_loads_a_model(sample_index):
    loaded = []

    class Loader:
        def load_encoder(self, name, **options):
            loaded.append(name)
            return HashingEncoder(name)

        def query_encoder(self, model, **options):
            loaded.append(model.name)
            return HashingEncoder(model.name)

    with Searcher(sample_index, loader=Loader()) as s:
        assert s.search("volcano", 3, mode="lexical")[0]
        assert loaded == [] and not s.encoder_loaded
        assert s.search("volcano", 3)[0]  # the first dense search loads it, once
        s.search("lava", 3, mode="hybrid")
        assert loaded == ["hash-test"]
    with Searcher(sample_index, loader=Loader(), load_encoder=True):
        assert loaded == ["hash-test", "hash-test"]
    with Searcher(sample_index, loader=Loader(), load_encoder=False) as s:
        assert s.search("volcano", 3, mode="lexical")[0]
        with pytest.raises(UsageError, match="opened with load_encoder=False"):
            s.search("volcano", 3)
    assert loaded == ["hash-test", "hash-test"]


def test_version_changes_with_each_publish(cli, sample_index, tmp_path):
    first = Searcher(sample_index, load_encoder=False, load_lexical=True)
    assert first.version == index_version(sample_index) and len(first.version) == 16
    assert cli("index", SAMPLE / "passages.jsonl", "-o", sample_index).exit_code == 0  # same corpus, new publish
    assert index_version(sample_index) != first.version
    second = Searcher(sample_index, load_encoder=False)
    assert second.version == index_version(sample_index)
    # The old Searcher still answers from the version it opened, until it is closed.
    assert first.search("volcano", 3, mode="lexical")[0]
    first.close()
    with pytest.raises(DsearchError, match="closed"):
        first.search("volcano", 3, mode="lexical")
    second.close()


# --- errors: typed, one line, saying what is wrong ----------------------------------------------------------


def test_missing_index_is_an_index_dir_error(tmp_path):
    with pytest.raises(IndexDirError, match="not a dsearch index"):
        Searcher(tmp_path / "nothing-here")


def test_dimension_mismatch_is_a_model_error(sample_index):
    with pytest.raises(ModelError, match="makes 32-d vectors but the index holds 64-d ones"):
        Searcher(sample_index, encoder=HashingEncoder(dim=32))

    class Loader:
        def load_encoder(self, name, **options):
            return HashingEncoder(name, dim=16)

        query_encoder = None

    s = Searcher(sample_index, model="other", loader=Loader())  # lazy: the model is loaded at the first search
    with pytest.raises(ModelError, match="16-d vectors"):
        s.search("volcano")
    assert s.search("volcano", mode="lexical")[0]  # the index itself is fine


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"mode": "sparse"}, UsageError, "unknown mode 'sparse'; choose one of dense, lexical, hybrid"),
        ({"alpha": 1.5}, UsageError, "alpha 1.5 is not a weight between 0 and 1"),
        ({"mode": "lexical", "alpha": 0.5}, UsageError, "it does not go with mode lexical"),
        ({"where": "yeer > 2020"}, UsageError, "unknown field 'yeer'"),
        ({"where": "topic = "}, UsageError, "topic = "),
        ({"min_score": float("nan")}, UsageError, "min_score nan is not a finite number"),
        ({"nprobe": 0}, UsageError, "nprobe must be a whole number of at least 1"),
    ],
)
def test_bad_options_are_typed_errors(sample_index, options, error, message):
    with searcher(sample_index) as s, pytest.raises(error) as raised:
        s.search("volcano", **options)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_bad_queries_and_vectors_are_usage_errors(sample_index):
    with searcher(sample_index) as s:
        with pytest.raises(UsageError, match="query 2 is empty"):
            s.search(["volcano", "  "])
        with pytest.raises(UsageError, match="k must be a whole number of at least 1, not 0"):
            s.search("volcano", 0)
        with pytest.raises(UsageError, match=r"vectors has shape \(1, 3\); 2 queries of this index need \(2, 64\)"):
            s.search(["a", "b"], vectors=np.zeros((1, 3)))
        with pytest.raises(ModelError, match="NaN or infinite"):
            s.search(["a"], vectors=np.full((1, 64), np.nan))
        with pytest.raises(InputError, match=r"no passage with this id in the index \(check the id with Searcher.get"):
            s.like("no-such-id")


def test_lexical_mode_on_an_index_without_bm25_says_what_to_do(cli, tmp_path):
    assert cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--no-lexical").exit_code == 0
    with searcher(tmp_path / "idx") as s, pytest.raises(IndexDirError, match="no lexical"):
        s.search("volcano", mode="hybrid")


# (what the Python caller does, the same through the CLI, what the API's message says, what the CLI's says)
NAMED_OPTIONS = [
    (lambda s, d: s.search("volcano", where="  "), ("query", "{idx}", "volcano", "--where", "  "),
     ["where= is empty", "or leave where= out"], ["--where is empty", "or leave --where out"]),
    (lambda s, d: s.search("volcano", where="topic = "), ("query", "{idx}", "volcano", "--where", "topic = "),
     ["where='topic = ': "], ["--where 'topic = ': "]),
    (lambda s, d: s.search("volcano", where="yeer > 1"), ("query", "{idx}", "volcano", "--where", "yeer > 1"),
     ["where: unknown field 'yeer'", "see Searcher.info()['fields']"],
     ["--where: unknown field 'yeer'", "see 'dsearch info DIR'"]),
    (lambda s, d: build_index(d, [], encoder=HashingEncoder()),
     ("index", "/dev/null", "--format", "jsonl", "-o", "{idx}"),
     ["rerun with max_remove=200 or max_remove='100%'"], ["rerun with --max-remove 200 or --max-remove 100%"]),
    (lambda s, d: build_index(d, [], max_remove=3, encoder=HashingEncoder()),
     ("index", "/dev/null", "--format", "jsonl", "-o", "{idx}", "--max-remove", "3"),
     ["max_remove allows 3"], ["--max-remove allows 3"]),
    (lambda s, d: build_index(d, [], max_remove="lots", encoder=HashingEncoder()),
     ("index", "/dev/null", "-o", "{idx}", "--max-remove", "lots"),
     ["max_remove='lots' is not a number"], ["--max-remove 'lots' is not a number"]),
    (lambda s, d: build_index(d, [{"text": "no id"}], encoder=HashingEncoder()), ("index", "{noid}", "-o", "{idx}"),
     ["name it with id_field=, or fix it, or pass skip_bad=True to skip"],
     ["name it with --id-field, or fix it, or pass --skip-bad to skip"]),
    (lambda s, d: build_index(d, SAMPLE / "passages.jsonl", update=True, split=False, encoder=HashingEncoder()),
     ("index", str(SAMPLE / "passages.jsonl"), "-o", "{idx}", "--update", "--no-split"),
     ["cut with split=True, overlap=", "not split=False; rebuild it in full (without update=True)"],
     ["cut with --split --overlap ", "not --no-split; rebuild it in full (without --update)"]),
    (lambda s, d: build_index(d, d.parent / "noid.jsonl.xyz", encoder=HashingEncoder()),
     ("index", "{noid}.xyz", "-o", "{idx}"),
     ["pass fmt= (one of 'jsonl', "], ["pass --format (jsonl|"]),
    (lambda s, d: s.like("nope"), ("query", "{idx}", "--like", "nope"),
     ["check the id with Searcher.get()"], ["check the id with 'dsearch get'"]),
]  # fmt: skip


@pytest.mark.parametrize(("call", "args", "api_says", "cli_says"), NAMED_OPTIONS)
def test_library_errors_name_the_api_parameter_or_the_cli_flag(cli, sample_index, tmp_path, call, args, api_says,
                                                               cli_says):
    """One library error, two readers: a Python caller reads ``max_remove=``, a shell user ``--max-remove``."""
    noid = tmp_path / "noid.jsonl"
    noid.write_text('{"text": "no id"}\n')
    (tmp_path / "noid.jsonl.xyz").write_text("")
    with searcher(sample_index) as s, pytest.raises(DsearchError) as raised:
        call(s, sample_index)
    message = str(raised.value)
    assert all(words in message for words in api_says), message
    assert "--" not in message and "\x1e" not in message and "\n" not in message
    result = cli(*[a.format(idx=sample_index, noid=noid) for a in args])
    assert result.exit_code == raised.value.exit_code and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("dsearch: error: ") and all(words in line for words in cli_says), line
    # No Python spelling leaks into the CLI's line: no `name=` parameter, no API call.
    assert not re.search(r"(?<![-\w])[a-z_]+=", line) and "Searcher" not in line and "\x1e" not in line, line


def test_an_option_reads_as_a_flag_or_a_parameter():
    import pickle

    from dsearch.errors import option, spell

    err = UsageError(f"{option('split', False)}, {option('max_remove', '100%')}, {option('k', 3)}, "
                     f"{option('where')}, {spell('a', 'b')}")  # fmt: skip
    assert str(err) == "split=False, max_remove='100%', k=3, where=, b"
    assert err.for_cli() == "--no-split, --max-remove 100%, --top-k 3, --where, a"
    assert pickle.loads(pickle.dumps(err)).for_cli() == err.for_cli()  # e.g. from a worker process


def test_an_input_error_survives_pickling_with_both_spellings(tmp_path):
    """InputError takes (where, problem, fix): unpickling it (a build_index run in a process pool, say) called it
    with the message alone, a TypeError in the caller instead of the error."""
    import multiprocessing
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    from dsearch.errors import option

    err = InputError("c.jsonl:3", "missing id field 'id'", f"name it with {option('id_field')}")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is InputError
    assert (str(back), back.for_cli()) == (str(err), err.for_cli())
    assert str(back) == "c.jsonl:3: missing id field 'id' (name it with id_field=)"
    assert back.for_cli() == "c.jsonl:3: missing id field 'id' (name it with --id-field)"
    assert (back.where, back.problem, back.exit_code) == ("c.jsonl:3", "missing id field 'id'", err.exit_code)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "one"}\n{"text": "two"}\n')
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:  # no fork of threads
        future = pool.submit(build_index, tmp_path / "idx", corpus, encoder=HashingEncoder())
        with pytest.raises(InputError) as raised:
            future.result(60)
    assert raised.value.for_cli().startswith(f"{corpus}:2: missing id field")
    assert "--id-field" in raised.value.for_cli() and "id_field=" in str(raised.value)


def test_corrupt_vectors_tell_a_python_caller_to_verify_with_the_searcher(cli, sample_index):
    from test_query_contract import QUERY, corrupt_vector, top_dims

    corrupt_vector(sample_index, "astronomy-04", top_dims(QUERY)[0], 4.01)
    with searcher(sample_index) as s, pytest.raises(IndexDirError, match="corrupt") as raised:
        s.search(QUERY, 1)
    assert f"(check with Searcher({str(sample_index)!r}, verify=True), then rebuild the index)" in str(raised.value)
    result = cli("query", sample_index, QUERY, "-k", "1")
    assert f"(check with 'dsearch status {sample_index}' or 'dsearch info --verify {sample_index}', then" in (
        result.stderr
    )


def test_query_objects_keep_their_ids(sample_index):
    with searcher(sample_index) as s:
        [hits] = s.search([Query("q-7", "volcano")], 2)
        keep = s.search([Query("astronomy-01", SUN)], 3)[0]
        drop = s.search([Query("astronomy-01", SUN)], 3, exclude_self=True)[0]
    assert [h.qid for h in hits] == ["q-7", "q-7"]
    assert keep[0].id == "astronomy-01" and "astronomy-01" not in [h.id for h in drop] and len(drop) == 3


def test_a_corrupt_index_is_refused_on_opening(sample_index, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sample_index, broken)
    (broken / "manifest.json").write_text("{")
    with pytest.raises(IndexDirError, match="not valid JSON"):
        Searcher(broken)


# --- build_index ------------------------------------------------------------------------------------------


def sample_records() -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / "passages.jsonl").read_text().splitlines()]


def stored(directory: Path) -> tuple[list[dict], np.ndarray]:
    from dsearch.store import OpenIndex

    index = OpenIndex(directory)
    rows = [
        {k: row[k] for k in ("id", "title", "text", "fields", "content_hash", "window_start", "window_end")}
        for row in index.iter_rows()
    ]
    return rows, index.vectors_at(list(range(index.rows)))


def test_building_from_dicts_equals_building_from_the_jsonl_file(tmp_path):
    from dsearch.api import build_index

    from_file = build_index(tmp_path / "file", SAMPLE / "passages.jsonl", encoder=HashingEncoder())
    from_dicts = build_index(tmp_path / "dicts", iter(sample_records()), encoder=HashingEncoder())
    file_rows, file_vectors = stored(tmp_path / "file")
    dict_rows, dict_vectors = stored(tmp_path / "dicts")
    assert dict_rows == file_rows and len(dict_rows) == 200
    assert np.array_equal(dict_vectors, file_vectors)
    assert (from_dicts.indexed, from_dicts.windows, from_dicts.encoded) == (200, 200, 200)
    assert (from_file.indexed, from_file.encoded) == (200, 200)
    # The same answers, through the same Searcher.
    with searcher(tmp_path / "file") as a, searcher(tmp_path / "dicts") as b:
        assert [h.id for h in a.search("volcano lava", 5)[0]] == [h.id for h in b.search("volcano lava", 5)[0]]
        assert b.search("volcano", 3, where="topic = 'geography'")[0]  # fields are filterable


def test_build_from_a_path_and_from_passage_objects(cli, tmp_path):
    from dsearch.api import build_index
    from dsearch.corpus import Passage

    summary = build_index(str(tmp_path / "a"), str(SAMPLE / "passages.jsonl"), encoder=HashingEncoder())
    assert summary.indexed == 200 and summary.index == str(tmp_path / "a")
    passages = [Passage("p1", "Lava flows from the volcano", "Volcano", fields={"year": 2020}),
                Passage("p2", "Bread rises with yeast")]  # fmt: skip
    build_index(tmp_path / "b", passages, encoder=HashingEncoder())
    with searcher(tmp_path / "b") as s:
        [hit] = s.search("volcano", 1)[0]
        assert (hit.id, hit.title, hit.fields, hit.source) == ("p1", "Volcano", {"year": 2020}, "passages")
        assert [h.id for h in s.search("bread", 5, where="year IS NULL")[0]] == ["p2"]
    status = cli("status", tmp_path / "b")  # passages from a program, like stdin: nothing to compare with later
    assert status.exit_code == 0 and status.stdout.startswith("ok"), status.stdout + status.stderr


def test_update_from_a_generator_encodes_only_what_changed(tmp_path):
    from dsearch.api import build_index

    records = sample_records()
    build_index(tmp_path / "idx", records, encoder=HashingEncoder())
    changed = [dict(r) for r in records[:150]]  # 50 removed
    changed[0]["text"] += " Updated."  # re-encoded
    changed[1]["topic"] = "other"  # metadata only
    changed.append({"_id": "new-1", "text": "A brand new passage about comets."})
    encoder = HashingEncoder()
    summary = build_index(tmp_path / "idx", (r for r in changed), update=True, encoder=encoder)
    assert (summary.added, summary.updated, summary.metadata_only, summary.removed) == (1, 1, 1, 50)
    assert summary.encoded == encoder.encoded_documents == 2 and summary.indexed == 151
    rebuilt = build_index(tmp_path / "fresh", changed, encoder=HashingEncoder())
    assert rebuilt.indexed == 151
    updated_rows, updated_vectors = stored(tmp_path / "idx")
    fresh_rows, fresh_vectors = stored(tmp_path / "fresh")
    assert updated_rows == fresh_rows and np.array_equal(updated_vectors, fresh_vectors)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"text": "no id"}, "passages[2]: missing id field '_id/id/docid/doc_id/pid'"),
        ({"_id": "x", "text": 5}, "passages[2]: text field 'text' is not a string"),
        ({"_id": "", "text": "empty id"}, "passages[2]: empty id in field '_id'"),
        ({"_id": "astronomy-01", "text": "again"}, "passages[2]: duplicate id 'astronomy-01'"),
        ({"_id": "s", "text": "lone \ud800 surrogate"}, "passages[2]: holds text that is not valid Unicode"),
        ("just a string", "passages[2]: a str, not a mapping with an id and a text"),
    ],
)
def test_bad_passages_raise_input_errors_and_publish_nothing(tmp_path, bad, message):
    from dsearch.api import build_index

    records = sample_records()[:2] + [bad] + sample_records()[2:5]
    with pytest.raises(InputError) as raised:
        build_index(tmp_path / "idx", records, encoder=HashingEncoder())
    assert str(raised.value).startswith(message)
    assert not (tmp_path / "idx" / "manifest.json").exists()
    summary = build_index(tmp_path / "idx", records, encoder=HashingEncoder(), skip_bad=True)
    assert (summary.indexed, summary.skipped_bad) == (5, 1)


def test_build_refuses_to_wipe_an_index_with_an_empty_iterable(tmp_path):
    from dsearch.api import build_index
    from dsearch.errors import TooManyRemovedError

    build_index(tmp_path / "idx", sample_records(), encoder=HashingEncoder())
    before = index_version(tmp_path / "idx")
    with pytest.raises(TooManyRemovedError, match="refusing to remove 200"):
        build_index(tmp_path / "idx", [], encoder=HashingEncoder())
    with pytest.raises(TooManyRemovedError):
        build_index(tmp_path / "idx", iter([]), update=True, encoder=HashingEncoder())
    assert index_version(tmp_path / "idx") == before
    with pytest.raises(UsageError, match="unknown precision 'fp8'"):
        build_index(tmp_path / "idx", sample_records(), precision="fp8", encoder=HashingEncoder())


def test_a_locked_index_is_a_locked_error_and_stays_searchable(sample_index):
    import dsearch
    from dsearch.store import index_lock

    with index_lock(sample_index), pytest.raises(dsearch.LockedError, match="another dsearch run") as raised:
        build_index(sample_index, sample_records(), encoder=HashingEncoder())
    assert raised.value.exit_code == 4
    with searcher(sample_index) as s:  # readers never wait for the lock
        assert s.search("volcano", 1)[0]


def test_an_interrupted_build_publishes_nothing_and_the_next_resumes(tmp_path, monkeypatch):
    """Ctrl-C in a program is its KeyboardInterrupt (the CLI turns it into exit 3) and publishes nothing. The next
    build_index of the same corpus file resumes from the checkpoint (``on_resume`` hears where, ``progress`` the
    rest); passages from an iterable cannot be read again, so their next build starts over. Both equal a build
    that was never interrupted."""
    monkeypatch.setenv("DSEARCH_CHECKPOINT_SECONDS", "0")
    corpus = SAMPLE / "passages.jsonl"
    build_index(tmp_path / "fresh", corpus, batch_size=4, encoder=HashingEncoder())
    for name, passages, resumes in (("file", corpus, True), ("iterable", sample_records(), False)):
        with pytest.raises(KeyboardInterrupt):
            build_index(tmp_path / name, passages, batch_size=4, encoder=HashingEncoder(fail_after_batches=3))
        assert not (tmp_path / name / "manifest.json").exists()
        resumed_at: list[int] = []
        written: list[int] = []
        encoder = HashingEncoder()
        summary = build_index(tmp_path / name, passages, batch_size=4, encoder=encoder,
                              on_resume=resumed_at.append, progress=written.append)  # fmt: skip
        assert (0 < summary.resumed_at < 200) is resumes, (name, summary.resumed_at)
        assert resumed_at == ([summary.resumed_at] if resumes else [])
        assert summary.indexed == 200 and summary.encoded == encoder.encoded_documents == 200 - summary.resumed_at
        assert sum(written) == 200 - summary.resumed_at
        (rows, vectors), (fresh_rows, fresh_vectors) = stored(tmp_path / name), stored(tmp_path / "fresh")
        assert rows == fresh_rows and np.array_equal(vectors, fresh_vectors)


def test_iter_search_reads_queries_only_as_far_as_it_answers(sample_index):
    from dsearch.search import SearchStats

    read: list[int] = []

    def queries():
        for number, text in enumerate(QUERIES):
            read.append(number)
            yield text

    stats = SearchStats()
    with searcher(sample_index) as s:
        with pytest.raises(UsageError, match="unknown mode"):
            s.iter_search(queries(), 3, mode="fuzzy")  # options are checked before any query is read
        assert read == []
        answers = s.iter_search(queries(), 3, mode="hybrid", stats=stats)
        query, hits = next(answers)
        assert (query.qid, query.text) == ("1", QUERIES[0]) and len(hits) == 3
        assert [[h.to_dict() for h in found] for _, found in [(query, hits), *answers]] == [
            [h.to_dict() for h in found] for found in s.search(QUERIES, 3, mode="hybrid")
        ]
    assert read == list(range(len(QUERIES))) and stats.queries == len(QUERIES)


def test_resolve_mode_allowed_rows_and_verify(sample_index, tmp_path):
    with searcher(sample_index, verify=True) as s:
        assert [s.resolve_mode(), s.resolve_mode(alpha=0.5), s.resolve_mode("lexical")] == ["dense", "hybrid",
                                                                                              "lexical"]
        mask = s.allowed_rows("topic = 'astronomy'")
        assert mask.dtype == bool and mask.shape == (s.rows,) and 0 < mask.sum() < s.rows
        assert s.allowed_rows("topic = 'astronomy'") is mask and s.allowed_rows(None) is None  # kept for reuse
        topics = {h.fields["topic"] for h in s.search("planet", 50, where="topic = 'astronomy'")[0]}
        assert topics == {"astronomy"} and mask.sum() == len(s.search("planet", 200, where="topic = 'astronomy'")[0])
    broken = tmp_path / "broken"
    shutil.copytree(sample_index, broken)
    [vectors] = broken.glob("seg-*/index.faiss")
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only a checksum tells
    vectors.write_bytes(bytes(data))
    Searcher(broken, load_encoder=False).close()
    with pytest.raises(IndexDirError, match="does not match the manifest"):
        Searcher(broken, verify=True, load_encoder=False)


# --- the public surface -----------------------------------------------------------------------------------


def test_import_dsearch_stays_light():
    """``import dsearch`` and the API's names load no model stack: no torch, FAISS, ONNX Runtime, DuckDB or Ray."""
    import subprocess
    import sys

    heavy = ("torch", "faiss", "onnxruntime", "duckdb", "ray", "sentence_transformers", "transformers")
    code = (
        "import sys, dsearch; first = set(sys.modules); "
        "from dsearch import Searcher, build_index, Hit, Query, BuildSummary, DsearchError; "
        f"heavy = {heavy!r}; "
        "print(sorted(m for m in first if m.split('.')[0] in heavy + ('numpy', 'pyarrow'))); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["[]", "[]"], result.stdout + result.stderr


def test_every_public_name_resolves_is_documented_and_typed():
    import inspect

    import dsearch

    assert dsearch.__all__[0] == "__version__" and dsearch.__version__ == "0.1.0"
    assert set(dsearch.__all__) == {"__version__", *dsearch._EXPORTS}
    assert set(dsearch.__all__) <= set(dir(dsearch))
    for name in dsearch.__all__[1:]:
        value = getattr(dsearch, name)
        doc = value.__doc__ or ""
        assert doc.strip() and not doc.startswith(f"{name}("), f"{name} has no docstring of its own"
        callables = [value] if inspect.isfunction(value) else [
            member for member_name, member in vars(value).items()
            if inspect.isfunction(member) and (not member_name.startswith("_") or member_name == "__init__")
        ]  # fmt: skip
        for function in callables:
            signature = inspect.signature(function)
            where = f"{name}.{function.__name__}"
            assert signature.return_annotation is not inspect.Signature.empty, f"{where} has no return type"
            for parameter in signature.parameters.values():
                if parameter.name != "self":
                    assert parameter.annotation is not inspect.Parameter.empty, f"{where}({parameter.name}) untyped"
    assert issubclass(dsearch.UsageError, dsearch.DsearchError) and dsearch.Searcher.__module__ == "dsearch.api"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dsearch.nothing  # noqa: B018
    assert (Path(dsearch.__file__).parent / "py.typed").is_file()


def test_the_readme_lists_exactly_the_public_names():
    import re

    from conftest import ROOT

    import dsearch

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    section = section[: section.index("\n## ", 1)]
    promise = section[section.index("**What is public") :]
    listed = re.findall(r"`(\w+)`", promise[: promise.index("with\nthe arguments")])
    assert listed == [name for name in dsearch.__all__ if name != "__version__"] + ["__version__"]


def test_in_memory_vectors_give_the_same_hits(sample_index):
    with searcher(sample_index) as mapped, searcher(sample_index, in_memory=True, load_lexical=True) as held:
        assert all(segment.vectors.in_memory for segment in held._index.segments)
        assert not any(segment.vectors.in_memory for segment in mapped._index.segments)
        for options in ({}, {"mode": "hybrid"}, {"where": "topic = 'astronomy'", "min_score": 0.1}):
            assert [[h.to_dict() for h in hits] for hits in held.search(QUERIES, 8, **options)] == [
                [h.to_dict() for h in hits] for hits in mapped.search(QUERIES, 8, **options)
            ]
        like = [h.to_dict() for h in held.like("astronomy-01", 5)]
        assert like == [h.to_dict() for h in mapped.like("astronomy-01", 5)] and len(like) == 5


# --- threads ------------------------------------------------------------------------------------------------


def test_one_searcher_answers_many_threads_as_it_answers_one(tmp_path, monkeypatch):
    """Threads hammering one Searcher in every mode get exactly the serial answers (the BM25 stemmer, the Parquet
    row-group cache and reader, the where-mask cache and the lazy loads are shared by all of them)."""
    import random
    import threading

    from dsearch import store

    # Many small row groups and a small cache: lookups from different threads evict each other's groups.
    monkeypatch.setattr(store, "ROW_GROUP_SIZE", 7)
    monkeypatch.setattr(store, "GROUP_CACHE_SIZE", 3)
    rng = random.Random(14)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vi", "so", "pe", "du", "ing", "ed", "ness", "ly", "ation"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(3000)})
    records = [{"id": f"p{i}", "text": " ".join(rng.choices(words, k=30)), "n": i % 10} for i in range(400)]
    build_index(tmp_path / "idx", records, encoder=HashingEncoder())
    # Every query brings words the stemmer has not seen (its cache would otherwise answer most of them).
    queries = [" ".join(rng.choices(words, k=12)) for _ in range(40)]
    modes = [{}, {"mode": "lexical"}, {"mode": "hybrid"}, {"alpha": 0.4}, {"mode": "lexical", "where": "n < 5"},
             {"where": "n >= 3 AND n <> 7"}, {"mode": "hybrid", "where": "n IN (1, 2, 8)"}]  # fmt: skip
    with searcher(tmp_path / "idx") as serial:
        expected = {i: [[h.to_dict() for h in hits] for hits in serial.search(queries, 10, **m)]
                    for i, m in enumerate(modes)}  # fmt: skip
    assert all(any(hits for hits in results) for results in expected.values())
    failures: list[BaseException] = []
    mismatches: list[tuple[int, int]] = []
    start = threading.Barrier(8)
    with searcher(tmp_path / "idx") as shared:  # lazy BM25 open and masks: first built under contention

        def hammer(seed: int) -> None:
            order = [(m, q) for m in range(len(modes)) for q in range(len(queries))]
            random.Random(seed).shuffle(order)
            try:
                start.wait()
                for m, q in order[: len(order) // 2]:
                    [hits] = shared.search([queries[q]], 10, **modes[m])
                    if [h.to_dict() for h in hits] != [{**h, "qid": "1"} for h in expected[m][q]]:
                        mismatches.append((m, q))
            except BaseException as exc:  # noqa: BLE001 (reported below, with the others)
                failures.append(exc)

        threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]
    assert not mismatches, mismatches[:10]


def test_threads_keep_their_own_nprobe_on_a_wrapped_ivf(tmp_path):
    """A FAISS factory that wraps its IVF (OPQ here) takes nprobe as a setting on the shared index: threads asking
    for different nprobe each get the answer that nprobe gives alone."""
    import random
    import threading

    rng = random.Random(7)
    words = [f"w{i}" for i in range(300)]
    records = [{"id": f"p{i}", "text": " ".join(rng.choices(words, k=12))} for i in range(600)]
    build_index(tmp_path / "idx", records, encoder=HashingEncoder(), index_type="OPQ8,IVF16,PQ8", lexical=False)
    queries = [" ".join(rng.choices(words, k=6)) for _ in range(30)]
    with searcher(tmp_path / "idx") as s:
        assert s.info()["index_params"]["factory"] == "OPQ8,IVF16,PQ8"
        vectors = s.encode_queries(queries)
        expected = {n: [[h.id for h in hits] for hits in s.search(queries, 10, nprobe=n, vectors=vectors)]
                    for n in (1, 16)}  # fmt: skip
        assert expected[1] != expected[16], "the test needs nprobe to matter"
        mismatches: list[int] = []
        failures: list[BaseException] = []
        start = threading.Barrier(6)

        def hammer(nprobe: int) -> None:
            try:
                start.wait()
                for round in range(150):
                    at = round % 6 * 5  # 5 queries a call: many calls, each setting its nprobe
                    hits = s.search(queries[at : at + 5], 10, nprobe=nprobe, vectors=vectors[at : at + 5])
                    if [[h.id for h in found] for found in hits] != expected[nprobe][at : at + 5]:
                        mismatches.append(nprobe)
            except BaseException as exc:  # noqa: BLE001 (reported below)
                failures.append(exc)

        threads = [threading.Thread(target=hammer, args=(n,)) for n in (1, 16) * 3]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]
    assert not mismatches, mismatches[:5]


def _factory_index(cli, tmp_path, factory: str, seed: int, passages: int, vocabulary: int, queries: int) -> list:
    """An index at tmp_path/idx of random word passages (a field n = row % 10) built with a FAISS factory
    string; returns random queries over the same words."""
    import random

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocabulary)]
    records = [{"id": f"p{i}", "text": " ".join(rng.choices(words, k=12)), "n": i % 10} for i in range(passages)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    built = cli("index", corpus, "-o", tmp_path / "idx", "--index-type", factory, "--no-lexical", "-q")
    assert built.exit_code == 0, built.stderr
    return [" ".join(rng.choices(words, k=6)) for _ in range(queries)]


@pytest.mark.parametrize("factory", ["OPQ8,IVF16,PQ8", "IVF16,PQ8,RFlat", "PCA32,IVF16,PQ8,RFlat"])
def test_where_on_a_factory_index_that_wraps_its_ivf(tmp_path, cli, factory):
    """--where on an IVF wrapped in a transform (OPQ, PCA) or a refine stage (RFlat), from a FAISS factory string:
    FAISS refused the plain selector parameters handed to the wrapper ('IndexIVF params have incorrect type', an
    unexpected error); the filter and nprobe travel to the IVF inside, per call, and every hit passes the filter."""
    queries = _factory_index(cli, tmp_path, factory, seed=7, passages=600, vocabulary=300, queries=10)
    with searcher(tmp_path / "idx") as s:
        for nprobe in (None, 1, 16):
            answers = s.search(queries, 10, where="n < 3", nprobe=nprobe)
            # all lists hold 10 allowed passages for each query; one list of 16 may hold fewer (IVF's own limit)
            assert all(len(hits) == 10 if nprobe == 16 else 0 < len(hits) <= 10 for hits in answers)
            assert {int(h.id[1:]) % 10 for hits in answers for h in hits} <= {0, 1, 2}
        # nprobe still reaches the IVF inside: all 16 lists find each query's best allowed passage by its
        # exact score (re-ranked), which one list alone misses for some query
        full = [[h.id for h in hits] for hits in s.search(queries, 10, where="n < 3", nprobe=16)]
        one = [[h.id for h in hits] for hits in s.search(queries, 10, where="n < 3", nprobe=1)]
        assert full != one
    result = cli("query", tmp_path / "idx", queries[0], "--where", "n < 3", "--format", "jsonl")
    assert (result.exit_code, result.stderr) == (0, "")
    assert [int(json.loads(line)["id"][1:]) % 10 < 3 for line in result.stdout.splitlines()] == [True] * 10


def test_a_slow_model_load_holds_up_no_lexical_or_filtered_search(sample_index):
    """The first dense search loads the model (seconds for a real one); meanwhile other threads' lexical searches,
    BM25 open and where masks must go on, not wait for the load behind the same lock."""
    import threading

    loading, release = threading.Event(), threading.Event()

    class SlowLoader:
        def load_encoder(self, name, **options):
            raise AssertionError("the index's own model is loaded with query_encoder")

        def query_encoder(self, model, **options):
            loading.set()
            assert release.wait(30)
            return HashingEncoder(model.name)

    with Searcher(sample_index, loader=SlowLoader()) as s:
        dense = threading.Thread(target=lambda: s.search("volcano", 3))
        dense.start()
        try:
            assert loading.wait(30)
            answers: list = []
            other = threading.Thread(
                target=lambda: answers.append(s.search("volcano", 3, mode="lexical", where="id <> 'x'")[0])
            )
            other.start()
            other.join(20)
            finished = not other.is_alive()
        finally:
            release.set()
            dense.join(30)
        other.join(30)
        assert finished, "a lexical search with a filter waited for the model to load"
        assert answers and answers[0] and s.encoder_loaded


@pytest.mark.parametrize("factory", ["PCA32,HNSW16", "HNSW16,RFlat"])
def test_ef_reaches_an_hnsw_wrapped_in_a_factory_index(tmp_path, cli, factory):
    """An HNSW inside a transform (PCA) or a refine stage, from a FAISS factory string: the build tunes its
    efSearch as it does a plain HNSW's, and --ef (with or without --where) reaches the graph inside. It used to be
    ignored there: every search ran at FAISS's default efSearch whatever --ef said."""
    queries = _factory_index(cli, tmp_path, factory, seed=11, passages=1500, vocabulary=400, queries=40)
    with searcher(tmp_path / "idx") as s:
        assert "efSearch" in s.info()["index_params"]  # tuned at build time, as for --index-type hnsw
        low = [[h.id for h in hits] for hits in s.search(queries, 10, ef=1)]
        high = [[h.id for h in hits] for hits in s.search(queries, 10, ef=400)]
        assert low != high  # efSearch reaches the graph
        filtered = s.search(queries, 10, where="n < 3", ef=400)
        assert all(len(hits) == 10 for hits in filtered)
        assert {int(h.id[1:]) % 10 for hits in filtered for h in hits} <= {0, 1, 2}
    one = cli("query", tmp_path / "idx", queries[0], "--ef", "1", "--format", "ids")
    many = cli("query", tmp_path / "idx", queries[0], "--ef", "400", "--format", "ids")
    assert (one.exit_code, one.stderr, many.exit_code, many.stderr) == (0, "", 0, "")
    assert len(one.stdout.split()) == len(many.stdout.split()) == 10
