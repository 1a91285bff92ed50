"""The first run: the model export is announced (stderr, -v log line, nothing under -q) and kept out of the rate."""

from __future__ import annotations

import logging
import re

import pytest
from conftest import SAMPLE, Runner
from fakes import HashingEncoder

from dsearch import cli

NOTICE = "preparing the model for fast inference, once per model"
TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d dsearch INFO: ")


def announcing_encoder(name, **options):
    """A fake model load that has a slow one-off step to announce, as the lean export does."""
    logging.getLogger("dsearch.notice").info("doing something slow, once")
    return HashingEncoder(name)


@pytest.mark.parametrize(
    "flags, expected",
    [
        ((), ["dsearch: doing something slow, once"]),
        (("-q",), []),
        (("-v",), ["doing something slow, once"]),
    ],
)
def test_notices_show_on_stderr_as_a_log_line_under_v_and_not_under_q(capsys, tmp_path, flags, expected):
    run = Runner(capsys, announcing_encoder)
    result = run("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", *flags)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    shown = [line for line in result.stderr.splitlines() if "slow, once" in line]
    if "-v" in flags:
        assert len(shown) == 1 and TIMESTAMPED.match(shown[0]) and shown[0].endswith(expected[0])
    else:
        assert shown == expected
    if "-q" in flags:
        assert result.stderr == ""


def test_the_notice_logger_is_restored_after_a_run(sample_index):
    # After the run, notices inherit from "dsearch" again (a query's export logs under -v): no stray handler.
    notices = logging.getLogger("dsearch.notice")
    assert notices.handlers == [] and notices.propagate and notices.level == logging.NOTSET


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_rate_counts_from_the_first_encoded_chunk(monkeypatch):
    """10 s of model loading before the first chunk must not dilute passages/s."""
    clock = iter([0.0, 10.0, 21.0])
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(cli.SETTINGS, "quiet", False)
    captured = Lines()
    monkeypatch.setattr(cli.log, "handlers", [captured])  # what -v sets up, minus the stderr stream
    monkeypatch.setattr(cli.log, "level", logging.INFO)
    progress = cli._Progress(None)  # stderr is not a terminal here: -v log lines, no bar
    try:
        progress.advance(256)  # t=10: the first chunk, after loading the model
        progress.advance(256)  # t=21: 256 more in 11 s
    finally:
        progress.close()
    assert captured.lines == ["encoded 256 passages", "encoded 512 passages (23.3 passages/s)"]  # 256/11, not 512/21


@pytest.mark.slow
def test_the_first_export_is_announced_once(capsys, tmp_path, monkeypatch, tiny_seed_model):
    from dsearch.cli import default_load_encoder

    monkeypatch.setenv("DSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    run = Runner(capsys, default_load_encoder)
    common = ("--model", tiny_seed_model, "--precision", "fp32")

    quiet = run("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "a", *common, "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""

    monkeypatch.setenv("DSEARCH_CACHE_DIR", str(tmp_path / "cache2"))
    first = run("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "b", *common)
    assert first.exit_code == 0, first.stderr
    assert first.stderr.splitlines().count(f"dsearch: {NOTICE}") == 1
    assert first.stdout == ""

    again = run("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "c", *common)
    assert again.exit_code == 0, again.stderr
    assert NOTICE not in again.stderr  # the export is cached now

    monkeypatch.setenv("DSEARCH_CACHE_DIR", str(tmp_path / "cache3"))
    verbose = run("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "d", *common, "-v")
    assert verbose.exit_code == 0, verbose.stderr
    [line] = [line for line in verbose.stderr.splitlines() if NOTICE in line]
    assert TIMESTAMPED.match(line)

