"""OCSF Detection Finding (class 2004) lines, and the proto conversions they share data with."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson

from tests.helpers.alerts import make_alert
from zonewatch.api import convert
from zonewatch.api.gen.zonewatch.v1 import zonewatch_pb2 as pb
from zonewatch.exporters.ocsf import OcsfSink, finding
from zonewatch.model import Lost, Severity, ZoneStats


def test_finding_has_the_required_detection_finding_fields() -> None:
    alert = make_alert(3, "globex", severity=Severity.CRITICAL)
    alert.seq = 77
    f = finding(alert)
    assert (f["class_uid"], f["category_uid"], f["activity_id"]) == (2004, 2, 1)
    assert f["type_uid"] == 200401
    assert f["severity_id"] == 5 and f["is_alert"] is True
    assert f["time"] == alert.ts_ns // 1_000_000
    assert f["metadata"]["product"]["name"] == "zonewatch"
    assert f["metadata"]["version"]
    assert f["metadata"]["tenant_uid"] == "globex"
    assert f["finding_info"]["uid"] == "zonewatch-77"
    assert f["finding_info"]["title"] == alert.summary
    assert f["finding_info"]["attacks"] == [{"technique": {"uid": "T1611"}}]
    (evidence,) = f["evidences"]
    assert evidence["file"]["path"] == "/etc/shadow-3"
    assert evidence["process"]["pid"] == 4242
    assert f["resources"][0]["name"] == alert.zone.name


def test_severity_ids_follow_ocsf() -> None:
    ids = [finding(make_alert(0, severity=s))["severity_id"] for s in Severity]
    assert ids == [1, 2, 3, 4, 5]


def test_sink_writes_one_line_per_alert_and_skips_other_records(tmp_path: Path) -> None:
    out = tmp_path / "ocsf.jsonl"
    sink = OcsfSink(str(out))
    sink.export([make_alert(0), Lost(1, "ringbuf", 3), make_alert(1)])
    sink.shutdown()
    lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert [line["class_uid"] for line in lines] == [2004, 2004]


def test_alert_proto_roundtrip() -> None:
    alert = make_alert(5, "acme", severity=Severity.LOW)
    alert.seq = 9
    assert convert.alert_from_pb(convert.alert_pb(alert)) == alert


def test_every_zonestats_field_is_in_the_proto() -> None:
    names = {f.name for f in dataclasses.fields(ZoneStats)} - set(convert.STATS_SKIP)
    missing = names - set(pb.ZoneStats.DESCRIPTOR.fields_by_name)
    assert not missing, f"add {sorted(missing)} to ZoneStats in zonewatch.proto"
    stats = ZoneStats(1, make_alert(0).zone, 1.0, exits_per_s=3.5,
                      exits_by_reason={"io": 2.0}, open_alerts=2, vmm_latency_p99_us=12.5,
                      run_delay_hist_ns={"4096": 3, "8192": 1})  # fmt: skip
    assert convert.stats_from_pb(convert.stats_pb(stats)) == stats
