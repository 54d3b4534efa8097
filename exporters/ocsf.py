"""OCSF Detection Finding (class_uid 2004, OCSF 1.5.0) JSON lines, for SIEMs.

One finding per alert: category 2 (Findings), activity 1 (Create; type_uid 200401), the
enum captions OCSF defines, `device` (the host reporting: name, machine id, boot id, the
agent and its version), `metadata.tenant_uid` the zone's tenant, host-scoped ids
(exporters.identity: the same alert keeps its id, two hosts never share one),
`correlation_uid` one per rule and zone, MITRE ATT&CK `attacks` from the rule's tags, the
evidence as typed OCSF objects (file, process, endpoints, DNS query) plus the matched fields
as `data`, and `is_alert` true. Written like the JSONL sink (file or stdout; a dead reader is
counted, never fatal). tests/unit/test_ocsf.py validates findings against the OCSF 1.5.0
schema (pydantic-ocsf).
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Sequence
from typing import Any

from zonewatch import __version__
from zonewatch.exporters import attack
from zonewatch.exporters.base import JsonRecord
from zonewatch.exporters.identity import HostIdentity, correlation_uid, finding_uid, rule_uid
from zonewatch.exporters.jsonl import JsonlSink
from zonewatch.model import Alert, Severity

OCSF_VERSION = "1.5.0"
CLASS_UID = 2004
CATEGORY_UID = 2
ACTIVITY_CREATE = 1
# severity -> (severity_id, caption)
SEVERITY = {
    Severity.INFO: (1, "Informational"),
    Severity.LOW: (2, "Low"),
    Severity.MEDIUM: (3, "Medium"),
    Severity.HIGH: (4, "High"),
    Severity.CRITICAL: (5, "Critical"),
}
FILE_TYPE_UNKNOWN = 0
FILE_TYPE_REGULAR = 1
# st_mode file type bits -> OCSF file type_id
FILE_TYPES = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFCHR: 3,
    stat.S_IFBLK: 4,
    stat.S_IFSOCK: 5,
    stat.S_IFIFO: 6,
    stat.S_IFLNK: 7,
}
# Whether the host is a server or itself a VM is not looked up: Unknown, not a guess.
DEVICE_TYPE_UNKNOWN = 0
OS_TYPE_LINUX = 200
ANALYTIC_RULE = 1
STATUS_NEW = 1
MAX_PORT = 65535


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any, high: int) -> int | None:
    """An int in 0..high, else None (evidence is guest-influenced: never trust its shape)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high:
        return value
    return None


def _file(path: str, mode: Any = None, type_id: int | None = None) -> dict[str, Any]:
    """An OCSF file: name is the last component, type from the mode's type bits."""
    if type_id is None:
        fmt = stat.S_IFMT(mode) if _int(mode, 0xFFFFFFFF) is not None else 0
        type_id = FILE_TYPES.get(fmt, FILE_TYPE_UNKNOWN)
    return {"name": posixpath.basename(path.rstrip("/")) or path, "path": path, "type_id": type_id}


def _endpoint(ip: Any, port: Any) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    if _text(ip):
        out["ip"] = ip
    if _int(port, MAX_PORT) is not None:
        out["port"] = port
    return out if "ip" in out else None  # OCSF asks for an ip (or a name) at least


def _process(evidence: dict[str, Any]) -> dict[str, Any] | None:
    proc: dict[str, Any] = {}
    if _int(evidence.get("proc.pid"), 1 << 32) is not None:
        proc["pid"] = evidence["proc.pid"]
    if _int(evidence.get("proc.tid"), 1 << 32) is not None:
        proc["tid"] = evidence["proc.tid"]
    if _text(evidence.get("proc.comm")):
        proc["name"] = evidence["proc.comm"]
    if _text(evidence.get("proc.args")):
        proc["cmd_line"] = evidence["proc.args"]
    if _text(evidence.get("proc.exe")):
        # It was executed: a regular file.
        proc["file"] = _file(evidence["proc.exe"], type_id=FILE_TYPE_REGULAR)
    if _int(evidence.get("proc.ppid"), 1 << 32) is not None:
        parent: dict[str, Any] = {"pid": evidence["proc.ppid"]}
        if _text(evidence.get("proc.pcomm")):
            parent["name"] = evidence["proc.pcomm"]
        proc["parent_process"] = parent
    # OCSF needs a pid (or uid) to identify a process: a name alone is not one.
    return proc if "pid" in proc else None


def evidence_artifacts(evidence: dict[str, Any]) -> dict[str, Any]:
    """The alert's evidence: every matched field as `data`, and the OCSF objects those
    fields make (file, process, dst/src endpoints, DNS query) where they map cleanly."""
    out: dict[str, Any] = {"data": evidence}
    if _text(evidence.get("file.path")):
        out["file"] = _file(evidence["file.path"], evidence.get("file.mode"))
    process = _process(evidence)
    if process is not None:
        out["process"] = process
    dst = _endpoint(evidence.get("net.dst_ip"), evidence.get("net.dst_port"))
    if dst is not None:
        out["dst_endpoint"] = dst
    src = _endpoint(evidence.get("net.src_ip"), evidence.get("net.src_port"))
    if src is not None:
        out["src_endpoint"] = src
    if _text(evidence.get("net.dns_qname")):
        query: dict[str, Any] = {"hostname": evidence["net.dns_qname"]}
        if _text(evidence.get("net.dns_qtype")):
            query["type"] = evidence["net.dns_qtype"]
        out["query"] = query
    return out


def attacks(tags: Sequence[str]) -> list[dict[str, Any]]:
    """One OCSF attack per technique tag (and per tactic tag, when the rule has several)."""
    tactics: list[attack.Ref | None] = [*attack.tactics(tuple(tags))] or [None]
    out: list[dict[str, Any]] = []
    for found in attack.techniques(tuple(tags)):
        for tactic in tactics:
            item: dict[str, Any] = {"technique": _ref(found.technique)}
            if found.sub_technique is not None:
                item["sub_technique"] = _ref(found.sub_technique)
            if tactic is not None:
                item["tactic"] = _ref(tactic)
            out.append(item)
    return out


def _ref(ref: attack.Ref) -> dict[str, str]:
    out = {"uid": ref.uid}
    if ref.name:
        out["name"] = ref.name
    out["src_url"] = attack.url(ref.uid)
    return out


def device(host: HostIdentity) -> dict[str, Any]:
    out: dict[str, Any] = {
        "hostname": host.hostname,
        "name": host.hostname,
        "type_id": DEVICE_TYPE_UNKNOWN,
        "os": {
            "name": "Linux",
            "type_id": OS_TYPE_LINUX,
            "type": "Linux",
            "kernel_release": host.kernel_release,
        },
        "agent_list": [{"name": "zonewatch", "vendor_name": "zonewatch", "version": __version__}],
    }
    if host.machine_id:
        out["uid"] = host.machine_id
    if host.boot_id:
        out["boot_uid"] = host.boot_id
    return out


def finding(alert: Alert, host: HostIdentity) -> dict[str, Any]:
    z = alert.zone
    first = alert.first_ts_ns or alert.ts_ns
    last = alert.last_ts_ns or alert.ts_ns
    uid = finding_uid(host, alert.seq, alert.ts_ns)
    severity_id, severity = SEVERITY[alert.severity]
    return {
        "class_uid": CLASS_UID,
        "class_name": "Detection Finding",
        "category_uid": CATEGORY_UID,
        "category_name": "Findings",
        "activity_id": ACTIVITY_CREATE,
        "activity_name": "Create",
        "type_uid": CLASS_UID * 100 + ACTIVITY_CREATE,
        "type_name": "Detection Finding: Create",
        "time": alert.ts_ns // 1_000_000,  # OCSF timestamps: ms since the epoch
        "severity_id": severity_id,
        "severity": severity,
        "status_id": STATUS_NEW,
        "status": "New",
        "is_alert": True,
        "message": alert.summary,
        "count": alert.count,
        "start_time": first // 1_000_000,
        "end_time": last // 1_000_000,
        "device": device(host),
        "metadata": {
            "version": OCSF_VERSION,
            "product": {"name": "zonewatch", "vendor_name": "zonewatch", "version": __version__},
            "profiles": ["host"],  # `device`
            "tenant_uid": z.tenant,
            "uid": uid,
            "correlation_uid": correlation_uid(host, alert.rule, z.id),
            "sequence": alert.seq,
            "log_name": "alerts",
        },
        "finding_info": {
            "uid": uid,
            "title": alert.summary,
            "desc": alert.summary,
            "types": attack.domains(alert.tags),
            "analytic": {
                "name": alert.rule,
                "uid": rule_uid(alert.rule),
                "type_id": ANALYTIC_RULE,
                "type": "Rule",
            },
            "created_time": alert.ts_ns // 1_000_000,
            "first_seen_time": first // 1_000_000,
            "last_seen_time": last // 1_000_000,
            "attacks": attacks(alert.tags),
        },
        "resources": [
            {
                "uid": z.id,
                "name": z.name,
                "type": "Virtual Machine",
                "namespace": z.tenant,
                "labels": [f"vmm:{z.vmm}", f"tenant:{z.tenant}"],
            }
        ],
        "evidences": [evidence_artifacts(alert.evidence)],
        "unmapped": {"tags": list(alert.tags), "lost_in_window": alert.lost_in_window},
    }


class _Finding:
    __slots__ = ("alert", "host")

    def __init__(self, alert: Alert, host: HostIdentity) -> None:
        self.alert = alert
        self.host = host

    def to_json(self) -> dict[str, Any]:
        return finding(self.alert, self.host)


class OcsfSink:
    name = "ocsf"

    def __init__(self, target: str, host: HostIdentity | None = None) -> None:
        self._out = JsonlSink(target)
        self.host = host or HostIdentity.current()

    @property
    def written(self) -> int:
        return self._out.written

    def export(self, records: Sequence[JsonRecord]) -> None:
        self._out.export([_Finding(r, self.host) for r in records if isinstance(r, Alert)])

    def flush(self) -> None:
        self._out.flush()

    def shutdown(self) -> None:
        self._out.shutdown()
