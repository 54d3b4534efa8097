"""Isolation findings for each zone, read from the host side (`zonewatch audit`).

A zone is only as isolated as the host lets it be. Each check reads what the kernel shows
of the zone's VMM and helpers (/proc) and of the host's devices (/sys), and reports where
one tenant's zone is exposed to the host or to another tenant:

  vmm-privileges   the VMM or a backend runs as root or holds broad capabilities
  no-seccomp       the VMM or a backend has no seccomp filter
  host-namespaces  the VMM shares namespaces with the host's init
  shared-bridge    the zone's tap is on a bridge with another tenant's zone
  shared-storage   a share or disk image another tenant's zone can reach too
  ksm-cross-tenant KSM merges pages while zones of several tenants take part
  shared-cpus      vCPUs of different tenants may run on the same cores

Findings are data (JSON, a table) and, in the agent, alerts (`audit.<check>`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zonewatch.model import Alert, Severity, Zone, ZoneRef

# linux/capability.h: the capabilities that let a compromised VMM reach past its zone.
BROAD_CAPABILITIES: dict[int, str] = {
    1: "CAP_DAC_OVERRIDE",
    2: "CAP_DAC_READ_SEARCH",
    12: "CAP_NET_ADMIN",
    16: "CAP_SYS_MODULE",
    17: "CAP_SYS_RAWIO",
    19: "CAP_SYS_PTRACE",
    21: "CAP_SYS_ADMIN",
    22: "CAP_SYS_BOOT",
    33: "CAP_MAC_ADMIN",
    38: "CAP_PERFMON",
    39: "CAP_BPF",
}
ESCAPE_CAPABILITIES = {"CAP_SYS_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_PTRACE", "CAP_SYS_RAWIO"}
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "user", "cgroup")


@dataclass(slots=True, frozen=True)
class Finding:
    zone: ZoneRef
    check: str
    severity: Severity
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "zone": self.zone.to_json(),
            "check": self.check,
            "severity": str(self.severity),
            "summary": self.summary,
            "evidence": self.evidence,
        }

    def to_alert(self, ts_ns: int) -> Alert:
        return Alert(
            ts_ns=ts_ns,
            zone=self.zone,
            rule=f"audit.{self.check}",
            severity=self.severity,
            summary=self.summary,
            tags=("audit", "isolation"),
            evidence=self.evidence,
        )


@dataclass(slots=True)
class HostView:
    """Where the host's facts are read: /proc and /sys, or fake trees in tests."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")

    def status(self, pid: int, tid: int | None = None) -> dict[str, str]:
        path = self.proc / str(pid) / ("status" if tid is None else f"task/{tid}/status")
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return {}
        return {
            k.strip(): v.strip()
            for k, sep, v in (line.partition(":") for line in text.splitlines())
            if sep
        }

    def threads(self, pid: int) -> list[int]:
        try:
            return [int(name) for name in os.listdir(self.proc / str(pid) / "task")]
        except (OSError, ValueError):
            return []

    def namespace(self, pid: int, ns: str) -> str | None:
        try:
            return os.readlink(self.proc / str(pid) / "ns" / ns)
        except OSError:
            return None

    def bridge_of(self, ifname: str) -> str | None:
        try:
            return Path(os.readlink(self.sys / "class/net" / ifname / "master")).name
        except OSError:
            return None

    def ksm_running(self) -> bool:
        try:
            return (self.sys / "kernel/mm/ksm/run").read_text().strip() == "1"
        except OSError:
            return False

    def ksm_merging_pages(self, pid: int) -> int:
        try:
            return int((self.proc / str(pid) / "ksm_merging_pages").read_text().strip())
        except (OSError, ValueError):
            return 0


def parse_cpu_list(text: str) -> frozenset[int]:
    """The kernel's list format ("0-3,8,10-11"); malformed parts are skipped."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            cpus.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            continue
    return frozenset(cpus)


def audit(zones: Sequence[Zone], host: HostView | None = None) -> list[Finding]:
    host = host or HostView()
    findings: list[Finding] = []
    for zone in zones:
        findings += _privileges(zone, host)
        findings += _seccomp(zone, host)
        findings += _namespaces(zone, host)
    findings += _shared_bridges(zones, host)
    findings += _shared_storage(zones)
    findings += _ksm(zones, host)
    findings += _shared_cpus(zones, host)
    return sorted(findings, key=lambda f: (f.zone.tenant, f.zone.name, -f.severity, f.check))


def _processes(zone: Zone) -> Iterable[tuple[str, int]]:
    yield "vmm", zone.pid
    for pid in zone.helper_pids:
        yield "backend", pid


def _privileges(zone: Zone, host: HostView) -> Iterable[Finding]:
    for role, pid in _processes(zone):
        status = host.status(pid)
        if not status:
            continue
        euid = int(status.get("Uid", "-1 -1").split()[1])
        caps = int(status.get("CapEff", "0"), 16)
        broad = sorted(name for bit, name in BROAD_CAPABILITIES.items() if caps >> bit & 1)
        if euid != 0 and not broad:
            continue
        severity = Severity.HIGH if ESCAPE_CAPABILITIES & set(broad) else Severity.MEDIUM
        who = "root" if euid == 0 else f"uid {euid}"
        yield Finding(
            zone.ref,
            "vmm-privileges",
            severity,
            f"{role} pid {pid} runs as {who}" + (f" with {', '.join(broad)}" if broad else ""),
            {"pid": pid, "role": role, "euid": euid, "capabilities": broad},
        )


def _seccomp(zone: Zone, host: HostView) -> Iterable[Finding]:
    for role, pid in _processes(zone):
        mode = host.status(pid).get("Seccomp")
        if mode == "0":
            yield Finding(
                zone.ref,
                "no-seccomp",
                Severity.MEDIUM,
                f"{role} pid {pid} has no seccomp filter: every syscall is open to it",
                {"pid": pid, "role": role},
            )


def _namespaces(zone: Zone, host: HostView) -> Iterable[Finding]:
    shared = [
        ns
        for ns in NAMESPACES
        if (mine := host.namespace(zone.pid, ns)) is not None and mine == host.namespace(1, ns)
    ]
    if shared:
        severity = Severity.MEDIUM if {"mnt", "pid"} <= set(shared) else Severity.LOW
        yield Finding(
            zone.ref,
            "host-namespaces",
            severity,
            f"the VMM shares the host's {', '.join(shared)} namespaces",
            {"pid": zone.pid, "namespaces": shared},
        )


def _other_tenants(zone: Zone, zones: Iterable[Zone]) -> list[Zone]:
    return [z for z in zones if z.tenant != zone.tenant]


def _shared_bridges(zones: Sequence[Zone], host: HostView) -> Iterable[Finding]:
    bridge_of = {(z.id, tap): host.bridge_of(tap) for z in zones for tap in z.taps}
    for zone in zones:
        for tap in zone.taps:
            bridge = bridge_of[(zone.id, tap)]
            if bridge is None:
                continue
            neighbours = sorted(
                f"{z.name} ({z.tenant})"
                for z in _other_tenants(zone, zones)
                if any(bridge_of[(z.id, t)] == bridge for t in z.taps)
            )
            if neighbours:
                yield Finding(
                    zone.ref,
                    "shared-bridge",
                    Severity.HIGH,
                    f"tap {tap} is on bridge {bridge} with other tenants' zones: "
                    + ", ".join(neighbours),
                    {"tap": tap, "bridge": bridge, "zones": neighbours},
                )


def _storage(zone: Zone) -> list[str]:
    paths = [s.host_path for s in zone.shares if s.host_path] + list(zone.disks)
    return [os.path.normpath(p) for p in paths]


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _shared_storage(zones: Sequence[Zone]) -> Iterable[Finding]:
    for zone in zones:
        for mine in _storage(zone):
            reached_by = sorted(
                f"{z.name} ({z.tenant}): {theirs}"
                for z in _other_tenants(zone, zones)
                for theirs in _storage(z)
                if _overlaps(mine, theirs)
            )
            if reached_by:
                yield Finding(
                    zone.ref,
                    "shared-storage",
                    Severity.HIGH,
                    f"{mine} is reachable from other tenants' zones: " + "; ".join(reached_by),
                    {"path": mine, "zones": reached_by},
                )


def _ksm(zones: Sequence[Zone], host: HostView) -> Iterable[Finding]:
    if not host.ksm_running():
        return
    merging = {z.id: host.ksm_merging_pages(z.pid) for z in zones}
    tenants = {z.tenant for z in zones if merging[z.id] > 0}
    if len(tenants) < 2:
        return
    for zone in zones:
        if merging[zone.id] > 0:
            yield Finding(
                zone.ref,
                "ksm-cross-tenant",
                Severity.MEDIUM,
                f"KSM merges {merging[zone.id]} of this zone's pages while zones of "
                f"{len(tenants)} tenants take part: a cross-tenant side channel",
                {"merging_pages": merging[zone.id], "tenants": sorted(tenants)},
            )


# What a zone's CPUs were read from (the shared-cpus evidence's `basis`).
VCPU_THREADS = "vcpu threads"
# No vCPU thread known (unnamed, and not yet seen running by the kvm probe, or no agent):
# the vCPUs are among the VMM's threads, so where those may run bounds where vCPUs may.
ALL_VMM_THREADS = "all VMM threads (no vCPU thread known)"


def _vcpu_cpus(zone: Zone, host: HostView) -> tuple[frozenset[int], str]:
    """The CPUs a zone's vCPUs may run on, and what that was read from."""
    tids, basis = zone.vcpu_tids, VCPU_THREADS
    if not tids:
        tids, basis = tuple(host.threads(zone.pid)), ALL_VMM_THREADS
    cpus: set[int] = set()
    for tid in tids:
        cpus |= parse_cpu_list(host.status(zone.pid, tid).get("Cpus_allowed_list", ""))
    return frozenset(cpus), basis


def _shared_cpus(zones: Sequence[Zone], host: HostView) -> Iterable[Finding]:
    read = {z.id: _vcpu_cpus(z, host) for z in zones}
    cpus = {zone_id: found for zone_id, (found, _basis) in read.items()}
    for zone in zones:
        overlap = {
            f"{z.name} ({z.tenant})": sorted(cpus[zone.id] & cpus[z.id])
            for z in _other_tenants(zone, zones)
            if cpus[zone.id] & cpus[z.id]
        }
        if overlap:
            yield Finding(
                zone.ref,
                "shared-cpus",
                Severity.LOW,
                "vCPUs may share cores with other tenants' zones: " + ", ".join(sorted(overlap)),
                {"cpus": sorted(cpus[zone.id]), "overlap": overlap, "basis": read[zone.id][1]},
            )


SEVERITY_STYLE = {
    Severity.INFO: "dim",
    Severity.LOW: "cyan",
    Severity.MEDIUM: "yellow",
    Severity.HIGH: "bold red",
    Severity.CRITICAL: "bold white on red",
}


def findings_table(findings: Sequence[Finding], zone_count: int) -> None:
    """The findings as a rich table on stdout (zone and guest-chosen text escaped)."""
    from rich.console import Console
    from rich.markup import escape as markup_escape
    from rich.table import Table

    from zonewatch.tui.escape import escape as terminal_escape

    def escape(text: str) -> str:  # no control reaches the terminal, no [tag] styles it
        return markup_escape(terminal_escape(text, 200))

    table = Table(title=f"isolation audit: {zone_count} zone(s), {len(findings)} finding(s)")
    for column in ("zone", "tenant", "severity", "check", "finding"):
        table.add_column(column, overflow="fold")
    for f in findings:
        table.add_row(
            escape(f.zone.name),
            escape(f.zone.tenant),
            f"[{SEVERITY_STYLE[f.severity]}]{f.severity}[/]",
            f.check,
            escape(f.summary),
        )
    Console().print(table)
