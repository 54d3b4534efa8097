"""OCSF Detection Finding (class 2004) lines, checked against the OCSF 1.5.0 schema, and the
proto conversions they share data with.

The schema check is pydantic-ocsf's models of OCSF 1.5.0 (built from the schema export it
bundles: required attributes, types, enums, id/caption pairs such as severity_id/severity),
plus two checks it leaves out: no attribute the schema does not define (its models accept
extras), and the objects' `at_least_one`/`just_one` constraints.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest
from ocsf.v1_5_0.events import DetectionFinding
from pydantic import BaseModel, ValidationError

from tests.helpers.alerts import make_alert
from zonewatch.api import convert
from zonewatch.api.gen.zonewatch.v1 import zonewatch_pb2 as pb
from zonewatch.exporters.identity import HostIdentity
from zonewatch.exporters.ocsf import OCSF_VERSION, OcsfSink, finding
from zonewatch.journal import Journal
from zonewatch.model import Alert, KvmEvent, Lost, Severity, ZoneRef, ZoneStats
from zonewatch.rules.engine import RuleContext, RuleEngine
from zonewatch.rules.fields import FIELDS, Lookups
from zonewatch.rules.fixtures import fixture_files, load_fixtures, replay_records

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "rules"
HOST = HostIdentity("node-a", "0123456789abcdef0123456789abcdef", "b00710", "6.18.0")
SCHEMA = json.loads(
    resources.files("ocsf").joinpath(f"schemas/v{OCSF_VERSION.replace('.', '_')}.json").read_text()
)
# pydantic-ocsf's model class name -> the schema's object name (NetworkEndpoint -> network_endpoint)
OBJECTS = {"".join(p.capitalize() for p in name.split("_")): name for name in SCHEMA["objects"]}


def schema_problems(obj: dict[str, Any]) -> list[str]:
    """Why `obj` is not a valid OCSF 1.5.0 Detection Finding ([] when it is)."""
    try:  # on a copy: the models fill in captions in their input (severity from severity_id)
        model = DetectionFinding.model_validate(copy.deepcopy(obj))
    except ValidationError as exc:
        return [str(exc)]
    problems: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
            return
        if not isinstance(node, BaseModel):
            return
        problems.extend(f"{where}.{k}: not in the schema" for k in node.model_extra or {})
        name = OBJECTS.get(type(node).__name__)
        constraints = SCHEMA["objects"][name].get("constraints", {}) if name else {}
        present = {k for k in type(node).model_fields if getattr(node, k) is not None}
        for kind, attrs in constraints.items():
            n = len(present & {a.removesuffix("_") for a in attrs} | present & set(attrs))
            if (kind == "at_least_one" and n < 1) or (kind == "just_one" and n != 1):
                problems.append(f"{where}: {kind} of {attrs}")
        for attr in type(node).model_fields:
            if attr != "unmapped":  # OCSF's free-form object: anything goes there
                walk(getattr(node, attr), f"{where}.{attr}")

    walk(model, "finding")
    return problems


@functools.cache
def fixture_alerts() -> tuple[Alert, ...]:
    """Every alert the default rules raise on their own fixtures (numbered from 1)."""
    alerts: list[Alert] = []
    for path in fixture_files([RULES]):
        fixtures, problems = load_fixtures(path)
        assert not problems, problems
        for fx in fixtures:
            if fx.expect == "fire":
                addresses = fx.addresses
                engine = RuleEngine.load([RULES], RuleContext(zone_addresses=lambda a=addresses: a))
                alerts += [a for a in replay_records(engine, fx.records) if a.rule == fx.rule]
    for seq, alert in enumerate(alerts, 1):
        alert.seq = seq
    return tuple(alerts)


def channel_records() -> dict[str, Any]:
    """One recorded record of each channel from the fixtures (stats holds kvm, sched, net
    and file rates; the fixtures have no kvm event: a hypercall stands in)."""
    found: dict[str, Any] = {
        "kvm": KvmEvent(
            1, ZoneRef("z", "zone-a", "acme", "qemu"), "hypercall", 7, 8, "CPU 0/KVM", 11, (1, 2, 3)
        )
    }
    for path in fixture_files([RULES]):
        for fx in load_fixtures(path)[0]:
            for record in fx.records:
                stats = isinstance(record, ZoneStats)
                found.setdefault("stats" if stats else getattr(record, "channel", ""), record)
    return found


def test_the_checker_catches_what_the_issue_found() -> None:
    """The schema check fails on the old output's faults, so its passing means something."""
    good = finding(make_alert(1, severity=Severity.INFO), HOST)
    assert schema_problems(good) == []
    bad_caption = {**good, "severity": "Info"}
    assert "Informational" in schema_problems(bad_caption)[0]
    no_type = json.loads(json.dumps(good))
    del no_type["evidences"][0]["file"]["type_id"]
    assert "type_id" in schema_problems(no_type)[0]
    assert schema_problems({**good, "zone": "a"}) == ["finding.zone: not in the schema"]
    no_ip = json.loads(json.dumps(good))
    no_ip["evidences"][0]["dst_endpoint"] = {"port": 53}
    assert "at_least_one" in schema_problems(no_ip)[0]


def test_every_default_rule_fixture_alert_is_a_valid_finding() -> None:
    alerts = fixture_alerts()
    assert len({a.rule for a in alerts}) >= 20  # every rule with a firing fixture
    for alert in alerts:
        f = finding(alert, HOST)
        assert schema_problems(f) == [], (alert.rule, schema_problems(f))
        assert f["metadata"]["version"] == OCSF_VERSION


@pytest.mark.parametrize("channel", ["file", "proc", "net", "kvm", "stats"])
def test_an_alert_with_every_field_of_a_channel_is_a_valid_finding(channel: str) -> None:
    record = channel_records()[channel]
    evidence = {
        name: f.getter(channel, Lookups())(record)
        for name, f in FIELDS.items()
        if channel in f.sources and name not in ("channel", "op") and not name.startswith("zone.")
    }
    evidence["proc.pid"] = evidence.get("proc.pid", 4242)
    tags = ("maturity_stable", "zone", "mitre_impact", "T1499", "T9999.001")
    alert = Alert(1, ZoneRef("z", "zone-a", "acme", "qemu"), "r", Severity.LOW, "s", tags, evidence)
    f = finding(alert, HOST)
    assert schema_problems(f) == []
    assert f["evidences"][0]["data"] == evidence


def test_evidence_becomes_typed_objects() -> None:
    evidence = {
        "file.path": "/srv/share/etc/shadow",
        "file.mode": 0o060644,  # a block device node
        "proc.pid": 7,
        "proc.comm": "qemu-system-x86",
        "proc.exe": "/usr/bin/qemu-system-x86_64",
        "proc.args": "qemu-system-x86_64 -m 256",
        "proc.ppid": 1,
        "net.dst_ip": "10.0.0.9",
        "net.dst_port": 53,
        "net.dns_qname": "evil.example",
        "net.dns_qtype": "A",
    }
    alert = Alert(1, ZoneRef("z", "zone-a", "acme", "qemu"), "r", Severity.HIGH, "s", (), evidence)
    (ev,) = finding(alert, HOST)["evidences"]
    assert ev["file"] == {"name": "shadow", "path": "/srv/share/etc/shadow", "type_id": 4}
    assert ev["process"]["file"] == {
        "name": "qemu-system-x86_64",
        "path": "/usr/bin/qemu-system-x86_64",
        "type_id": 1,
    }
    assert (ev["process"]["pid"], ev["process"]["name"]) == (7, "qemu-system-x86")
    assert ev["process"]["cmd_line"] == "qemu-system-x86_64 -m 256"
    assert ev["dst_endpoint"] == {"ip": "10.0.0.9", "port": 53}
    assert ev["query"] == {"hostname": "evil.example", "type": "A"}
    assert schema_problems(finding(alert, HOST)) == []


def test_hostile_evidence_still_makes_a_valid_finding() -> None:
    evidence = {
        "file.path": "/\udcff\x1b[2J/",
        "file.mode": -1,
        "proc.pid": 1 << 40,
        "proc.exe": "",
        "net.dst_ip": "",
        "net.dst_port": "53; rm",
        "net.src_ip": "10.0.0.2",
        "net.src_port": 1 << 20,
        "net.dns_qname": "\\255\\000.example",
    }
    alert = Alert(
        1, ZoneRef("z", "z\udcfe", "acme", "qemu"), "r", Severity.HIGH, "s\udcff", (), evidence
    )
    f = finding(alert, HOST)
    line = _write_and_read([alert])[0]
    assert schema_problems(line) == []
    ev = f["evidences"][0]
    assert ev["file"]["type_id"] == 0 and "process" not in ev and "dst_endpoint" not in ev
    assert ev["src_endpoint"] == {"ip": "10.0.0.2"}  # the impossible port left out


def _write_and_read(alerts: Sequence[Alert], host: HostIdentity = HOST) -> list[dict[str, Any]]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ocsf.jsonl"
        sink = OcsfSink(str(out), host)
        sink.export(alerts)
        sink.shutdown()
        return [orjson.loads(x) for x in out.read_bytes().splitlines()]


def test_required_fields_device_tenant_and_attacks() -> None:
    alert = make_alert(
        3,
        "globex",
        severity=Severity.CRITICAL,
        tags=("maturity_stable", "zone", "filesystem", "mitre_persistence", "T1098", "T1136.001"),
    )
    alert.seq = 77
    f = finding(alert, HOST)
    assert (f["class_uid"], f["category_uid"], f["activity_id"]) == (2004, 2, 1)
    assert f["type_uid"] == 200401
    assert (f["severity_id"], f["severity"], f["is_alert"]) == (5, "Critical", True)
    assert f["time"] == alert.ts_ns // 1_000_000
    assert f["metadata"]["tenant_uid"] == "globex" and f["metadata"]["sequence"] == 77
    assert f["metadata"]["uid"] == f["finding_info"]["uid"]
    assert f["device"]["hostname"] == "node-a"
    assert f["device"]["uid"] == HOST.machine_id and f["device"]["boot_uid"] == "b00710"
    assert f["device"]["agent_list"][0]["name"] == "zonewatch"
    assert f["finding_info"]["analytic"]["name"] == "test_rule"
    assert f["finding_info"]["types"] == ["zone", "filesystem"]
    persistence = {
        "uid": "TA0003",
        "name": "Persistence",
        "src_url": "https://attack.mitre.org/tactics/TA0003/",
    }
    assert f["finding_info"]["attacks"] == [
        {
            "technique": {
                "uid": "T1098",
                "name": "Account Manipulation",
                "src_url": "https://attack.mitre.org/techniques/T1098/",
            },
            "tactic": persistence,
        },
        {
            "technique": {
                "uid": "T1136",
                "name": "Create Account",
                "src_url": "https://attack.mitre.org/techniques/T1136/",
            },
            "sub_technique": {
                "uid": "T1136.001",
                "name": "Local Account",
                "src_url": "https://attack.mitre.org/techniques/T1136/001/",
            },
            "tactic": persistence,
        },
    ]
    assert f["resources"][0]["name"] == alert.zone.name


def test_every_technique_and_tactic_the_default_rules_name_has_its_name() -> None:
    for alert in fixture_alerts():
        for item in finding(alert, HOST)["finding_info"]["attacks"]:
            for part in ("technique", "sub_technique", "tactic"):
                if part in item:
                    assert item[part].get("name"), (alert.rule, item[part])


def test_ids_are_stable_for_an_alert_and_never_shared_by_two_hosts(tmp_path: Path) -> None:
    """Two agents (host names, machine ids, boot ids, journals of their own) each number
    the same alerts from 1 in their journal: no finding id or correlation id is shared
    between them, while an alert read back from its journal and exported again keeps its
    ids."""
    other = HostIdentity("node-b", "fedcba9876543210fedcba9876543210", "b00711", "6.18.0")
    exported: dict[HostIdentity, list[dict[str, Any]]] = {}
    journals: dict[HostIdentity, Journal] = {}
    for host in (HOST, other):
        journal = journals[host] = Journal(tmp_path / host.hostname)
        alerts = [dataclasses.replace(a, seq=0) for a in fixture_alerts()]
        journal.append(alerts)  # numbers them 1..n, as each agent does
        assert [a.seq for a in alerts] == list(range(1, len(alerts) + 1))
        exported[host] = _write_and_read(alerts, host)
    try:
        ids = [f["finding_info"]["uid"] for fs in exported.values() for f in fs]
        assert len(set(ids)) == len(ids) == 2 * len(fixture_alerts())
        corr = [{f["metadata"]["correlation_uid"] for f in fs} for fs in exported.values()]
        assert not corr[0] & corr[1]
        replayed = journals[HOST].read_after(0, limit=len(ids)).alerts
        again = _write_and_read(replayed, HOST)
        assert [f["finding_info"]["uid"] for f in again] == [
            f["finding_info"]["uid"] for f in exported[HOST]
        ]
    finally:
        for journal in journals.values():
            journal.close()
    # A seq issued again (a wiped journal) at another time is another finding.
    first = exported[HOST][0]
    reissued = dataclasses.replace(fixture_alerts()[0], seq=1, ts_ns=fixture_alerts()[0].ts_ns + 1)
    assert finding(reissued, HOST)["finding_info"]["uid"] != first["finding_info"]["uid"]


def test_hosts_cloned_from_one_image_or_without_a_machine_id_do_not_collide() -> None:
    clone = HostIdentity("node-c", HOST.machine_id, "b00712", "6.18.0")  # same machine id
    bare = [HostIdentity(name, "", "b0", "6.18.0") for name in ("node-d", "node-e")]
    alerts = fixture_alerts()
    ids = [finding(a, h)["finding_info"]["uid"] for h in (HOST, clone, *bare) for a in alerts]
    assert len(set(ids)) == len(ids) == 4 * len(alerts)
    assert "uid" not in finding(alerts[0], bare[0])["device"]  # no machine id: none claimed


def test_correlation_uid_groups_one_rule_on_one_zone() -> None:
    a, b = make_alert(1), make_alert(2)
    c = make_alert(3, rule="other_rule")
    d = make_alert(4, "globex")
    corr = [finding(x, HOST)["metadata"]["correlation_uid"] for x in (a, b, c, d)]
    assert corr[0] == corr[1] and len(set(corr)) == 3


def test_severity_ids_and_captions_follow_ocsf() -> None:
    got = [
        (f["severity_id"], f["severity"])
        for f in (finding(make_alert(0, severity=s), HOST) for s in Severity)
    ]
    assert got == [(1, "Informational"), (2, "Low"), (3, "Medium"), (4, "High"), (5, "Critical")]


def test_sink_writes_one_line_per_alert_and_skips_other_records(tmp_path: Path) -> None:
    out = tmp_path / "ocsf.jsonl"
    sink = OcsfSink(str(out), HOST)
    sink.export([make_alert(0), Lost(1, "ringbuf", 3), make_alert(1)])
    sink.shutdown()
    lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert [line["class_uid"] for line in lines] == [2004, 2004]
    assert all(schema_problems(line) == [] for line in lines)


def test_alert_proto_roundtrip() -> None:
    alert = make_alert(5, "acme", severity=Severity.LOW)
    alert.seq = 9
    assert convert.alert_from_pb(convert.alert_pb(alert)) == alert


def test_every_zonestats_field_is_in_the_proto() -> None:
    names = {f.name for f in dataclasses.fields(ZoneStats)} - set(convert.STATS_SKIP)
    missing = names - set(pb.ZoneStats.DESCRIPTOR.fields_by_name)
    assert not missing, f"add {sorted(missing)} to ZoneStats in zonewatch.proto"
    stats = ZoneStats(
        1,
        make_alert(0).zone,
        1.0,
        exits_per_s=3.5,
        exits_by_reason={"io": 2.0},
        open_alerts=2,
        vmm_latency_p99_us=12.5,
        run_delay_hist_ns={"4096": 3, "8192": 1},
    )
    assert convert.stats_from_pb(convert.stats_pb(stats)) == stats
