"""The docs stay true to the code: the field reference is what `zonewatch rules fields`
prints, every option the docs name exists on the command line, every local link resolves."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zonewatch.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Options of other programs the deployment guide mentions.
FOREIGN = {"--now", "--system-site-packages", "--markdown"}  # systemctl, venv, python -m bench
# VMM options docs/layouts.md names: the jailer's, Cloud Hypervisor's, crosvm's.
FOREIGN |= {"--netns", "--net", "--fs", "--tap-name", "--shared-dir"}


def all_options(parser: argparse.ArgumentParser) -> set[str]:
    out: set[str] = set()
    for action in parser._actions:
        out.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= all_options(sub)
    return out


def test_fields_reference_is_generated_from_the_code() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "zonewatch", "rules", "fields"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    committed = (ROOT / "docs" / "fields.md").read_text()
    assert printed.count("\n") > 20
    assert committed == printed, "regenerate: zonewatch rules fields > docs/fields.md"


def test_the_docs_exist() -> None:
    names = {p.name for p in DOCS}
    assert {
        "configuration.md",
        "rules.md",
        "fields.md",
        "outputs.md",
        "deployment.md",
        "overhead.md",
        "layouts.md",
    } <= names


@pytest.mark.parametrize("path", [*DOCS, ROOT / "README.md"], ids=lambda p: p.name)
def test_every_option_named_exists(path: Path) -> None:
    known = all_options(build_parser()) | FOREIGN
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", path.read_text()))
    assert named - known == set()


@pytest.mark.parametrize("path", [*DOCS, ROOT / "README.md"], ids=lambda p: p.name)
def test_local_links_resolve(path: Path) -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", path.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (path.parent / target).exists(), target
