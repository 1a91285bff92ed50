"""dsearch eval: metric values worked out by hand, both file layouts, bad files, the BEIR self-hit rule."""

from __future__ import annotations

import json
import math

import ir_measures
import pytest
from conftest import SAMPLE
from test_cli import one_error_line

from dsearch.errors import InputError, UsageError
from dsearch.evaluate import parse_metrics, read_qrels, score_run


def test_metrics_on_a_hand_made_run():
    qrels = {"q1": {"d1": 1}, "q2": {"d3": 2, "d4": 1}, "q3": {"d9": 1}}
    run = {
        "q1": {"d2": 0.9, "d1": 0.8, "d3": 0.7},  # the relevant passage at rank 2
        "q2": {"d3": 0.9, "d5": 0.8, "d4": 0.7},  # grades 2 and 1 at ranks 1 and 3
        "q3": {"d1": 0.5},  # nothing relevant retrieved
        "q4": {"d1": 0.5},  # no judgements: left out of the means
    }
    means, per_query = score_run(run, qrels, parse_metrics("nDCG@10,RR@10,R@100,P@2"))
    # By hand, with trec_eval's linear gains: DCG = sum(rel / log2(rank + 1)).
    q1_ndcg = (1 / math.log2(3)) / 1
    q2_ndcg = (2 / math.log2(2) + 1 / math.log2(4)) / (2 / math.log2(2) + 1 / math.log2(3))
    assert per_query["q1"]["nDCG@10"] == pytest.approx(q1_ndcg, abs=1e-6)
    assert per_query["q2"]["nDCG@10"] == pytest.approx(q2_ndcg, abs=1e-6)
    assert per_query["q1"]["RR@10"] == pytest.approx(0.5)
    assert set(per_query) == {"q1", "q2", "q3"}
    assert means["nDCG@10"] == pytest.approx((q1_ndcg + q2_ndcg + 0) / 3, abs=1e-6)
    assert means["RR@10"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert means["R@100"] == pytest.approx(2 / 3)
    assert means["P@2"] == pytest.approx((0.5 + 0.5 + 0) / 3)


def test_beir_and_trec_qrels_read_the_same(tmp_path):
    beir = tmp_path / "test.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\nq2\td3\t1\n")
    trec = tmp_path / "qrels.txt"
    trec.write_text("q1 0 d1 1\nq1 0 d2 2\nq2 0 d3 1\n")
    assert read_qrels(str(beir)) == read_qrels(str(trec)) == {"q1": {"d1": 1, "d2": 2}, "q2": {"d3": 1}}


@pytest.mark.parametrize(
    "content,line,problem",
    [
        ("q1 0 d1 1\nq2 d3\n", 2, "expected 'qid docid rel'"),
        ("q1 0 d1 high\n", 1, "not a number"),
        (b"q1 0 d1 1\nq2 0 d\xff 1\n", 2, "not valid UTF-8"),
    ],
)
def test_garbled_qrels_name_file_and_line(tmp_path, content, line, problem):
    path = tmp_path / "qrels.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match=f"{path}:{line}: .*{problem}"):
        read_qrels(str(path))


def test_empty_and_missing_qrels(tmp_path):
    (tmp_path / "empty.tsv").write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(InputError, match="no judgements"):
        read_qrels(str(tmp_path / "empty.tsv"))
    with pytest.raises(InputError, match="cannot read"):
        read_qrels(str(tmp_path / "absent.tsv"))


def test_unknown_metric():
    with pytest.raises(UsageError, match="unknown metric 'nDCG@ten'"):
        parse_metrics("nDCG@ten")


# --- through the command line, with the hashing encoder ------------------------------------------------


def test_eval_json_trec_layout(cli, sample_index):
    result = cli("eval", sample_index, "--queries", SAMPLE / "queries.tsv", "--qrels", SAMPLE / "qrels.txt", "--json")
    assert result.exit_code == 0 and result.stderr == ""
    report = json.loads(result.stdout)
    assert set(report["metrics"]) == {"nDCG@10", "R@100", "RR@10"}
    assert report["queries"] == 12 and report["k"] == 100
    assert all(0 <= v <= 1 for v in report["metrics"].values())
    assert "per_query" not in report


def test_eval_beir_layout_with_run_and_per_query(cli, sample_index, tmp_path):
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        "".join(
            json.dumps({"_id": q, "text": t}) + "\n"
            for q, t in (("1", "tallest volcano Olympus Mons"), ("2", "bread yeast dough"), ("3", "an unjudged query"))
        )
    )
    qrels = tmp_path / "test.tsv"
    qrels.write_text(
        "query-id\tcorpus-id\tscore\n1\tastronomy-04\t1\n2\tcooking-01\t1\n2\tno-such-passage\t1\n4\tcooking-02\t1\n"
    )
    run_file = tmp_path / "run.trec"
    result = cli(
        "eval",
        sample_index,
        "--queries",
        queries,
        "--qrels",
        qrels,
        "--run",
        run_file,
        "--per-query",
        "--json",
        "-k",
        "20",
    )
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["queries"] == 2 and report["queries_without_judgements"] == 1
    assert report["judged_queries_missing"] == 1 and report["judged_ids_missing_from_index"] == 1
    assert set(report["per_query"]) == {"1", "2"}
    assert report["per_query"]["1"]["RR@10"] == 1.0
    assert "1 queries have no judgements" in result.stderr and "not in the index" in result.stderr
    run = list(ir_measures.read_trec_run(str(run_file)))
    assert {r.query_id for r in run} == {"1", "2"} and len(run) == 40


def test_eval_plain_lines_in_a_pipe(cli, sample_index):
    result = cli(
        "eval",
        sample_index,
        "--queries",
        SAMPLE / "queries.tsv",
        "--qrels",
        SAMPLE / "qrels.txt",
        "--metrics",
        "nDCG@10,P@1",
    )
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [(name, scope) for name, scope, _ in lines] == [("nDCG@10", "all"), ("P@1", "all")]
    assert all(0 <= float(value) <= 1 for _, _, value in lines)


def test_self_hits_are_dropped_unless_kept(cli, sample_index, tmp_path):
    passage = json.loads((SAMPLE / "passages.jsonl").read_text().splitlines()[0])
    queries = tmp_path / "q.tsv"
    queries.write_text(f"{passage['_id']}\t{passage['title']} {passage['text']}\n")
    qrels = tmp_path / "qrels.txt"
    qrels.write_text(f"{passage['_id']} 0 astronomy-02 1\n")
    for flags, first in (([], "astronomy-02"), (["--keep-self"], passage["_id"])):
        run_file = tmp_path / "run.trec"
        assert (
            cli(
                "eval", sample_index, "--queries", queries, "--qrels", qrels, "--run", run_file, "-k", "5", *flags
            ).exit_code
            == 0
        )
        ranked = [line.split() for line in run_file.read_text().splitlines()]
        ids = [r[2] for r in ranked]
        assert (passage["_id"] in ids) == bool(flags)
        assert len(ids) == 5
        if flags:
            assert ids[0] == first


def test_eval_bad_files(cli, sample_index, tmp_path):
    garbled = tmp_path / "qrels.txt"
    garbled.write_text("q1 0 cooking-01 1\nthis is not a qrels line at all\n")
    one_error_line(
        cli("eval", sample_index, "--queries", SAMPLE / "queries.tsv", "--qrels", garbled), 1, f"{garbled}:2:"
    )
    one_error_line(
        cli("eval", sample_index, "--queries", tmp_path / "none.tsv", "--qrels", SAMPLE / "qrels.txt"),
        1,
        "none.tsv",
        "cannot read",
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_error_line(cli("eval", sample_index, "--queries", empty, "--qrels", SAMPLE / "qrels.txt"), 1, "no queries")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"_id": "1", "text": "ok"}\n{"_id": "2", "text": \n')
    one_error_line(
        cli("eval", sample_index, "--queries", bad_json, "--qrels", SAMPLE / "qrels.txt"), 1, f"{bad_json}:2:"
    )
    one_error_line(
        cli(
            "eval",
            sample_index,
            "--queries",
            SAMPLE / "queries.tsv",
            "--qrels",
            SAMPLE / "qrels.txt",
            "--metrics",
            "bogus@@",
        ),
        2,
        "unknown metric",
    )


def test_beir_qrels_ids_with_spaces_are_read_by_their_tabs(cli, tmp_path):
    """Ids keep their spaces (README, Input formats) and BEIR's qrels are TSV, but the qrels were split at every
    space: 'q 1<TAB>doc one<TAB>1' was an error (5 columns), so such a collection could not be evaluated."""
    corpus = tmp_path / "corpus.jsonl"
    records = [{"_id": "doc one", "text": "northern lights aurora"}, {"_id": "doc two", "text": "bread dough"}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    index = tmp_path / "idx"
    assert cli("index", corpus, "-o", index).exit_code == 0
    queries = tmp_path / "queries.tsv"
    queries.write_text("q 1\tnorthern lights\nq 2\tbread dough\n")
    qrels = tmp_path / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq 1\tdoc one\t1\nq 2\tdoc two\t1\r\n")
    assert read_qrels(str(qrels)) == {"q 1": {"doc one": 1}, "q 2": {"doc two": 1}}
    result = cli("eval", index, "--queries", queries, "--qrels", qrels, "--metrics", "R@1", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["metrics"] == {"R@1": 1.0} and report["judged_ids_missing_from_index"] == 0
    # TREC qrels separated by tabs read as they did
    trec = tmp_path / "qrels.txt"
    trec.write_text("q1\t0\td1\t1\n")
    assert read_qrels(str(trec)) == {"q1": {"d1": 1}}
