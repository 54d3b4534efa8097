"""`zonewatch doctor` checks what it says by trying it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from zonewatch.doctor import (
    KVM,
    LAYOUTS,
    NETNS,
    SCHED,
    SYSCALLS,
    TC,
    Check,
    layouts,
    netns_entry_check,
)


def test_entering_a_network_namespace_is_tried_for_real() -> None:
    check = netns_entry_check()
    assert check.ok == (os.geteuid() == 0), check.detail
    assert not check.essential  # plain QEMU zones are watched without it


def test_without_cap_sys_admin_doctor_says_pod_taps_go_unwatched() -> None:
    assert shutil.which("setpriv"), "util-linux's setpriv is part of Debian's base system"
    # Root drops the capability for the child; anyone else has none to drop.
    drop = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-all", "--"]
    proc = subprocess.run(
        [*(drop if os.geteuid() == 0 else []), sys.executable, "-m", "zonewatch", "doctor"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    line = next(x for x in proc.stdout.splitlines() if "pod network namespaces" in x)
    assert line.startswith("warn"), line
    assert "needs CAP_SYS_ADMIN" in line and "Kata pods" in line


def test_layouts_say_which_channels_this_host_can_watch() -> None:
    results = [Check(name, True, "") for name in (KVM, SCHED, SYSCALLS, TC)]
    results.append(Check(NETNS, False, "cannot enter one"))
    verdicts = {v.layout: v for v in layouts(results)}
    assert set(verdicts) == set(LAYOUTS)
    assert verdicts["QEMU (plain)"].watched == ("kvm", "net", "file", "proc", "sched")
    assert verdicts["QEMU (plain)"].unwatched == {}
    assert verdicts["Kata with QEMU"].unwatched == {"net": (NETNS,)}
    jailed = verdicts["Firecracker with jailer"]
    assert (jailed.unwatched, jailed.absent) == ({"net": (NETNS,)}, ("file",))
    no_kvm = {v.layout: v for v in layouts([c for c in results if c.name != KVM])}
    assert no_kvm["Kata with QEMU"].unwatched["sched"] == (KVM,)  # vCPUs found by KVM_RUN
    assert "sched" in no_kvm["QEMU (plain)"].watched  # named vCPU threads


def test_without_cap_sys_admin_doctor_says_which_layouts_lose_net() -> None:
    drop = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-all", "--"]
    proc = subprocess.run(
        [*(drop if os.geteuid() == 0 else []), sys.executable, "-m", "zonewatch", "doctor"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    lines = {x[5:].split("  ")[0]: x for x in proc.stdout.splitlines()}
    assert "not net (needs: pod network namespaces)" in lines["Kata with QEMU"]
    assert "not net (needs: pod network namespaces)" in lines["Firecracker with jailer"]
    if os.geteuid() == 0:  # root keeps CAP_NET_ADMIN: plain taps are still watched
        assert lines["QEMU (plain)"].startswith("ok"), lines["QEMU (plain)"]
