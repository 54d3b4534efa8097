"""The default rule packs as users and SIEMs see their alerts: every summary is one line
with no trailing whitespace (a folded YAML `output: >` keeps its last line break, which then
showed as "...within 60s\\n" in the UI, the JSON lines and the SIEM), and every rule's tags
start with a maturity (the proc pack's also carry MITRE ids)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zonewatch.rules.engine import RuleContext, RuleEngine
from zonewatch.rules.fixtures import fixture_files, load_fixtures, replay_records

RULES = Path(__file__).resolve().parents[2] / "rules"
MITRE = re.compile(r"^T\d{4}(\.\d{3})?$")


def fired_summaries() -> dict[str, list[str]]:
    """Each default rule's summaries over every fixture of the packs."""
    summaries: dict[str, list[str]] = {}
    for path in fixture_files([RULES]):
        fixtures, problems = load_fixtures(path)
        assert not problems, problems
        for fixture in fixtures:
            addresses = fixture.addresses
            engine = RuleEngine.load([RULES], RuleContext(zone_addresses=lambda a=addresses: a))
            for alert in replay_records(engine, fixture.records):
                summaries.setdefault(alert.rule, []).append(alert.summary)
    return summaries


@pytest.fixture(scope="module")
def summaries() -> dict[str, list[str]]:
    return fired_summaries()


def test_every_default_rule_fires_in_its_fixtures(summaries: dict[str, list[str]]) -> None:
    names = {r.name for r in RuleEngine.load([RULES]).rules}
    assert names - summaries.keys() == set()


def test_no_summary_has_a_line_break_or_trailing_whitespace(
    summaries: dict[str, list[str]],
) -> None:
    bad = {
        rule: s for rule, texts in summaries.items() for s in texts if s != s.strip() or "\n" in s
    }
    assert bad == {}


def test_no_output_or_desc_is_folded_with_its_last_line_break() -> None:
    for path in RULES.glob("*.yaml"):
        kept = re.findall(r"^\s*(?:output|desc): [>|][+]?\s*$", path.read_text(), re.M)
        assert kept == [], f"{path.name}: use '>-' (a folded scalar keeps its last newline)"


def test_tags_start_with_maturity_and_proc_rules_name_mitre_ids() -> None:
    for rule in RuleEngine.load([RULES]).rules:
        assert rule.tags[0].startswith("maturity_"), rule.name
        if Path(rule.where.split(":")[0]).name == "proc.yaml":
            assert any(MITRE.match(t) for t in rule.tags), rule.name


def test_docs_list_every_proc_rule() -> None:
    listed = (RULES.parent / "docs" / "rules.md").read_text()
    for rule in RuleEngine.load([RULES]).rules:
        if Path(rule.where.split(":")[0]).name == "proc.yaml":
            assert f"| {rule.name} |" in listed, rule.name
