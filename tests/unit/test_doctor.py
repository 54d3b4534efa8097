"""`zonewatch doctor` checks what it says by trying it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from zonewatch.doctor import netns_entry_check


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
