"""Rules that used to kill a live agent, given to it by hot reload while a real micro-VMM
zone does file work: a 1050-way `or` (an IOC list written inline; it raised
RecursionError on the first event and the agent exited) now loads and fires; macros that
double 22 times (42 s and 1.9 GB to expand, the agent stalled) are refused within a
second, the running rules stay, and an alert about the agent says why. Events flow on
throughout; the agent's memory stays flat."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.resilience.support import Agent, events_of
from zonewatch.lab.microvm import MicroVmProcess

HEAD = "- required_engine_version: 1\n"
NAME = "rules-reload"


def watch_rule(files: Path) -> str:
    """Fires on the zone's writes into its folder: the rules run, before and after."""
    return (
        "- rule: blk write\n"
        f"  condition: channel = file and file.host_path startswith {files}/blk-\n"
        "  output: '%file.host_path'\n  severity: low\n  by: [zone.id, file.host_path]\n"
        "  dedup: 0s\n"
    )


def ioc_rule(files: Path, n: int = 1050) -> str:
    """The issue's shape: n paths or'ed inline, one of them a file the zone really writes."""
    paths = [f"/ioc/p{i}" for i in range(n - 1)] + [f"{files}/blk-7"]
    terms = " or ".join(f"file.host_path = {p}" for p in paths)
    return (
        f"- rule: iocs\n  condition: channel = file and ({terms})\n  output: '%file.host_path'\n"
        "  severity: high\n  by: [zone.id, file.host_path]\n  dedup: 0s\n"
    )


def doubling_macros(levels: int = 22) -> str:
    body = "- macro: m0\n  condition: file.path = /a\n"
    body += "".join(f"- macro: m{i}\n  condition: (m{i - 1} or m{i - 1})\n"
                    for i in range(1, levels + 1))  # fmt: skip
    return body + (
        f"- rule: doubled\n  condition: channel = file and m{levels}\n  output: x\n"
        "  severity: high\n"
    )


@pytest.fixture
def files(tmp_path: Path) -> Path:
    path = tmp_path / "files"
    path.mkdir()
    return path


@pytest.fixture
def rules_file(tmp_path: Path, files: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(HEAD + watch_rule(files))
    return path


@pytest.fixture
def agent(tmp_path: Path, tokens_file: Path, rules_file: Path) -> Iterator[Agent]:
    a = Agent(tmp_path, tokens_file, "--events", "--rules", str(rules_file))
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def zone(tmp_path: Path, files: Path) -> Iterator[MicroVmProcess]:
    vm = MicroVmProcess(NAME, rate=20, file_dir=files, stats=tmp_path / "vm.json").start()
    try:
        yield vm
    finally:
        vm.close()


def alerts(lines: list[dict[str, object]], rule: str) -> list[dict[str, object]]:
    return [x for x in lines if x["type"] == "alert" and x["rule"] == rule]


def replace_rules(path: Path, text: str) -> float:
    """Write the new rules whole (rename), as an editor or a ConfigMap update does."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)
    return time.monotonic()


def test_hot_reload_of_rules_that_used_to_kill_the_agent(
    agent: Agent, zone: MicroVmProcess, rules_file: Path, files: Path
) -> None:
    agent.wait_for(lambda lines: bool(alerts(lines, "blk write")), 60, "the first rule's alert")
    rss_before = agent.rss_mib()

    # 1. The 1050-way or: reloaded, it evaluates on every file event and fires.
    replace_rules(rules_file, HEAD + watch_rule(files) + ioc_rule(files))
    agent.wait_for(lambda lines: bool(alerts(lines, "iocs")), 60, "the IOC rule's alert")
    (first_ioc, *_) = alerts(agent.read(), "iocs")
    assert first_ioc["evidence"] == {"file.host_path": f"{files}/blk-7"}
    assert "rules reloaded: 2 rule(s)" in agent.log.read_text()

    # 2. Doubling macros: refused in well under a second, the running rules stay.
    seen = len(agent.read())
    written = replace_rules(rules_file, HEAD + watch_rule(files) + doubling_macros())
    agent.wait_for(lambda lines: bool(alerts(lines[seen:], "zonewatch.rules_rejected")), 30,
                   "the agent's alert about the refused rules")  # fmt: skip
    refused_after = time.monotonic() - written  # includes up to 1 s until the files are looked at
    (rejected,) = alerts(agent.read()[seen:], "zonewatch.rules_rejected")
    evidence = rejected["evidence"]
    assert isinstance(evidence, dict)
    assert evidence["error"].startswith(f"{rules_file}:")
    assert "[budget.terms] macro 'm16' compares 65536 values" in evidence["error"]
    assert rejected["zone"] == {"id": "host", "name": rejected["zone"]["name"],  # type: ignore[index]
                                "tenant": "", "vmm": ""}  # fmt: skip
    assert refused_after < 3.0, f"{refused_after:.1f} s"

    # The old rules (the IOC list among them) keep firing; events keep flowing.
    after = len(agent.read())
    agent.wait_for(lambda lines: bool(alerts(lines[after:], "iocs"))
                   and len(events_of(lines[after:], NAME)) >= 20, 60,
                   "the running rules' alerts and events after the refusal")  # fmt: skip
    rss_after = agent.rss_mib()
    scraped = agent.scrape()  # no rule failed, none was switched off
    assert scraped["zonewatch_rule_eval_errors_total"] == 0
    assert scraped["zonewatch_rules_disabled_total"] == 0
    assert scraped["zonewatch_rule_eval_seconds_count"] > 0
    assert rss_after - rss_before < 64, f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
    assert agent.proc.poll() is None
    log = agent.log.read_text()
    assert "Traceback" not in log and "RecursionError" not in log
    print(
        f"IOC alert {first_ioc['evidence']}; doubling refused {refused_after:.2f} s after the "
        f"write; RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
    )
    assert agent.stop() == 0
