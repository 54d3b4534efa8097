"""`zonewatch audit` on real lab zones: two tenants' taps on one bridge are a finding; the
same zones on their own taps are not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from zonewatch.lab.lab import Lab
from zonewatch.lab.qemu import ZoneSpec

BRIDGE = "zwbr-audit"


def audit_json(tenants: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "zonewatch", "audit", "--json", "--tenants", str(tenants)],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    return orjson.loads(out)  # type: ignore[no-any-return]


def bridged(findings: list[dict[str, Any]], names: set[str]) -> dict[str, dict[str, Any]]:
    return {
        f["zone"]["name"]: f
        for f in findings
        if f["check"] == "shared-bridge" and f["zone"]["name"] in names
    }


def test_two_tenants_on_one_bridge(tmp_path: Path, lab: Lab) -> None:
    a, b = lab.start(
        [ZoneSpec("audit-acme", "acme", "true", index=51),
         ZoneSpec("audit-globex", "globex", "true", index=52)]
    )  # fmt: skip
    tenants = lab.write_tenants(tmp_path / "tenants.yaml")
    names = {a.name, b.name}
    assert bridged(audit_json(tenants), names) == {}
    try:
        subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
        for zone in (a, b):
            subprocess.run(["ip", "link", "set", zone.tap, "master", BRIDGE], check=True)
        found = bridged(audit_json(tenants), names)
    finally:
        subprocess.run(["ip", "link", "del", BRIDGE], check=False)
    assert set(found) == names
    assert found[a.name]["severity"] == "high"
    assert found[a.name]["evidence"] == {"tap": a.tap, "bridge": BRIDGE,
                                         "zones": [f"{b.name} (globex)"]}  # fmt: skip
    assert found[b.name]["evidence"]["zones"] == [f"{a.name} (acme)"]
