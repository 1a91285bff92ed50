"""Every --help reads as a person wrote it: metavars, not Python types; nothing cut short; defaults that are true."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from dsearch.corpus import DEFAULT_ID_FIELDS, DEFAULT_TEXT_FIELDS, DEFAULT_TITLE_FIELDS

COMMANDS = ["index", "query", "get", "info", "status", "eval", "reindex", "serve"]
# What leaks from the machinery: typer's type labels (<str>, <list[str]>, <int range>), its {required} braces,
# click's range notes (x>=1), counters' [default: 0], and summaries cut with "..." after a word.
LEAKS = [
    re.compile(r"<[a-z]"),
    re.compile(r"\{"),
    re.compile(r"list\["),
    re.compile(r"int range"),
    re.compile(r"\bx[<>]="),
    re.compile(r"default: 0\]"),
    re.compile(r"[a-z,]\.\.\."),
]


def help_text(cli, monkeypatch, columns: int, *command: str) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    result = cli(*command, "--help")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


@pytest.mark.parametrize("columns", [80, 160])
@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help_has_no_leaks(cli, monkeypatch, columns, command):
    text = help_text(cli, monkeypatch, columns, *command)
    assert text.startswith(f"Usage: dsearch {' '.join(command)}".rstrip() + " [OPTIONS]")
    for leak in LEAKS:
        assert not leak.search(text), f"{leak.pattern!r} in dsearch {' '.join(command)} --help:\n{text}"
    assert max(len(line) for line in text.splitlines()) <= columns


@pytest.mark.parametrize("columns", [80, 160])
def test_top_level_summaries_are_whole_sentences(cli, monkeypatch, columns):
    text = help_text(cli, monkeypatch, columns)
    listed = {line.split()[0]: line for line in text.split("Commands:")[1].splitlines() if line.strip()}
    assert sorted(listed) == sorted(COMMANDS)
    for line in listed.values():
        assert line.rstrip().endswith((".", ")")), line


@pytest.mark.parametrize(
    "command, usage",
    [
        ("index", "Usage: dsearch index [OPTIONS] CORPUS... -o DIR"),
        ("query", "Usage: dsearch query [OPTIONS] DIR [QUERY]..."),
        ("info", "Usage: dsearch info [OPTIONS] DIR"),
        ("status", "Usage: dsearch status [OPTIONS] DIR"),
        ("eval", "Usage: dsearch eval [OPTIONS] DIR --queries FILE --qrels FILE"),
        ("serve", "Usage: dsearch serve [OPTIONS] DIR..."),
    ],
)
def test_usage_lines_match_the_readme(cli, monkeypatch, command, usage):
    assert help_text(cli, monkeypatch, 160, command).splitlines()[0] == usage


def test_index_help_names_its_output_option_and_the_detected_fields(cli, monkeypatch):
    text = " ".join(help_text(cli, monkeypatch, 160, "index").split())
    assert "at DIR" not in text.replace("at -o DIR", "")  # index has no DIR argument: it writes to -o DIR
    assert "-o, --output DIR" in text
    # The defaults listed are the ones corpus.py really tries, in its order.
    assert f"the first of {', '.join(DEFAULT_ID_FIELDS)}" in text
    assert f"the first of {', '.join(DEFAULT_TEXT_FIELDS)}" in text
    assert f"[default: {DEFAULT_TITLE_FIELDS[0]}]" in text


@pytest.mark.parametrize("command", ["query", "eval"])
def test_query_side_model_defaults_to_the_index_model(cli, monkeypatch, command):
    text = " ".join(help_text(cli, monkeypatch, 160, command).split())
    model_help = text.split("--model NAME|PATH")[1].split(" --")[0]
    assert "bundled" not in model_help
    assert "[default: the model that built the index]" in model_help
    assert "[default: the index's]" in text.split("--precision PRECISION")[1].split(" --")[0]


def test_parameters_still_parse_as_before(cli, sample_index):
    # The help renderer changes text only: options given by their short and long names still work.
    result = cli("query", sample_index, "northern lights", "-k", "2", "-f", "ids")
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    missing = cli("index", "x")
    assert missing.exit_code == 2
    assert missing.stderr.startswith("dsearch: error: Missing option '-o'")


def test_command_help_imports_no_heavy_library():
    code = (
        "import sys; from dsearch.cli import run; "
        f"codes = [run([*c, '--help']) for c in ([], *([c] for c in {COMMANDS!r}))]; "
        "heavy = [m for m in ('torch', 'sentence_transformers', 'faiss', 'transformers', 'rich', 'ray') "
        "if m in sys.modules]; "
        "print(codes, heavy, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stderr.strip() == f"{[0] * (len(COMMANDS) + 1)} []"
