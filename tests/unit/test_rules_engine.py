"""Detectors, de-duplication, loss accounting, hot reload, replay and the rules commands."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import orjson
import pytest
from prometheus_client import generate_latest

from tests.helpers.cli import zonewatch
from zonewatch.exporters.prometheus import AgentHealth, PrometheusSink
from zonewatch.model import FileEvent, NetEvent, ProcEvent, ZoneRef, ZoneStats, record_from_json
from zonewatch.rules.engine import RuleEngine, RuleSet
from zonewatch.rules.replay import replay

ZONE = ZoneRef("z1", "web-1", "acme", "qemu")
S = 10**9
HEAD = "- required_engine_version: 1\n"
ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, body: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(HEAD + body)
    return path


def unlink(ts: int, path: str = "/d/x") -> FileEvent:
    return FileEvent(ts, ZONE, "unlink", path, "/srv" + path, 1, 1, "qemu")


MASS = (
    "- rule: Mass\n  condition: channel = file and op = unlink and count(10s) >= 3\n"
    "  output: '%{count(10s)} deletes'\n  severity: high\n  dedup: 30s\n"
)


def test_count_window_slides_and_dedup_folds_every_repeat(tmp_path: Path) -> None:
    engine = RuleEngine.load(write(tmp_path, MASS))
    first = engine.process([unlink(0), unlink(1 * S), unlink(2 * S)])
    assert [a.summary for a in first] == ["3 deletes"]
    # 5 more within the dedup window: folded, nothing emitted yet
    assert engine.process([unlink(3 * S + i) for i in range(5)]) == []
    assert engine.tick(20 * S) == []  # the window is still open
    (folded,) = engine.tick(33 * S)
    assert folded.count == 5
    assert (folded.first_ts_ns, folded.last_ts_ns) == (3 * S, 3 * S + 4)
    assert sum(a.count for a in [*first, folded]) == engine.counters.matches == 6
    # far later, one delete alone is below the threshold: the window slid
    assert engine.process([unlink(100 * S)]) == []


def test_lost_in_window_says_when_events_were_dropped(tmp_path: Path) -> None:
    engine = RuleEngine.load(write(tmp_path, MASS))
    engine.note_lost("file.ringbuf", 17, 1 * S)
    (alert,) = engine.process([unlink(0), unlink(1 * S), unlink(2 * S)])
    assert alert.lost_in_window == 17  # within the 10 s the rule looked back over
    assert alert.to_json()["lost_in_window"] == 17
    engine.process([unlink(3 * S)])
    engine.note_lost("file.ringbuf", 4, 5 * S)
    (folded,) = engine.flush()
    # the fold covers its own span and the 10 s the rule looked back over: both losses
    assert folded.lost_in_window == 21


def test_distinct_and_sum_windows(tmp_path: Path) -> None:
    body = (
        "- rule: Scan\n  condition: channel = net and distinct(net.dst_port, 60s) > 2\n"
        "  output: x\n  severity: low\n  by: [zone.id, net.dst_ip]\n  dedup: 0s\n"
        "- rule: Big\n  condition: channel = net and sum(net.tx_bytes, 60s) > 100\n"
        "  output: x\n  severity: low\n  dedup: 0s\n"
    )
    engine = RuleEngine.load(write(tmp_path, body))

    def flow(ts: int, dst: str, port: int, tx: int) -> NetEvent:
        return NetEvent(
            ts, ZONE, "flow_start", "egress", "tcp", "10.0.0.2", dst, 1, port, tx_bytes=tx
        )

    alerts = engine.process(
        [
            flow(0, "a", 1, 10),
            flow(1, "a", 1, 10),
            flow(2, "b", 2, 10),
            flow(3, "a", 2, 10),
            flow(4, "a", 3, 10),
        ]
    )
    assert [a.rule for a in alerts] == ["Scan"]  # 3 ports of a, never 3 of b
    assert [a.rule for a in engine.process([flow(5, "c", 1, 100)])] == ["Big"]
    assert engine.process([flow(200 * S, "c", 1, 100)]) == []  # the sum slid out


def test_first_seen_learns_then_fires_once_per_new_value(tmp_path: Path) -> None:
    body = (
        "- rule: New\n  condition: channel = net and op = dns and first_seen(net.dns_qname)\n"
        "  output: '%net.dns_qname'\n  severity: low\n  learn: 60s\n  dedup: 0s\n"
    )
    engine = RuleEngine.load(write(tmp_path, body))

    def q(ts: int, name: str) -> NetEvent:
        return NetEvent(ts, ZONE, "dns", "egress", "udp", "a", "b", dns_qname=name)

    assert engine.process([q(0, "a.com"), q(10 * S, "b.com")]) == []  # learning
    alerts = engine.process([q(70 * S, "a.com"), q(71 * S, "c.com"), q(72 * S, "c.com")])
    assert [a.summary for a in alerts] == ["c.com"]


def test_baseline_ratio_learns_the_zones_own_rate(tmp_path: Path) -> None:
    body = (
        "- rule: Hot\n  condition: channel = stats and baseline_ratio(kvm.hypercalls_per_s) > 10"
        " and kvm.hypercalls_per_s > 100\n  output: x\n  severity: low\n  learn: 30s\n"
        "  dedup: 0s\n"
    )
    engine = RuleEngine.load(write(tmp_path, body))
    calm = [ZoneStats(i * S, ZONE, 1.0, hypercalls_per_s=20.0) for i in range(40)]
    assert engine.process_stats(calm) == []
    busy_zone = ZoneRef("z2", "db", "acme", "qemu")  # its own baseline: 500/s is its normal
    busy = [ZoneStats(i * S, busy_zone, 1.0, hypercalls_per_s=500.0) for i in range(40)]
    assert engine.process_stats(busy) == []
    assert engine.process_stats([ZoneStats(41 * S, ZONE, 1.0, hypercalls_per_s=500.0)])
    assert not engine.process_stats([ZoneStats(41 * S, busy_zone, 1.0, hypercalls_per_s=600.0)])


def test_a_missing_field_is_counted_not_raised(tmp_path: Path) -> None:
    body = (
        "- rule: R\n  condition: channel = net and net.dns_qname startswith x\n"
        "  output: x\n  severity: low\n"
    )
    engine = RuleEngine.load(write(tmp_path, body))
    odd = record_from_json(
        {
            "type": "event",
            "ts": "2026-01-01T00:00:00Z",
            "channel": "net",
            "op": "dns",
            "zone": {},
            "net": {"dns_qname": None},
        }
    )
    odd.dns_qname = None  # what a malformed generic event would hold
    assert engine.process([odd]) == []
    assert engine.counters.eval_errors == 1


def reload(rules: RuleSet) -> bool:
    """One reload as the agent loop sees it: started, compiled in its thread, swapped."""
    assert rules.maybe_reload() is False  # started: the running rules stay meanwhile
    rules.join(60)
    return rules.maybe_reload()


def test_reload_keeps_running_rules_on_a_bad_edit(tmp_path: Path) -> None:
    path = write(tmp_path, MASS)
    rules = RuleSet([path], check_interval=0)
    rules.engine.process([unlink(0), unlink(1)])  # two deletes counted so far
    path.write_text(HEAD + MASS.replace("count(10s)", "count(10s"))
    assert reload(rules) is False
    assert rules.last_error is not None and "r.yaml:" in rules.last_error
    (rejected,) = rules.engine.tick(2)  # and an alert about the agent says so
    assert rejected.rule == "zonewatch.rules_rejected"
    assert rejected.zone.tenant == "" and "r.yaml:" in rejected.evidence["error"]
    assert rules.engine.process([unlink(2)])  # the old rules still run, with their state
    path.write_text(HEAD + MASS + MASS.replace("Mass", "Other"))
    assert reload(rules) is True
    assert rules.last_error is None
    assert {r.name for r in rules.engine.rules} == {"Mass", "Other"}
    # Mass did not change: its window carried over (3 + 1 deletes), Other starts empty
    assert [a.rule for a in rules.engine.process([unlink(3 * S)])] == []  # folded by dedup
    rules.request_reload()
    assert reload(rules) is True  # SIGHUP reloads even without a change


def test_replay_round_trips_recorded_lines(tmp_path: Path) -> None:
    events = [
        FileEvent(
            1 * S,
            ZONE,
            "write",
            "/etc/shadow",
            "/srv/etc/shadow",
            1,
            2,
            "qemu",
            share="root",
            flags=1,
        ),
        ProcEvent(2 * S, ZONE, "ptrace", 42, 1, "qemu-system-x86", target="1"),
        NetEvent(
            3 * S, ZONE, "flow_start", "egress", "tcp", "10.0.0.2", "169.254.169.254", 4000, 80
        ),
        ZoneStats(4 * S, ZONE, 1.0, vcpus=2, exits_per_s=5000.0, exits_by_reason={"HLT": 5e3}),
    ]
    lines = b"".join(orjson.dumps(e.to_json()) + b"\n" for e in events)
    for e in events:  # each decodes back to an equal record
        assert record_from_json(orjson.loads(orjson.dumps(e.to_json()))) == e
    engine = RuleEngine.load([ROOT / "rules"])
    got: list[str] = []
    counters = replay(engine, io.BytesIO(lines), "rec", lambda a: got.extend(x.rule for x in a))
    assert counters.records == 4
    assert sorted(got) == [
        "Account file written through a share",
        "Cloud metadata service contacted from a zone",
        "Zone VMM traced a process",
    ]


def test_rules_test_passes_on_the_default_packs() -> None:
    result = zonewatch("rules", "test", "rules/")
    assert result.returncode == 0, result.stdout
    assert " 0 failure(s), 24 rule(s)" in result.stdout


def test_rules_check_reports_each_error_and_exits_1(tmp_path: Path) -> None:
    bad = write(tmp_path, MASS.replace("count(10s)", "cont(10s)") + "- rule: [\n")
    result = zonewatch("rules", "check", str(bad))
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert lines and all(line.startswith(f"{bad}:") for line in lines), lines
    good = zonewatch("rules", "check", "rules/")
    assert good.returncode == 0 and good.stdout.startswith("ok: 24 rule(s)")


def test_rules_test_fails_on_a_failing_fixture(tmp_path: Path) -> None:
    write(tmp_path, MASS)
    (tmp_path / "fixtures").mkdir()
    (tmp_path / "fixtures" / "f.yaml").write_text(
        "- fixture: two deletes\n  rule: Mass\n  expect: fire\n  events:\n"
        "    - {channel: file, op: unlink, file: {path: /a}}\n"
        "    - {channel: file, op: unlink, file: {path: /b}}\n"
    )
    result = zonewatch("rules", "test", str(tmp_path))
    assert result.returncode == 1
    assert "f.yaml:1:3: FAIL Mass / two deletes: expected an alert, got none" in result.stdout
    assert "no passing must-silent fixture" in result.stdout


def test_replay_command_writes_alert_lines(tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    event = ProcEvent(1 * S, ZONE, "module_load", 42, 1, "qemu", target="evil")
    rec.write_bytes(orjson.dumps(event.to_json()) + b"\n")
    result = zonewatch("replay", str(rec), "--rules", "rules/", "--max")
    assert result.returncode == 0, result.stderr
    (line,) = [orjson.loads(x) for x in result.stdout.splitlines()]
    assert line["type"] == "alert"
    assert line["rule"] == "Zone VMM loaded a kernel module"
    assert "T1547.006" in line["tags"]


@pytest.mark.parametrize("bad", [b"{not json\n", b'{"type": "event", "channel": "file"}\n'])
def test_replay_rejects_a_malformed_line_with_its_number(tmp_path: Path, bad: bytes) -> None:
    rec = tmp_path / "rec.jsonl"
    rec.write_bytes(b"\n" + bad)
    result = zonewatch("replay", str(rec))
    assert result.returncode == 2
    assert f"{rec}:2: not a recorded line" in result.stderr


def alternating_macros(n: int) -> str:
    """m_i = `file.ret = i or m_i-1` / `file.ret != i and m_i-1`: and/or alternate, so
    nothing flattens; an event with ret 0 evaluates all n levels, one frame each."""
    body = "- macro: m0\n  condition: file.path = /deep\n"
    for i in range(1, n + 1):
        term = f"file.ret = {i} or" if i % 2 else f"file.ret != {i} and"
        body += f"- macro: m{i}\n  condition: ({term} m{i - 1})\n"
    return body


def stack_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1  # type: ignore[assignment]
    return depth


def test_a_rule_that_fails_is_disabled_counted_and_raises_an_agent_alert(tmp_path: Path) -> None:
    """A real rule, 90 macros deep (within the budget), run with a Python stack too small
    for it: RecursionError. The rule is switched off and says so; the other rule and the
    loop go on."""
    body = alternating_macros(90) + (
        "- rule: deep\n  condition: channel = file and m90\n  output: x\n  severity: low\n"
        "- rule: plain\n  condition: channel = file and file.path = /deep\n  output: x\n"
        "  severity: low\n  dedup: 0s\n"
    )
    engine = RuleEngine.load(write(tmp_path, body))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(stack_depth() + 60)  # the engine's own frames fit; 90 levels don't
    try:
        alerts = engine.process([unlink(1 * S, "/deep"), unlink(2 * S, "/deep")])
    finally:
        sys.setrecursionlimit(limit)
    disabled = [a for a in alerts if a.rule == "zonewatch.rule_disabled"]
    assert len(disabled) == 1
    (alert,) = disabled
    assert alert.zone == ZONE and alert.ts_ns == 1 * S  # the zone whose event it failed on
    assert alert.evidence["rule.name"] == "deep"
    assert alert.evidence["rule.where"].startswith(f"{tmp_path / 'r.yaml'}:")
    assert alert.evidence["error"].startswith("RecursionError")
    assert [a.rule for a in alerts if a.rule == "plain"] == ["plain", "plain"]
    assert (engine.counters.eval_errors, engine.counters.rules_disabled) == (1, 1)
    # off until the rules reload: with a normal stack it would match, and doesn't run
    assert [a.rule for a in engine.process([unlink(3 * S, "/deep")])] == ["plain"]
    assert engine.counters.eval_errors == 1
    assert next(r for r in engine.rules if r.name == "deep").disabled
    # reported on /metrics (what delivery.watch_agent hands the Prometheus sink)
    sink = PrometheusSink(address=None)
    counters = engine.counters
    sink.health = lambda: AgentHealth(
        rule_eval_errors=counters.eval_errors, rules_disabled=counters.rules_disabled
    )
    text = generate_latest(sink.registry).decode()
    assert "zonewatch_rule_eval_errors_total 1.0" in text
    assert "zonewatch_rules_disabled_total 1.0" in text


def test_a_reload_compiles_off_the_loop(tmp_path: Path) -> None:
    """Rules that take seconds to compile: maybe_reload() returns at once and the running
    rules keep answering until the new ones are complete."""
    path = write(tmp_path, MASS)
    rules = RuleSet([path], check_interval=0)
    big = " or ".join(f"file.path = /p{i} or file.host_path = /h{i}" for i in range(1000))
    uses = " or ".join(["big"] * 24)
    heavy = f"- macro: big\n  condition: ({big})\n" + "".join(
        f"- rule: r{i}\n  condition: channel = file and ({uses})\n  output: x\n  severity: low\n"
        for i in range(4)
    )
    path.write_text(HEAD + MASS + heavy)
    started = time.perf_counter()
    assert rules.maybe_reload() is False  # compiling in its thread
    returned = time.perf_counter() - started
    assert returned < 0.2, f"{returned:.2f} s"
    before = rules.engine
    assert rules.engine.process([unlink(0), unlink(1), unlink(2)])  # the old rules answer
    rules.join(60)
    compiled = time.perf_counter() - started
    assert rules.maybe_reload() is True
    assert rules.engine is not before and len(rules.engine.rules) == 5
    print(f"maybe_reload returned in {returned * 1e3:.1f} ms; compiled in {compiled:.2f} s")
