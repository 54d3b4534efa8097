"""Alerts made directly (no rule engine) for delivery tests and benchmarks."""

from __future__ import annotations

import time

from zonewatch.model import Alert, Severity, ZoneRef

ZONES = {
    "acme": ZoneRef("qemu-100-1", "acme-web", "acme", "qemu"),
    "globex": ZoneRef("qemu-200-2", "globex-db", "globex", "qemu"),
}


def make_alert(
    n: int,
    tenant: str = "acme",
    rule: str = "test_rule",
    severity: Severity = Severity.HIGH,
    tags: tuple[str, ...] = ("maturity_stable", "host", "T1611"),
) -> Alert:
    now = time.time_ns()
    return Alert(
        ts_ns=now,
        zone=ZONES[tenant],
        rule=rule,
        severity=severity,
        summary=f"alert {n} in {tenant}",
        tags=tags,
        evidence={"n": n, "file.path": f"/etc/shadow-{n}", "proc.pid": 4242},
        count=1,
        first_ts_ns=now - 1_000_000,
        last_ts_ns=now,
    )
