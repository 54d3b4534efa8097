"""What `zonewatch rules check|test|fields` do (the CLI module only parses arguments)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from zonewatch.rules.compiler import Problem
from zonewatch.rules.fields import field_reference
from zonewatch.rules.fixtures import fixture_files, load_fixtures, run_fixture
from zonewatch.rules.loader import load
from zonewatch.tui.escape import escape


def _missing(paths: Sequence[str]) -> list[Problem]:
    return [Problem(f"{p}:1:1", "no such file or directory") for p in paths if not Path(p).exists()]


def check_rules(paths: Sequence[str], out: TextIO) -> int:
    """Exit 0 when every file loads and compiles; else one `file:line:col: message` each."""
    problems = _missing(paths)
    if not problems:
        loaded = load(paths)
        problems = loaded.problems
        if not loaded.files:
            problems = [Problem(f"{paths[0]}:1:1", "no rules files (*.yaml) here")]
    for p in problems:
        print(f"{p.where}: {p.message}", file=out)
    if problems:
        return 1
    print(
        f"ok: {len(loaded.specs)} rule(s) ({len(loaded.rules)} enabled), "
        f"{len(loaded.macros)} macro(s), {len(loaded.lists)} list(s) in "
        f"{len(loaded.files)} file(s)",
        file=out,
    )
    return 0


def run_fixtures(paths: Sequence[str], out: TextIO, verbose: bool = False) -> int:
    """Run every fixture; exit 1 on any failing fixture or rule without both kinds."""
    if check_rules(paths, out) != 0:
        return 1
    loaded = load(paths)
    enabled = {r.name: r for r in loaded.rules}
    failures = 0
    passed = 0
    covered: dict[str, set[str]] = {name: set() for name in enabled}
    files = fixture_files(paths)
    defined = {s.name for s in loaded.specs}
    whole_dirs = all(Path(p).is_dir() for p in paths)
    for path in files:
        fixtures, problems = load_fixtures(path)
        for p in problems:
            print(f"{p.where}: {p.message}", file=out)
            failures += 1
        for fixture in fixtures:
            if fixture.rule not in enabled and (fixture.rule in defined or not whole_dirs):
                continue  # a disabled rule, or a pack not under test (one file named)
            outcome = run_fixture(paths, fixture)
            if fixture.rule in covered and outcome.ok:
                covered[fixture.rule].add(fixture.expect)
            if outcome.ok:
                passed += 1
                if verbose:
                    print(f"{fixture.where}: ok   {fixture.rule} / {fixture.name}: "
                          f"{escape(outcome.message, 400)}", file=out)  # fmt: skip
            else:
                failures += 1
                print(f"{fixture.where}: FAIL {fixture.rule} / {fixture.name}: "
                      f"{escape(outcome.message, 400)}", file=out)  # fmt: skip
    for name, kinds in covered.items():
        for kind in ("fire", "silent"):
            if kind not in kinds:
                failures += 1
                print(f"{enabled[name].where}: FAIL {name}: no passing must-{kind} fixture",
                      file=out)  # fmt: skip
    print(f"{passed} fixture(s) passed, {failures} failure(s), {len(enabled)} rule(s)", file=out)
    return 1 if failures else 0


def print_fields(out: TextIO) -> int:
    print(field_reference(), file=out)
    return 0
