"""The README keeps what a newcomer needs: the two commands, every preset, the cluster command, and
the test command CI runs (a rewrite once dropped whole sections unnoticed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PRESETS = sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))


def test_readme_gives_the_two_commands_and_ci_runs_its_test_command():
    assert "make train" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("preset", PRESETS)
def test_readme_names_every_preset(preset):
    assert f"`{preset}`" in README, f"configs/{preset}.yaml is not described in README.md"


@pytest.mark.parametrize(
    "section", ["## Install", "## Configuration", "## Cluster training", "## Reliability", "## Monitoring"]
)
def test_readme_keeps_its_sections(section):
    assert section in README


def test_readme_says_how_to_submit_to_a_cluster():
    assert "ray job submit --working-dir . -- python -m cluster.train --config" in README


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    named = set(re.findall(r"`make ([a-z][a-z-]*)", README))
    assert named and named <= targets, f"README names make targets the Makefile lacks: {named - targets}"
