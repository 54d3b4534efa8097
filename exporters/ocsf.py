"""OCSF Detection Finding (class_uid 2004) JSON lines, for SIEMs.

One finding per alert (shared/design.md, "OCSF"): category 2 (Findings), activity 1
(Create; type_uid 200401), severity_id 1-5 from the alert's severity, `finding_info.uid`
the agent's seq-based id so a SIEM de-duplicates replays, `metadata.tenant_uid` the zone's
tenant, evidence as `evidences`, and `is_alert` true. Written like the JSONL sink (file or
stdout; a dead reader is counted, never fatal).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from zonewatch import __version__
from zonewatch.exporters.base import JsonRecord
from zonewatch.exporters.jsonl import JsonlSink
from zonewatch.model import Alert, Severity

OCSF_VERSION = "1.5.0"
CLASS_UID = 2004
CATEGORY_UID = 2
ACTIVITY_CREATE = 1
SEVERITY_ID = {
    Severity.INFO: 1,
    Severity.LOW: 2,
    Severity.MEDIUM: 3,
    Severity.HIGH: 4,
    Severity.CRITICAL: 5,
}
MITRE = re.compile(r"^T\d{4}(\.\d{3})?$")


def _evidence(evidence: dict[str, Any]) -> dict[str, Any]:
    """The alert's evidence in OCSF evidence-artifact objects where a field maps cleanly."""
    out: dict[str, Any] = {"data": evidence}
    if "file.path" in evidence:
        out["file"] = {"path": evidence["file.path"], "name": str(evidence["file.path"])}
    if "proc.pid" in evidence or "proc.exe" in evidence:
        proc: dict[str, Any] = {}
        if "proc.pid" in evidence:
            proc["pid"] = evidence["proc.pid"]
        if "proc.exe" in evidence:
            proc["file"] = {"path": evidence["proc.exe"]}
        if "proc.cmdline" in evidence:
            proc["cmd_line"] = evidence["proc.cmdline"]
        out["process"] = proc
    if "net.dst_ip" in evidence:
        out["dst_endpoint"] = {"ip": evidence["net.dst_ip"], "port": evidence.get("net.dst_port")}
    if "net.dns_qname" in evidence:
        out["query"] = {"hostname": evidence["net.dns_qname"]}
    return out


def finding(alert: Alert, boot_id: str = "") -> dict[str, Any]:
    z = alert.zone
    mitre = [t for t in alert.tags if MITRE.match(t)]
    first = alert.first_ts_ns or alert.ts_ns
    last = alert.last_ts_ns or alert.ts_ns
    obj: dict[str, Any] = {
        "class_uid": CLASS_UID,
        "class_name": "Detection Finding",
        "category_uid": CATEGORY_UID,
        "category_name": "Findings",
        "activity_id": ACTIVITY_CREATE,
        "activity_name": "Create",
        "type_uid": CLASS_UID * 100 + ACTIVITY_CREATE,
        "type_name": "Detection Finding: Create",
        "time": alert.ts_ns // 1_000_000,  # OCSF timestamps: ms since the epoch
        "severity_id": SEVERITY_ID[alert.severity],
        "severity": str(alert.severity).capitalize(),
        "status_id": 1,
        "status": "New",
        "is_alert": True,
        "message": alert.summary,
        "count": alert.count,
        "start_time": first // 1_000_000,
        "end_time": last // 1_000_000,
        "metadata": {
            "version": OCSF_VERSION,
            "product": {"name": "zonewatch", "vendor_name": "zonewatch", "version": __version__},
            "tenant_uid": z.tenant,
            "uid": f"zonewatch-{alert.seq}",
            "sequence": alert.seq,
            "log_name": "alerts",
        },
        "finding_info": {
            "uid": f"zonewatch-{alert.seq}",
            "title": alert.summary,
            "desc": alert.summary,
            "types": [alert.rule],
            "analytic": {"name": alert.rule, "type_id": 1, "type": "Rule"},
            "created_time": alert.ts_ns // 1_000_000,
            "first_seen_time": first // 1_000_000,
            "last_seen_time": last // 1_000_000,
            "attacks": [{"technique": {"uid": t}} for t in mitre],
        },
        "resources": [
            {
                "uid": z.id,
                "name": z.name,
                "type": "Virtual Machine",
                "labels": [f"vmm:{z.vmm}", f"tenant:{z.tenant}"],
            }
        ],
        "evidences": [_evidence(alert.evidence)],
        "unmapped": {"tags": list(alert.tags), "lost_in_window": alert.lost_in_window},
    }
    if boot_id:
        obj["metadata"]["correlation_uid"] = boot_id
    return obj


class _Finding:
    __slots__ = ("alert",)

    def __init__(self, alert: Alert) -> None:
        self.alert = alert

    def to_json(self) -> dict[str, Any]:
        return finding(self.alert)


class OcsfSink:
    name = "ocsf"

    def __init__(self, target: str) -> None:
        self._out = JsonlSink(target)

    @property
    def written(self) -> int:
        return self._out.written

    def export(self, records: Sequence[JsonRecord]) -> None:
        self._out.export([_Finding(r) for r in records if isinstance(r, Alert)])

    def flush(self) -> None:
        self._out.flush()

    def shutdown(self) -> None:
        self._out.shutdown()
