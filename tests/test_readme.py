"""The README and docs/ give commands that run and links that lead somewhere: every make target, `vqr1`
subcommand, preset and `python -m` module they name exists, every relative link resolves, nothing
points outside the repository, and the README stays a page a newcomer reads (about 15 KB)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [
    README,
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "bench" / "README.md",
    ROOT / "models" / "README.md",
]
PRESETS = sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))


def text(page: Path) -> str:
    return page.read_text()


def test_readme_gives_the_two_commands_and_ci_runs_its_test_command():
    assert "make train" in text(README) and "make test" in text(README)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_is_a_short_page():
    assert len(README.read_bytes()) <= 16_000, "README.md grew past ~15 KB: move detail into docs/"


@pytest.mark.parametrize("preset", PRESETS)
def test_readme_names_every_preset(preset):
    assert f"`{preset}`" in text(README), f"configs/{preset}.yaml is not described in README.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_and_nothing_points_outside(page):
    body = text(page)
    assert "../shared" not in body, f"{page.name} points outside the repository"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", body):
        if re.match(r"[a-z]+://", target):
            continue
        assert (page.parent / target).exists(), f"{page.name}: link to {target} leads nowhere"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_make_target_vqr1_command_preset_and_module_named_exists(page):
    from cluster.cli import build_parser

    body = text(page)
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    named = set(re.findall(r"make ([a-z][a-z-]*)", body)) - {"sure", "a", "the", "it", "one"}
    assert named <= targets, f"{page.name} names make targets the Makefile lacks: {named - targets}"
    subcommands = build_parser()._subparsers._group_actions[0].choices
    for command in set(re.findall(r"vqr1 ([a-z][a-z-]*)", body)):
        assert command in subcommands, f"{page.name} names `vqr1 {command}`, which does not exist"
    for preset in set(re.findall(r"(?:--config|PRESET=) ?([a-z0-9][a-z0-9-]*)", body)):
        assert preset in PRESETS, f"{page.name} names preset {preset!r}; presets: {PRESETS}"
    for module in set(re.findall(r"python -m ([a-z_][a-z_.]*[a-z_])", body)):
        assert importlib.util.find_spec(module) is not None, (
            f"{page.name}: `python -m {module}` does not exist"
        )


def test_readme_says_how_to_submit_to_a_cluster():
    assert "ray job submit --working-dir . -- python -m cluster.train --config" in text(README)
