"""Rules that can't kill the agent: huge `or`s evaluate, expansion is bounded before it
happens (doubling macros and lists, deep macro chains, cycles, deep parentheses and YAML
are refused with file:line:col and a code), the same refusal in every entry point."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.helpers.cli import zonewatch
from zonewatch.model import FileEvent, ZoneRef
from zonewatch.rules.engine import RuleEngine, RulesError, RuleSet
from zonewatch.rules.loader import load

ZONE = ZoneRef("z1", "web-1", "acme", "qemu")
HEAD = "- required_engine_version: 1\n"


def rule(condition: str, name: str = "r") -> str:
    return f"- rule: {name}\n  condition: {condition}\n  output: x\n  severity: high\n  dedup: 0s\n"


def ioc_rule(n: int) -> str:
    """The issue's repro: an IOC list written inline as one `or` of n terms."""
    terms = " or ".join(f"file.path = /ioc/p{i}" for i in range(n))
    return (
        f"- rule: iocs\n  desc: x\n  condition: channel = file and ({terms})\n"
        "  output: x\n  severity: high\n  tags: [t]\n"
    )


def opened(path: str, ts: int = 1) -> FileEvent:
    return FileEvent(ts, ZONE, "open", path, "/srv" + path, 1, 1, "qemu")


def problems_of(path: Path) -> list[str]:
    return [f"{p.where}: {p.message}" for p in load([path]).problems]


def timed(fn: Callable[[], object]) -> tuple[object, float, int]:
    """fn's result, its wall time (s) and the peak of memory it allocated (bytes)."""
    tracemalloc.start()
    try:
        started = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, elapsed, peak


# -- huge or: loads and evaluates --------------------------------------------------------


def test_a_1050_way_or_loads_and_evaluates(tmp_path: Path) -> None:
    path = tmp_path / "or.yaml"
    path.write_text(HEAD + ioc_rule(1050))
    engine = RuleEngine.load(path)
    events = [opened("/ioc/p1049", 1), opened("/ioc/p1050", 2), opened("/ioc/p0", 3)]
    alerts = engine.process(events) + engine.flush()
    assert sorted(a.evidence["file.path"] for a in alerts) == ["/ioc/p0", "/ioc/p1049"]
    assert all(a.rule == "iocs" and a.evidence == {"file.path": a.evidence["file.path"]}
               for a in alerts)  # fmt: skip
    assert engine.counters.eval_errors == 0


def test_a_20000_way_or_over_two_fields_evaluates_in_a_loop(tmp_path: Path) -> None:
    """Alternating fields can't become one set lookup: the or loops over 20000 terms."""
    terms = " or ".join(
        f"{'file.path' if i % 2 else 'file.host_path'} = /ioc/p{i}" for i in range(20000)
    )
    path = tmp_path / "alt.yaml"
    path.write_text(HEAD + rule(f"channel = file and ({terms})"))
    engine = RuleEngine.load(path)
    hit, miss = opened("/ioc/p19999"), opened("/ioc/p19998")  # odd: file.path; even: host
    assert [a.rule for a in engine.process([hit, miss])] == ["r"]


def test_the_issue_repro_through_rules_check_and_replay(tmp_path: Path) -> None:
    path = tmp_path / "or.yaml"
    path.write_text(HEAD + ioc_rule(1050))
    check = zonewatch("rules", "check", str(path))
    assert check.returncode == 0, check.stdout
    rec = tmp_path / "events.jsonl"
    rec.write_bytes(b"".join(orjson.dumps(opened(p).to_json()) + b"\n"
                             for p in ("/etc/hosts", "/ioc/p777")))  # fmt: skip
    replayed = zonewatch("replay", str(rec), "--rules", str(path), "--max")
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    (line,) = [orjson.loads(x) for x in replayed.stdout.splitlines()]
    assert (line["rule"], line["evidence"]) == ("iocs", {"file.path": "/ioc/p777"})


# -- one set lookup or a loop: the same meaning ------------------------------------------


@pytest.mark.parametrize(
    ("condition", "matches"),
    [
        # a run of = on one field is one lookup; the same answers as == term by term
        ("file.path = /a or file.path = /b or file.path = /c", {"/a", "/b", "/c"}),
        ("file.path != /a and file.path != /b and file.path != /c", {"/d", "/x", ""}),
        # interleaved fields: runs are adjacent terms only
        ("file.path = /a or file.host_path = /srv/b or file.path = /c", {"/a", "/b", "/c"}),
        ("not (file.path = /a or file.path = /b) and file.path != /c", {"/d", "/x", ""}),
        ("file.ret = 3 or file.ret = 4.0 or file.ret = 0x5", {"/a", "/b", "/c"}),
    ],
)
def test_set_lookups_answer_as_the_terms_would(
    tmp_path: Path, condition: str, matches: set[str]
) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + rule(f"channel = file and ({condition})") + "  by: [file.path]\n")
    engine = RuleEngine.load(path)
    paths = ["/a", "/b", "/c", "/d", "/x", ""]
    rets = {"/a": 3, "/b": 4, "/c": 5}
    events = [FileEvent(1, ZONE, "open", p, "/srv" + p, 1, 1, "q", ret=rets.get(p, 0))
              for p in paths]  # fmt: skip
    got = {a.evidence["file.path"] for a in engine.process(events)}
    assert got == matches


def test_an_unhashable_recorded_value_equals_nothing(tmp_path: Path) -> None:
    """A recording may hold a list where a string belongs: `=` is False, `!=` True, as
    term-by-term comparison would say, never an error."""
    from zonewatch.model import record_from_json

    path = tmp_path / "r.yaml"
    path.write_text(
        HEAD
        + rule("channel = file and (file.path = /a or file.path = /b)", "eq")
        + rule("channel = file and file.path != /a and file.path != /b", "ne")
    )
    engine = RuleEngine.load(path)
    odd = record_from_json({"type": "event", "ts": "2026-01-01T00:00:00Z", "channel": "file",
                            "op": "open", "zone": {}, "file": {"path": ["/a"]}})  # fmt: skip
    assert [a.rule for a in engine.process([odd])] == ["ne"]
    assert engine.counters.eval_errors == 0


# -- expansion bounded before it happens --------------------------------------------------


def doubling_macros(levels: int, leaf: str = "file.path = /a") -> str:
    body = f"- macro: m0\n  condition: {leaf}\n"
    body += "".join(f"- macro: m{i}\n  condition: (m{i - 1} or m{i - 1})\n"
                    for i in range(1, levels + 1))  # fmt: skip
    return body + rule(f"channel = file and m{levels}")


def doubling_lists(levels: int) -> str:
    body = "- list: l0\n  items: [a, b]\n"
    body += "".join(f"- list: l{i}\n  items: [l{i - 1}, l{i - 1}]\n"
                    for i in range(1, levels + 1))  # fmt: skip
    return body + rule(f"channel = file and file.path in (l{levels})")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (doubling_macros(22), ":34:3: [budget.terms] macro 'm16' compares 65536 values"),
        (doubling_macros(200), ":34:3: [budget.terms] macro 'm16' compares 65536 values"),
        # constants fold away, but only after expansion has visited every one
        (doubling_macros(60, "'true'"), ":34:3: [budget.terms] macro 'm16' compares 65536"),
        (doubling_lists(40), ":32:3: [budget.terms] list 'l15' holds 65536 items"),
    ],
    ids=["macros-22", "macros-200", "macros-of-true-60", "lists-40"],
)
def test_doubling_is_refused_in_well_under_a_second(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "dbl.yaml"
    path.write_text(HEAD + text)
    found, elapsed, peak = timed(lambda: problems_of(path))
    assert isinstance(found, list)
    assert any(p.startswith(f"{path}{expected}") for p in found), found
    # the rule itself: refused where it names the macro or list, with the same code
    assert any("[budget.terms]" in p and "can't be expanded" in p for p in found), found
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    assert peak < 32 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_300_nested_macros_are_a_clean_error(tmp_path: Path) -> None:
    body = "- macro: m0\n  condition: file.path = /a\n"
    body += "".join(f"- macro: m{i}\n  condition: m{i - 1}\n" for i in range(1, 300))
    path = tmp_path / "deep.yaml"
    path.write_text(HEAD + body + rule("channel = file and m299"))
    found, elapsed, _ = timed(lambda: problems_of(path))
    assert found == [
        f"{path}:402:3: [budget.depth] macro 'm200' nests 201 levels deep (and, or, not, "
        "macros) once expanded; the budget is 200",
        f"{path}:603:33: [budget.depth] macro 'm299' can't be expanded: macro 'm200' nests "
        "201 levels deep (and, or, not, macros) once expanded; the budget is 200 "
        f"(at {path}:402:3)",
    ]
    assert elapsed < 1.0
    with pytest.raises(RulesError) as info:  # run and replay load this way
        RuleEngine.load(path)
    assert info.value.where == f"{path}:402:3"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # defined top-down: the measure still walks without recursion
        ("".join(f"- macro: m{i}\n  condition: m{i - 1} and file.path = /b{i}\n"
                 for i in range(299, 0, -1)) + "- macro: m0\n  condition: file.path = /a\n"
         + rule("channel = file and m299"), "[budget.depth] macro 'm100' nests 201 levels"),
        ("".join(f"- macro: m{i}\n  condition: m{(i + 1) % 1200}\n" for i in range(1200))
         + rule("channel = file and m5"),
         "macro cycle: m0 -> m1 -> m2 -> ... -> m1198 -> m1199 -> m0"),
        ("- list: l0\n  items: [a]\n" + "".join(f"- list: l{i}\n  items: [l{i - 1}, x]\n"
         for i in range(1, 1200)) + rule("channel = file and file.path in (l1199)"),
         "[budget.depth] list 'l64' names lists 65 deep; the budget is 64"),
        (rule("channel = file and " + "(" * 5000 + "file.path = /a" + ")" * 5000),
         ":3:98: [parse.depth] nested deeper than 64 levels"),
        (rule("channel = file and " + "not " * 5000 + "file.path = /a"),
         "[parse.depth] nested deeper than 64 levels"),
        (rule("channel = file") + "- rule: r\n  condition: and file.path != /x\n"
         "  override: {condition: append}\n" * 1000,
         ":3:22: [budget.depth] rule 'r' nests 1001 levels deep"),
        ("- " + "[" * 3000 + "]" * 3000 + "\n", ":2:34: invalid YAML: nested deeper than 32"),
        ("- list: l\n  items:\n" + "".join("    " * (i + 1) + "-\n" for i in range(600)),
         "invalid YAML: nested deeper than 32 levels"),
    ],
    ids=["macros-top-down", "macro-cycle-1200", "list-chain-1200", "parens-5000", "not-5000",
         "appends-1000", "yaml-flow-3000", "yaml-block-600"],
)  # fmt: skip
def test_deep_input_is_a_clean_error(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(HEAD + text)
    started = time.perf_counter()
    found = problems_of(path)
    elapsed = time.perf_counter() - started
    assert any(expected in p for p in found), found[:3]
    assert all(p.startswith(f"{path}:") for p in found)
    assert elapsed < 5.0, f"{elapsed:.2f} s"


def test_a_load_has_a_budget_too(tmp_path: Path) -> None:
    big = " or ".join(f"file.path = /p{i}" for i in range(2000))
    uses = " or ".join(["big"] * 24)  # 48000 values per rule: each within its budget
    body = f"- macro: big\n  condition: ({big})\n"
    body += "".join(rule(f"channel = file and ({uses})", f"r{i}") for i in range(6))
    path = tmp_path / "many.yaml"
    path.write_text(HEAD + body)
    found = problems_of(path)
    assert len(found) == 1, found
    assert "[budget.load] rule 'r5' takes the rules past 250000 values" in found[0]
    assert "240005 before it, 48001 in it" in found[0]  # `channel = file` is one more


def test_the_budget_admits_what_it_states(tmp_path: Path) -> None:
    from zonewatch.rules import budget

    # 49 x 1000 + 999 items, + 1 for `channel = file`: exactly the budget
    thousand = ", ".join(f"/p{i}" for i in range(1000))
    extra = ", ".join(f"/q{i}" for i in range(budget.TERMS_PER_RULE - 49 * 1000 - 1))
    chain = "".join(f"- macro: m{i}\n  condition: m{i - 1}\n" for i in range(1, 198))
    path = tmp_path / "edge.yaml"
    path.write_text(HEAD + f"- list: k\n  items: [{thousand}]\n"
                    + f"- list: big\n  items: [{', '.join(['k'] * 49)}, {extra}]\n"
                    + "- macro: m0\n  condition: file.path = /x\n" + chain
                    + rule("channel = file and file.path in (big)", "wide")
                    + rule("channel = file and m197", "deep"))  # fmt: skip
    assert problems_of(path) == []
    engine = RuleEngine.load(path)
    hits = engine.process([opened("/q998"), opened("/x", 2)])
    assert sorted(a.rule for a in hits) == ["deep", "wide"]


def test_every_entry_point_refuses_the_same_way(tmp_path: Path) -> None:
    good = tmp_path / "rules.yaml"
    good.write_text(HEAD + rule("channel = file and file.path = /etc/shadow"))
    bad = HEAD + doubling_macros(22)
    expected = f"{good}:34:3: [budget.terms] macro 'm16' compares 65536 values"
    # rules check: file:line:col, exit 1
    (tmp_path / "dbl.yaml").write_text(bad)
    check = zonewatch("rules", "check", str(tmp_path / "dbl.yaml"))
    assert check.returncode == 1
    assert check.stdout.startswith(expected.replace(str(good), str(tmp_path / "dbl.yaml")))
    # replay (and run, which loads the same way): one line, exit 2
    rec = tmp_path / "rec.jsonl"
    rec.write_bytes(orjson.dumps(opened("/a").to_json()) + b"\n")
    replayed = zonewatch("replay", str(rec), "--rules", str(tmp_path / "dbl.yaml"))
    assert replayed.returncode == 2
    assert expected.replace(str(good), str(tmp_path / "dbl.yaml")) in replayed.stderr
    assert "Traceback" not in replayed.stderr
    # run: refused before any probe is attached
    ran = zonewatch("run", "--rules", str(tmp_path / "dbl.yaml"), "--duration", "1")
    assert ran.returncode == 2
    assert f"zonewatch run: {expected.replace(str(good), str(tmp_path / 'dbl.yaml'))}" in ran.stderr
    # hot reload: refused, the running rules stay, an alert about the agent says why
    rules = RuleSet([good], check_interval=0)
    good.write_text(bad)
    started = time.perf_counter()
    assert rules.maybe_reload() is False
    rules.join(10)
    assert rules.maybe_reload() is False
    assert time.perf_counter() - started < 1.0
    assert rules.last_error is not None and rules.last_error.startswith(expected)
    (alert,) = rules.engine.tick(5)
    assert alert.rule == "zonewatch.rules_rejected"
    assert alert.evidence["error"].startswith(expected)
    assert [a.rule for a in rules.engine.process([opened("/etc/shadow")])] == ["r"]
