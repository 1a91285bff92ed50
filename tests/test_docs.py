"""The README opens with what a newcomer runs first, and explains every dependency the project declares."""

from __future__ import annotations

import re
import tomllib

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def declared_packages() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements]


def test_readme_opens_with_the_demo_and_the_tests():
    first_block = re.search(r"```sh\n(.*?)```", README, flags=re.S)
    assert first_block is not None and README.index(first_block.group(0)) < README.index("\n## ")
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    for command in commands:
        assert (ROOT / command.split()[1]).is_file()


def test_every_declared_dependency_is_explained():
    section = README.split("## Dependencies, and why each is there")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("package", "---"):
            for name in re.findall(r"[A-Za-z0-9_.-]+", cells[0].split("(")[0]):
                rows[name.lower()] = cells[1]
    assert "torch" in rows  # not declared (its CPU build is installed first), but needed
    for package in declared_packages():
        assert rows.get(package), f"{package} is in pyproject.toml but not explained in the README's Dependencies"
