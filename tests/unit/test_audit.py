"""Isolation findings from fake /proc and /sys trees: each check fires on the exposure it
names and stays quiet on a zone that is isolated."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zonewatch.audit import Finding, HostView, audit, parse_cpu_list
from zonewatch.model import Severity, Share, Vmm, Zone

ALL_CAPS = "000001ffffffffff"
NO_CAPS = "0000000000000000"


class FakeHost:
    def __init__(self, root: Path) -> None:
        self.proc, self.sys = root / "proc", root / "sys"
        self.view = HostView(self.proc, self.sys)
        self.process(1, uid=0, caps=ALL_CAPS, seccomp=0, ns_of="host")
        (self.sys / "class/net").mkdir(parents=True)
        (self.sys / "kernel/mm/ksm").mkdir(parents=True)
        (self.sys / "kernel/mm/ksm/run").write_text("0\n")

    def process(
        self,
        pid: int,
        *,
        uid: int = 1000,
        caps: str = NO_CAPS,
        seccomp: int = 2,
        ns_of: str = "own",
        vcpus: dict[int, str] | None = None,
        ksm_pages: int = 0,
    ) -> None:
        d = self.proc / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "status").write_text(
            f"Name:\tvmm\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nCapEff:\t{caps}\nSeccomp:\t{seccomp}\n"
        )
        for ns in ("mnt", "pid", "net", "ipc", "uts", "user", "cgroup"):
            os.symlink(f"{ns}:[{4026531000 if ns_of == 'host' else pid}]", d / "ns" / ns)
        for tid, cpus in (vcpus or {}).items():
            (d / "task" / str(tid)).mkdir(parents=True)
            (d / "task" / str(tid) / "status").write_text(f"Cpus_allowed_list:\t{cpus}\n")
        (d / "ksm_merging_pages").write_text(f"{ksm_pages}\n")

    def tap(self, name: str, bridge: str | None = None) -> None:
        d = self.sys / "class/net" / name
        d.mkdir()
        if bridge:
            os.symlink(f"../{bridge}", d / "master")

    def ksm(self, running: bool) -> None:
        (self.sys / "kernel/mm/ksm/run").write_text("1\n" if running else "0\n")


def zone(name: str, tenant: str, pid: int, **kw: object) -> Zone:
    return Zone(id=f"z-{pid}", key=pid, name=name, tenant=tenant, vmm=Vmm.QEMU, pid=pid,
                start_time=1, **kw)  # type: ignore[arg-type]  # fmt: skip


def checks(findings: list[Finding], name: str) -> set[str]:
    return {f.check for f in findings if f.zone.name == name}


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def test_an_isolated_zone_has_no_findings(host: FakeHost) -> None:
    host.process(100, vcpus={101: "0"})
    host.tap("tap-a")
    z = zone("a", "acme", 100, vcpu_tids=(101,), taps=("tap-a",))
    assert audit([z], host.view) == []


def test_root_vmm_with_broad_capabilities_without_seccomp_in_host_namespaces(
    host: FakeHost,
) -> None:
    host.process(100, uid=0, caps=ALL_CAPS, seccomp=0, ns_of="host")
    found = {f.check: f for f in audit([zone("a", "acme", 100)], host.view)}
    assert set(found) == {"vmm-privileges", "no-seccomp", "host-namespaces"}
    assert found["vmm-privileges"].severity == Severity.HIGH
    assert "CAP_SYS_ADMIN" in found["vmm-privileges"].evidence["capabilities"]
    assert found["host-namespaces"].severity == Severity.MEDIUM
    assert "net" in found["host-namespaces"].evidence["namespaces"]


def test_a_backend_helper_is_audited_too(host: FakeHost) -> None:
    host.process(100)
    host.process(200, uid=0, caps=NO_CAPS)  # virtiofsd as plain root
    findings = audit([zone("a", "acme", 100, helper_pids=(200,))], host.view)
    [f] = findings
    assert (f.check, f.severity, f.evidence["role"]) == ("vmm-privileges", Severity.MEDIUM,
                                                        "backend")  # fmt: skip


def test_taps_on_one_bridge_across_tenants(host: FakeHost) -> None:
    for pid in (100, 200, 300):
        host.process(pid)
    host.tap("tap-a", "br0")
    host.tap("tap-b", "br0")
    host.tap("tap-c", "br0")
    zones = [
        zone("a", "acme", 100, taps=("tap-a",)),
        zone("b", "globex", 200, taps=("tap-b",)),
        zone("c", "acme", 300, taps=("tap-c",)),
    ]
    findings = audit(zones, host.view)
    assert checks(findings, "a") == checks(findings, "b") == {"shared-bridge"}
    b = next(f for f in findings if f.zone.name == "b")
    assert b.evidence["zones"] == ["a (acme)", "c (acme)"]


def test_same_tenant_on_one_bridge_is_fine(host: FakeHost) -> None:
    for pid in (100, 200):
        host.process(pid)
    host.tap("tap-a", "br0")
    host.tap("tap-b", "br0")
    zones = [zone("a", "acme", 100, taps=("tap-a",)), zone("b", "acme", 200, taps=("tap-b",))]
    assert audit(zones, host.view) == []


def test_storage_reachable_from_another_tenant(host: FakeHost) -> None:
    host.process(100)
    host.process(200)
    zones = [
        zone("a", "acme", 100, shares=(Share("s", "/srv/shares/acme", "9p"),)),
        zone("b", "globex", 200, shares=(Share("s", "/srv/shares/acme/cache/", "9p"),)),
    ]
    findings = audit(zones, host.view)
    assert checks(findings, "a") == checks(findings, "b") == {"shared-storage"}
    # Siblings with a common prefix are not nested.
    zones[1] = zone("b", "globex", 200, shares=(Share("s", "/srv/shares/acme2", "9p"),))
    assert audit(zones, host.view) == []


def test_ksm_only_when_running_and_zones_of_two_tenants_merge(host: FakeHost) -> None:
    host.process(100, ksm_pages=50)
    host.process(200, ksm_pages=7)
    zones = [zone("a", "acme", 100), zone("b", "globex", 200)]
    assert audit(zones, host.view) == []
    host.ksm(running=True)
    findings = audit(zones, host.view)
    assert {(f.zone.name, f.check) for f in findings} == {("a", "ksm-cross-tenant"),
                                                          ("b", "ksm-cross-tenant")}  # fmt: skip


def test_vcpus_of_two_tenants_on_shared_cores(host: FakeHost) -> None:
    host.process(100, vcpus={101: "0-1"})
    host.process(200, vcpus={201: "1,3"})
    host.process(300, vcpus={301: "2"})
    zones = [
        zone("a", "acme", 100, vcpu_tids=(101,)),
        zone("b", "globex", 200, vcpu_tids=(201,)),
        zone("c", "acme", 300, vcpu_tids=(301,)),
    ]
    findings = audit(zones, host.view)
    assert checks(findings, "a") == checks(findings, "b") == {"shared-cpus"}
    assert checks(findings, "c") == set()  # pinned apart from globex's core
    a = next(f for f in findings if f.zone.name == "a")
    assert a.evidence["overlap"] == {"b (globex)": [1]}


def test_zones_with_no_vcpu_thread_known_are_judged_by_all_their_vmm_threads(
    host: FakeHost,
) -> None:
    """Threads without names (Kata's QEMU) and no agent to see them run: the vCPUs are among
    the VMM's threads, so where those may run bounds where the vCPUs may."""
    host.process(100, vcpus={100: "0-1", 102: "0-1"})  # unpinned VMM, unnamed threads
    host.process(200, vcpus={201: "1"})  # a known vCPU on core 1
    host.process(300, vcpus={300: "2", 301: "2"})  # a VMM pinned apart, unnamed threads
    zones = [
        zone("a", "acme", 100),
        zone("b", "globex", 200, vcpu_tids=(201,)),
        zone("c", "acme", 300),
    ]
    findings = audit(zones, host.view)
    assert checks(findings, "a") == checks(findings, "b") == {"shared-cpus"}
    assert checks(findings, "c") == set()
    by_zone = {f.zone.name: f.evidence for f in findings}
    assert by_zone["a"]["overlap"] == {"b (globex)": [1]}
    assert by_zone["a"]["basis"] == "all VMM threads (no vCPU thread known)"
    assert by_zone["b"]["basis"] == "vcpu threads"


def test_cpu_lists_and_a_vanished_process(host: FakeHost) -> None:
    assert parse_cpu_list("0-3,8,10-11") == frozenset({0, 1, 2, 3, 8, 10, 11})
    assert parse_cpu_list("x,2") == frozenset({2})
    assert audit([zone("gone", "acme", 999)], host.view) == []


def test_findings_become_alerts() -> None:
    z = zone("a", "acme", 100)
    alert = Finding(z.ref, "shared-bridge", Severity.HIGH, "s", {"bridge": "br0"}).to_alert(5)
    assert alert.rule == "audit.shared-bridge"
    assert (alert.severity, alert.evidence) == (Severity.HIGH, {"bridge": "br0"})
