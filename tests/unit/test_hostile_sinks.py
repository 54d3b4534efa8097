"""Hostile guest strings through every sink, from the decoders that really make them: zone
names from a VMM's argv (any bytes), file paths and process names from kernel bytes, DNS
labels from frames. JSON lines (events, alerts), OCSF, the journal, gRPC messages,
Prometheus labels, OTLP attributes and the TUI: nothing raises, every output is valid
(UTF-8, JSON, proto, exposition format), no raw ESC byte in the JSON outputs, names bounded.
The same with a 1 MiB string and with lone surrogates that reach a sink by another road."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from zonewatch.api.convert import alert_from_pb, alert_pb, zone_pb
from zonewatch.exporters.jsonl import JsonlSink
from zonewatch.exporters.ocsf import OcsfSink
from zonewatch.exporters.otlp import alert_attributes
from zonewatch.exporters.prometheus import PrometheusSink
from zonewatch.inventory.cmdline import MAX_NAME_LEN, parse_vmm_cmdline
from zonewatch.journal import decode, encode
from zonewatch.model import (
    Alert,
    FileEvent,
    Severity,
    Vmm,
    Zone,
    ZoneRef,
    ZoneStats,
    utf8_text,
)
from zonewatch.pipeline import text
from zonewatch.probes.net import escape_label
from zonewatch.tui.escape import escape

HOSTILE = [
    b"\x1b[2J\x1b]0;pwned\x07",  # clear screen, set the terminal's title
    b"\xc2\x9b31m\xe2\x80\xaeevil",  # C1 CSI, right-to-left override
    b"\xff\xfe\xc3(",  # invalid UTF-8
    b"new\nline\r\x00nul",
    b"A" * (1 << 20),  # 1 MiB
]


def records(raw: bytes) -> tuple[Zone, FileEvent, Alert]:
    """A zone, a file event and an alert whose strings come from `raw` the way the agent
    makes them."""
    spec = parse_vmm_cmdline(["qemu-system-x86_64", "-name", os.fsdecode(raw[:65536] or b"x")])
    assert spec is not None
    zone = Zone(id="qemu-1-2", key=1, name=spec.name or "x", tenant="acme", vmm=Vmm.QEMU,
                pid=1, start_time=2)  # fmt: skip
    path = text(raw[:4096])  # the file channel's paths are at most 4096 bytes
    event = FileEvent(1, zone.ref, "create", path, path, 1, 1, text(raw[:16]))
    dns = escape_label(raw[:63])
    alert = Alert(1, zone.ref, "rule", Severity.HIGH, f"{path} asked {dns}", ("t",),
                  {"file.path": path, "net.dns_qname": dns}, 1, 1, 1, seq=7)  # fmt: skip
    return zone, event, alert


def check_every_sink(zone: Zone, event: FileEvent, alert: Alert, tmp: Path) -> None:
    jsonl, ocsf = tmp / "out.jsonl", tmp / "ocsf.jsonl"
    for path in (jsonl, ocsf):
        path.unlink(missing_ok=True)
    sink, osink = JsonlSink(str(jsonl)), OcsfSink(str(ocsf))
    sink.export([event, alert])
    osink.export([alert])
    sink.shutdown()
    osink.shutdown()
    for path in (jsonl, ocsf):
        data = path.read_bytes()
        assert b"\x1b" not in data
        data.decode("utf-8")  # valid UTF-8; lines end at \n only (not at U+0085 or U+2028)
        lines = [orjson.loads(line) for line in data.split(b"\n") if line]
        assert len(lines) == (2 if path == jsonl else 1)
    back = decode(encode(alert))
    assert back.zone == alert.zone or "\\x" in back.zone.name  # lone surrogates escaped
    assert alert_from_pb(type(alert_pb(alert)).FromString(alert_pb(alert).SerializeToString()))
    zone_pb(zone).SerializeToString()
    for key, value in alert_attributes(alert).items():
        if isinstance(value, str):
            KeyValue(key=key, value=AnyValue(string_value=value)).SerializeToString()
    prom = PrometheusSink(None)
    prom.set_zones([zone])
    prom.update_stats([ZoneStats(1, zone.ref, 1.0)])
    prom.export([alert])
    exposition = generate_latest(prom.registry).decode("utf-8")
    families = list(text_string_to_metric_families(exposition))
    labels = {s.labels.get("zone") for f in families for s in f.samples} - {None}
    assert labels == {zone.name, utf8_text(alert.zone.name)}
    shown = escape(zone.name)
    assert shown.isprintable() and len(shown) <= 256


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(min_size=1, max_size=300))
def test_any_bytes_pass_every_sink(raw: bytes, tmp_path: Path) -> None:
    zone, event, alert = records(raw)
    assert zone.name.isprintable() and len(zone.name) <= MAX_NAME_LEN
    check_every_sink(zone, event, alert, tmp_path)


def test_the_hostile_classics_and_a_mebibyte(tmp_path: Path) -> None:
    for raw in HOSTILE:
        zone, event, alert = records(raw)
        assert "\x1b" not in zone.name and "\u202e" not in zone.name
        assert len(zone.name) <= MAX_NAME_LEN
        check_every_sink(zone, event, alert, tmp_path)


def test_lone_surrogates_that_reach_a_sink_are_escaped_not_fatal(tmp_path: Path) -> None:
    """A string no decoder of ours makes (a surrogate left in by a future field): the
    journal, JSON lines and gRPC escape it instead of failing the agent."""
    bad = "bad\udcff\ud800"
    ref = ZoneRef("qemu-1-2", bad, "acme", "qemu")
    alert = Alert(1, ref, "rule", Severity.HIGH, bad, (bad,), {bad: bad}, 1, 1, 1, seq=3)
    line = encode(alert)
    assert decode(line).zone.name == "bad\\xff\\ud800"
    zone = Zone(id="qemu-1-2", key=1, name="z", tenant="acme", vmm=Vmm.QEMU, pid=1, start_time=2)
    event = FileEvent(1, ref, "open", bad, bad, 1, 1, bad)
    check_every_sink(zone, event, alert, tmp_path)
    pb = alert_pb(alert)
    assert pb.zone.name == "bad\\xff\\ud800" and pb.summary == "bad\\xff\\ud800"
