"""index's closing summary on stderr is read by people: counts in proper English."""

from __future__ import annotations


def test_summary_says_1_passage(cli, tmp_path):
    corpus = tmp_path / "one.jsonl"
    corpus.write_text('{"id": "a", "text": "the only passage"}\n')
    first = cli("index", corpus, "-o", tmp_path / "idx")
    assert first.exit_code == 0, first.stderr
    assert first.stderr.startswith(f"indexed 1 passage into {tmp_path / 'idx'} in ")
    corpus.write_text('{"id": "a", "text": "the only passage"}\n{"id": "b", "text": "and another"}\n')
    update = cli("index", corpus, "-o", tmp_path / "idx", "--update")
    assert update.exit_code == 0, update.stderr
    assert "1 added, 0 updated, 0 metadata-only, 1 unchanged, 0 removed; 2 passages; encoded 1 in" in update.stderr
    corpus.write_text('{"id": "b", "text": "and another"}\n')
    shrink = cli("index", corpus, "-o", tmp_path / "idx", "--update")
    assert shrink.exit_code == 0, shrink.stderr
    assert "0 added, 0 updated, 0 metadata-only, 1 unchanged, 1 removed; 1 passage; encoded 0 in" in shrink.stderr


def test_passages_per_second_leaves_out_loading_the_model(capsys, tmp_path):
    """A first run's model load (ONNX export: seconds) is not encoding: the rate counts encoding alone."""
    import json
    import time

    from conftest import SAMPLE, Runner
    from fakes import HashingEncoder

    def slow_load(name, **options):
        time.sleep(1.5)
        return HashingEncoder(name)

    result = Runner(capsys, slow_load)("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["seconds"] >= 1.5  # the wall time does include the load
    assert summary["passages_per_second"] > summary["encoded"] / 1.5  # the rate does not
