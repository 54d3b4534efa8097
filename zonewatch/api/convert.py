"""model <-> zonewatch.v1 messages."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from zonewatch.api.gen.zonewatch.v1 import zonewatch_pb2 as pb
from zonewatch.model import Alert, Severity, Zone, ZoneRef, ZoneStats, json_bytes, utf8_text

# ZoneStats fields that are maps in the message; every other field is a scalar of the same
# name (tests/unit/test_api_convert.py checks that both sides list the same fields).
STATS_MAPS = (
    "exits_by_reason", "pio_ports", "mmio_pages",
    "exit_latency_hist_ns", "vmm_latency_hist_ns", "run_delay_hist_ns",
)  # fmt: skip
STATS_SKIP = ("zone",)


def zone_ref_pb(ref: ZoneRef) -> Any:
    return pb.ZoneRef(
        id=utf8_text(ref.id), name=utf8_text(ref.name), tenant=utf8_text(ref.tenant), vmm=ref.vmm
    )


def zone_ref_from_pb(msg: Any) -> ZoneRef:
    return ZoneRef(msg.id, msg.name, msg.tenant, msg.vmm)


def alert_pb(alert: Alert) -> Any:
    return pb.Alert(
        seq=alert.seq,
        ts_ns=alert.ts_ns,
        zone=zone_ref_pb(alert.zone),
        rule=utf8_text(alert.rule),
        severity=f"SEVERITY_{alert.severity.name}",
        summary=utf8_text(alert.summary),
        tags=[utf8_text(t) for t in alert.tags],
        evidence_json=json_bytes(alert.evidence, orjson.OPT_NON_STR_KEYS).decode(),
        count=alert.count,
        first_ts_ns=alert.first_ts_ns,
        last_ts_ns=alert.last_ts_ns,
        lost_in_window=alert.lost_in_window,
    )


def alert_from_pb(msg: Any) -> Alert:
    return Alert(
        ts_ns=msg.ts_ns,
        zone=zone_ref_from_pb(msg.zone),
        rule=msg.rule,
        severity=Severity(msg.severity or Severity.INFO),
        summary=msg.summary,
        tags=tuple(msg.tags),
        evidence=orjson.loads(msg.evidence_json) if msg.evidence_json else {},
        count=msg.count,
        first_ts_ns=msg.first_ts_ns,
        last_ts_ns=msg.last_ts_ns,
        lost_in_window=msg.lost_in_window,
        seq=msg.seq,
    )


def zone_pb(zone: Zone) -> Any:
    return pb.Zone(
        ref=zone_ref_pb(zone.ref),
        pid=zone.pid,
        vcpu_tids=list(zone.vcpu_tids),
        taps=list(zone.taps),
        shares=[
            pb.Share(tag=s.tag, host_path=s.host_path, backend=s.backend, guest_path=s.guest_path)
            for s in zone.shares
        ],
        disks=list(zone.disks),
        helper_pids=list(zone.helper_pids),
        labels=dict(zone.labels),
    )


def stats_pb(stats: ZoneStats) -> Any:
    msg = pb.ZoneStats(zone=zone_ref_pb(stats.zone))
    known = msg.DESCRIPTOR.fields_by_name
    for f in dataclasses.fields(stats):
        if f.name in STATS_SKIP or f.name not in known:  # a field newer than the proto
            continue
        value = getattr(stats, f.name)
        if f.name in STATS_MAPS:
            getattr(msg, f.name).update(value)
        else:
            setattr(msg, f.name, value)
    return msg


def stats_from_pb(msg: Any) -> ZoneStats:
    kwargs: dict[str, Any] = {}
    known = msg.DESCRIPTOR.fields_by_name
    for f in dataclasses.fields(ZoneStats):
        if f.name in STATS_SKIP or f.name not in known:
            continue
        value = getattr(msg, f.name)
        kwargs[f.name] = dict(value) if f.name in STATS_MAPS else value
    return ZoneStats(zone=zone_ref_from_pb(msg.zone), **kwargs)
