"""Rule fixtures: recorded-shape events a rule must fire on, and events it must stay silent
on. `zonewatch rules test PATH` runs every fixture against the whole rule set (as in
production: every rule loaded), and fails any enabled rule that lacks either kind.

A fixture file (rules/fixtures/*.yaml) is a list of:
    - fixture: ssh key planted            # a name
      rule: Write to SSH authorized keys through a share
      expect: fire                        # or: silent
      count: 3                            # optional: matches in all (sum of alert counts)
      context: {zone_addresses: {10.0.9.2: {name: db-1, tenant: globex}}}
      events:
        - {t: 0, channel: file, op: write, file: {path: /root/.ssh/authorized_keys}}
        - repeat: 50                      # the event 50 times, `every` apart; "{i}" in
          every: 1s                       # a string is the repetition's number
          event: {channel: net, op: flow_start, net: {dst_ip: 10.0.0.9, dst_port: "{i}"}}
Events take the JSON-lines shape (`type: stats` for snapshots; `type: lost` too); `t` is
seconds after the fixture's start (default: just after the previous event), `zone` a
name or a {id, name, tenant, vmm} mapping (default zone-a of tenant acme).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, SequenceNode

from zonewatch.model import Alert, Lost, ZoneRef, ZoneStats, record_from_json, rfc3339_ns
from zonewatch.rules.compiler import Problem, parse_duration
from zonewatch.rules.engine import RuleContext, RuleEngine
from zonewatch.rules.loader import BoundedLoader

BASE_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z: fixtures start here
DEFAULT_ZONE = {"id": "zone-a", "name": "zone-a", "tenant": "acme", "vmm": "qemu"}
FIXTURE_KEYS = frozenset({"fixture", "rule", "expect", "count", "context", "events"})


@dataclass(slots=True)
class Fixture:
    name: str
    rule: str
    expect: str  # "fire" or "silent"
    where: str
    records: list[Any] = field(default_factory=list)
    count: int | None = None
    addresses: dict[str, ZoneRef] = field(default_factory=dict)


@dataclass(slots=True)
class Outcome:
    fixture: Fixture
    ok: bool
    message: str


def _seconds(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        return parse_duration(value) / 1e9
    raise ValueError(f"expected seconds or a duration, got {value!r}")


def _zone(value: Any) -> dict[str, str]:
    if value is None:
        return dict(DEFAULT_ZONE)
    if isinstance(value, str):
        return {"id": value, "name": value, "tenant": "acme", "vmm": "qemu"}
    if isinstance(value, dict):
        name = str(value.get("name", value.get("id", "zone-a")))
        return {
            "id": str(value.get("id", name)),
            "name": name,
            "tenant": str(value.get("tenant", "acme")),
            "vmm": str(value.get("vmm", "qemu")),
        }
    raise ValueError(f"zone: expected a name or a mapping, got {value!r}")


def _substitute(value: Any, i: int) -> Any:
    if isinstance(value, str) and "{i}" in value:
        return value.replace("{i}", str(i))
    if isinstance(value, dict):
        return {k: _substitute(v, i) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, i) for v in value]
    return value


class _Reader:
    def __init__(self, name: str) -> None:
        self.name = name
        self.t = 0.0

    def where(self, node: yaml.Node) -> str:
        return f"{self.name}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"

    def records(self, events: Any, where: str) -> list[Any]:
        if not isinstance(events, list) or not events:
            raise Problem(where, "events must be a non-empty list")
        out: list[Any] = []
        for item in events:
            if not isinstance(item, dict):
                raise Problem(where, f"an event is a mapping, got {item!r}")
            if "repeat" in item:
                times, every = int(item["repeat"]), _seconds(item.get("every", 1))
                start = self.t if "t" not in item else _seconds(item["t"])
                for i in range(times):
                    event = _substitute(dict(item["event"]), i)
                    event["t"] = start + i * every
                    out.append(self.record(event, where))
            else:
                out.append(self.record(item, where))
        return out

    def record(self, event: dict[str, Any], where: str) -> Any:
        self.t = _seconds(event["t"]) if "t" in event else self.t + 0.001
        line = {k: v for k, v in event.items() if k != "t"}
        line.setdefault("type", "event")
        line["ts"] = rfc3339_ns(BASE_NS + round(self.t * 1e9))
        line["zone"] = _zone(line.get("zone"))
        try:
            record = record_from_json(line)
        except (KeyError, ValueError, TypeError) as exc:
            raise Problem(where, f"bad event {event!r}: {exc}") from None
        if record is None:
            raise Problem(where, f"not an event, stats or lost line: {event!r}")
        return record


def load_fixtures(path: Path) -> tuple[list[Fixture], list[Problem]]:
    name = str(path)
    fixtures: list[Fixture] = []
    problems: list[Problem] = []
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=BoundedLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else f"{name}:1:1"
        return [], [Problem(where, f"invalid YAML: {exc.problem or exc}")]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return [], [Problem(f"{name}:1:1", f"cannot read fixtures: {exc}")]
    reader = _Reader(name)
    if not isinstance(root, SequenceNode):
        return [], [Problem(f"{name}:1:1", "a fixtures file is a list of fixtures")]
    for node in root.value:
        where = reader.where(node)
        try:
            if not isinstance(node, MappingNode):
                raise Problem(where, "a fixture is a mapping")
            item = SafeConstructor().construct_document(node)
            unknown = set(item) - FIXTURE_KEYS
            if unknown:
                raise Problem(where, f"unknown key(s) {sorted(unknown)} in a fixture")
            for key in ("fixture", "rule", "expect", "events"):
                if key not in item:
                    raise Problem(where, f"a fixture needs {key!r}")
            if item["expect"] not in ("fire", "silent"):
                raise Problem(where, "expect: fire or silent")
            reader.t = 0.0
            addresses = {}
            for ip, zone in ((item.get("context") or {}).get("zone_addresses") or {}).items():
                z = _zone(zone)
                addresses[str(ip)] = ZoneRef(z["id"], z["name"], z["tenant"], z["vmm"])
            fixtures.append(
                Fixture(
                    name=str(item["fixture"]),
                    rule=str(item["rule"]),
                    expect=str(item["expect"]),
                    where=where,
                    records=reader.records(item["events"], where),
                    count=None if item.get("count") is None else int(item["count"]),
                    addresses=addresses,
                )
            )
        except Problem as problem:
            problems.append(problem)
        except (ValueError, TypeError, AttributeError, KeyError, yaml.YAMLError) as exc:
            problems.append(Problem(where, f"bad fixture: {exc}"))
    return fixtures, problems


def replay_records(engine: RuleEngine, records: Iterable[Any]) -> list[Alert]:
    """Feed recorded records in order (events, stats, losses); flush at the end."""
    alerts: list[Alert] = []
    batch: list[Any] = []
    last_ts = 0
    for record in records:
        if isinstance(record, ZoneStats | Lost):
            alerts += engine.process(batch)
            batch = []
            if isinstance(record, ZoneStats):
                alerts += engine.process_stats([record])
            else:
                engine.note_lost(record.source, record.count, record.ts_ns)
        else:
            batch.append(record)
        last_ts = max(last_ts, record.ts_ns)
    alerts += engine.process(batch)
    alerts += engine.tick(last_ts)
    alerts += engine.flush()
    return alerts


def run_fixture(rule_paths: Sequence[str | Path], fixture: Fixture) -> Outcome:
    addresses: Mapping[str, ZoneRef] = fixture.addresses
    engine = RuleEngine.load(rule_paths, RuleContext(zone_addresses=lambda: addresses))
    if fixture.rule not in {r.name for r in engine.rules}:
        return Outcome(fixture, False, f"no enabled rule {fixture.rule!r}")
    alerts = [a for a in replay_records(engine, fixture.records) if a.rule == fixture.rule]
    matches = sum(a.count for a in alerts)
    if fixture.expect == "silent":
        if alerts:
            return Outcome(fixture, False, f"expected silence, got {matches} match(es): "
                           f"{alerts[0].summary}")  # fmt: skip
        return Outcome(fixture, True, "silent")
    if not alerts:
        return Outcome(fixture, False, "expected an alert, got none")
    if fixture.count is not None and matches != fixture.count:
        return Outcome(fixture, False, f"expected {fixture.count} match(es), got {matches}")
    return Outcome(fixture, True, f"fired ({matches} match(es) in {len(alerts)} alert(s))")


def fixture_files(rule_paths: Sequence[str | Path]) -> list[Path]:
    """rules DIR -> DIR/fixtures/*.yaml; a rules FILE -> the fixtures/ beside it."""
    dirs: list[Path] = []
    for p in map(Path, rule_paths):
        d = (p if p.is_dir() else p.parent) / "fixtures"
        if d.is_dir() and d not in dirs:
            dirs.append(d)
    return [f for d in dirs for f in sorted(d.iterdir()) if f.suffix in (".yaml", ".yml")]
