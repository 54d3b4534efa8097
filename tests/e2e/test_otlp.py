"""Issue 6, end to end: a lab zone (a real QEMU guest) writes /etc/shadow through its 9p
share; the real agent (`zonewatch run --rules rules`) raises the alert, and a real OTLP
receiver (a gRPC server built from opentelemetry-proto's services) gets the log record, the
detection span and the per-zone metrics, with the documented attributes and the log record
carrying the span's trace id. The same alert reaches a gRPC subscriber and the JSONL file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess
from tests.helpers.otlp_receiver import OtlpReceiver, attrs
from zonewatch.api.client import Client, Filter, open_channel
from zonewatch.lab.assets import GuestAssets
from zonewatch.lab.qemu import QemuZone, ZoneSpec

RULE = "Account file written through a share"
WORKLOAD = """
while [ ! -e /mnt/share/go ]; do sleep 0.1; done
mkdir -p /mnt/share/etc
echo 'root:x:0:0' > /mnt/share/etc/shadow
"""
TENANTS = """version: 1
tenants:
  - name: acme
    zones: ["e2e-otlp-*"]
"""
TOKENS = """version: 1
tokens:
  - name: e2e
    token: e2e-token-0001
    tenants: [acme]
"""


@pytest.fixture
def zone(lab_assets: GuestAssets) -> Iterator[QemuZone]:
    z = QemuZone(ZoneSpec(name="e2e-otlp-1", tenant="acme", workload=WORKLOAD, index=43))
    try:
        z.start()
        z.wait_ready(timeout=90)
        yield z
    finally:
        z.stop()


def test_lab_zone_alert_reaches_otlp_grpc_and_jsonl(
    tmp_path: Path, zone: QemuZone, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tenants.yaml").write_text(TENANTS)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS)
    tokens.chmod(0o600)
    sock = f"unix:{tmp_path}/zw.sock"
    # Short batching and export intervals through the standard variables (honoured).
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "200")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "1000")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=e2e")
    root = Path(__file__).resolve().parents[2]
    with OtlpReceiver() as receiver, AgentProcess(
        tmp_path, "--tenants", str(tmp_path / "tenants.yaml"), "--share-mount", "share=/",
        "--rules", str(root / "rules"), "--otlp", receiver.endpoint,
        "--journal", str(tmp_path / "journal"), "--tokens", str(tokens), "--grpc", sock,
    ) as agent:  # fmt: skip
        client = Client(open_channel(sock), "e2e-token-0001")
        stream = client.subscribe(Filter(rules=[RULE]), resume_after_seq=0, timeout=120)
        (zone.share_dir / "go").write_text("")
        assert zone.wait_workload_exit(timeout=60) == 0

        def alert_logs() -> list[tuple[dict[str, Any], Any]]:
            return [
                (res, rec) for res, rec in receiver.logs
                if rec.event_name == "zonewatch.alert"
                and attrs(rec.attributes).get("security_rule.name") == RULE
            ]  # fmt: skip

        receiver.wait_for(lambda: bool(alert_logs()), 60, "the alert's log record")
        res, rec = alert_logs()[0]
        a = attrs(rec.attributes)
        receiver.wait_for(
            lambda: any(s.trace_id == rec.trace_id for _, s in receiver.spans), 30, "its span"
        )
        receiver.wait_for(
            lambda: (
                {"zonewatch.alerts", "zonewatch.zone.file.ops.rate"}
                <= {m.name for _, m in receiver.metrics}
            ),
            30,
            "alert counter and per-zone metrics",
        )
        grpc_alert = next(m.alert for m in stream if m.WhichOneof("msg") == "alert")
        stream.cancel()
        client.close()
        agent.wait_for(
            lambda lines: any(x["type"] == "alert" and x["rule"] == RULE for x in lines),
            30,
            "the alert in JSONL",
        )
        jsonl_alert = next(x for x in agent.read() if x["type"] == "alert" and x["rule"] == RULE)

    # The log record: event name, severity, security_rule.*, zone, tenant, evidence.
    assert rec.severity_number == 17 and rec.severity_text == "HIGH"  # ERROR for high
    assert a["zonewatch.zone.name"] == "e2e-otlp-1"
    assert a["zonewatch.tenant.id"] == "acme"
    assert a["zonewatch.zone.vmm"] == "qemu"
    assert a["security_rule.uuid"] and a["security_rule.ruleset.name"] == "zonewatch"
    assert a["security_rule.reference"].startswith("https://attack.mitre.org/techniques/T1098")
    assert a["file.path"] == "/etc/shadow"
    assert a["zonewatch.alert.seq"] == grpc_alert.seq == jsonl_alert["seq"]
    assert "shadow" in rec.body.string_value
    # The resource names the host and the service; OTEL_RESOURCE_ATTRIBUTES is honoured.
    assert res["service.name"] == "zonewatch" and res["host.name"]
    assert res["deployment.environment.name"] == "e2e"
    # The span: same trace and span id as the log record, timing the detection.
    span = next(s for _, s in receiver.spans if s.trace_id == rec.trace_id)
    assert span.span_id == rec.span_id and len(rec.trace_id) == 16
    assert span.name == "zonewatch.detection"
    assert attrs(span.attributes)["security_rule.name"] == RULE
    assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
    # Metrics: the alert counter and the per-zone gauges carry the zone and tenant.
    points = [
        attrs(p.attributes)
        for _, m in receiver.metrics if m.name == "zonewatch.alerts"
        for p in m.sum.data_points
    ]  # fmt: skip
    assert any(
        p["zonewatch.zone.name"] == "e2e-otlp-1" and p["zonewatch.tenant.id"] == "acme"
        for p in points
    )
    gauges = [
        attrs(p.attributes)
        for _, m in receiver.metrics if m.name == "zonewatch.zone.file.ops.rate"
        for p in m.gauge.data_points
    ]  # fmt: skip
    assert any(g["zonewatch.zone.name"] == "e2e-otlp-1" for g in gauges)
