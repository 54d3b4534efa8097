"""Several lab zones at once, and the cross-process `lab up` / `lab status` / `lab down`.

`Lab` starts zones in parallel (every QEMU is spawned first, then all boots are awaited
together: a TCG boot takes a few seconds and boots overlap) and stops them all on exit:

    with Lab() as lab:
        a, b = lab.start([ZoneSpec("zone-a", "acme", "...", 0),
                          ZoneSpec("zone-b", "globex", "...", 1)])
        Path("tenants.yaml").write_text(lab.tenants_yaml())

Every zone, attached or not, is recorded under the state root (see `state`), so
`lab_status()` and `lab_down()` from any process see the zones of every other one, and
`lab_down()` / `cleanup_leftovers()` also clean up after a run that was killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from zonewatch.lab import kata, taps
from zonewatch.lab.assets import READY_MARKER, GuestAssets, ensure_assets
from zonewatch.lab.qemu import Accel, QemuZone, ZoneSpec
from zonewatch.lab.state import (
    LabError,
    ZoneRecord,
    find_processes,
    kill_process,
    read_records,
    state_root,
)

DEFAULT_BOOT_TIMEOUT = 60.0
TENANTS_FILE = "tenants.yaml"
_READY = re.compile(rf"^{READY_MARKER}\b", re.MULTILINE)


def tenants_yaml(zones: Iterable[tuple[str, str]]) -> str:
    """The tenants file for (zone name, tenant) pairs, tenants in order of first appearance:

    version: 1
    tenants:
      - name: acme
        zones: ["zone-a"]
    """
    by_tenant: dict[str, list[str]] = {}
    for zone, tenant in zones:
        by_tenant.setdefault(tenant, []).append(zone)
    lines = ["version: 1"]
    if not by_tenant:
        lines.append("tenants: []")
    else:
        lines.append("tenants:")
        for tenant, names in by_tenant.items():
            lines.append(f"  - name: {json.dumps(tenant)}")
            lines.append(f"    zones: [{', '.join(json.dumps(n) for n in names)}]")
    return "\n".join(lines) + "\n"


def tenant_entries(records: Iterable[ZoneRecord]) -> list[tuple[str, str]]:
    """(zone name, tenant) for every name each zone may be known by (see known_names)."""
    return [(name, r.tenant) for r in records for name in r.known_names()]


def wait_all_ready(
    zones: Iterable[QemuZone], timeout: float = DEFAULT_BOOT_TIMEOUT, interval: float = 0.05
) -> dict[str, float]:
    """Wait until every zone printed its ready marker; returns boot seconds per zone name.

    Raises LabError (with the console tail) for the first zone that died or timed out."""
    pending = list(zones)
    booted: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for zone in list(pending):
            alive = zone.alive
            if _READY.search(zone.console_text()):
                booted[zone.name] = time.monotonic() - zone.started_at
                zone.wait_ready(0.0)  # raises if the guest reported setup errors
                pending.remove(zone)
            elif not alive:
                zone.wait_for_console(_READY, 0.0)  # raises: QEMU died, with the console tail
            elif time.monotonic() >= deadline:
                raise LabError(
                    zone.name,
                    f"not ready within {timeout:.1f} s\n--- console tail ---\n"
                    f"{zone.console_tail()}",
                )
        if pending:
            time.sleep(interval)
    return booted


class Lab:
    """A set of lab zones started by this process; `stop_all()` (or `with`) removes them."""

    __slots__ = ("_accel", "_assets", "_state_dir", "_zones", "boot_seconds", "detach")

    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        accel: Accel = "auto",
        assets: GuestAssets | None = None,
        detach: bool = False,
    ) -> None:
        self._state_dir = state_root(state_dir)
        self._accel: Accel = accel
        self._assets = assets
        self._zones: dict[str, QemuZone] = {}
        self.boot_seconds: dict[str, float] = {}
        self.detach = detach

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    @property
    def zones(self) -> tuple[QemuZone, ...]:
        return tuple(self._zones.values())

    def zone(self, name: str) -> QemuZone:
        try:
            return self._zones[name]
        except KeyError:
            raise LabError(name, "no such zone in this lab") from None

    def __getitem__(self, name: str) -> QemuZone:
        return self.zone(name)

    def next_index(self) -> int:
        """The smallest zone index used neither by this lab nor by any recorded zone."""
        used = {z.spec.index for z in self._zones.values()}
        used |= {r.index for r in read_records(self._state_dir) if r.alive()}
        for index in range(taps.MAX_INDEX + 1):
            if index not in used:
                return index
        raise LabError("lab", "every zone index is in use")

    def start(
        self,
        specs: Iterable[ZoneSpec],
        *,
        wait: bool = True,
        timeout: float = DEFAULT_BOOT_TIMEOUT,
    ) -> list[QemuZone]:
        """Start the zones (all spawned first, so boots overlap), then wait for every ready
        marker unless `wait` is False. On any failure the zones of this call are stopped."""
        specs = list(specs)
        for what, values in (
            ("name", [s.name for s in specs]),
            ("index", [str(s.index) for s in specs]),
        ):
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise LabError("lab", f"zone {what}s used twice: {', '.join(dupes)}")
        for spec in specs:
            if spec.name in self._zones:
                raise LabError(spec.name, "this lab already has a zone of that name")
        assets = self._assets = self._assets or ensure_assets()
        started: list[QemuZone] = []
        try:
            for spec in specs:
                zone = QemuZone(
                    spec, assets=assets, state_dir=self._state_dir, accel=self._accel,
                    detach=self.detach,
                )  # fmt: skip
                zone.start()
                started.append(zone)
                self._zones[spec.name] = zone
            if wait:
                self.boot_seconds.update(wait_all_ready(started, timeout))
        except BaseException:
            for zone in started:
                self._zones.pop(zone.name, None)
                with contextlib.suppress(Exception):
                    zone.stop()
            raise
        return started

    def wait_ready(self, timeout: float = DEFAULT_BOOT_TIMEOUT) -> dict[str, float]:
        """Wait for every zone not yet known to be ready; returns boot seconds per zone."""
        pending = [z for z in self._zones.values() if z.name not in self.boot_seconds]
        self.boot_seconds.update(wait_all_ready(pending, timeout))
        return dict(self.boot_seconds)

    def stop(self, name: str) -> None:
        zone = self._zones.pop(name, None)
        if zone is None:
            raise LabError(name, "no such zone in this lab")
        zone.stop()

    def stop_all(self) -> None:
        """Stop every zone of this lab; goes on past failures and raises the first one."""
        first: BaseException | None = None
        for name in list(self._zones):
            try:
                self._zones.pop(name).stop()
            except Exception as exc:  # keep stopping the others
                first = first or exc
        if first is not None:
            raise first

    def tenants_yaml(self) -> str:
        return tenants_yaml(tenant_entries(z.record for z in self._zones.values()))

    def write_tenants(self, path: Path) -> Path:
        path.write_text(self.tenants_yaml())
        return path

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


# --- across processes ---------------------------------------------------------------------


def _write_tenants_file(root: Path) -> None:
    records = [r for r in read_records(root) if r.alive()]
    path = root / TENANTS_FILE
    if records:
        tmp = path.with_name(f".{TENANTS_FILE}.{os.getpid()}")
        tmp.write_text(tenants_yaml(tenant_entries(records)))
        tmp.replace(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def lab_up(
    specs: Iterable[ZoneSpec],
    *,
    state_dir: Path | None = None,
    accel: Accel = "auto",
    timeout: float = DEFAULT_BOOT_TIMEOUT,
) -> list[dict[str, Any]]:
    """Boot zones that outlive this process (QEMU daemonizes); returns their status once
    every one is ready. Also writes <state>/tenants.yaml for all running lab zones."""
    lab = Lab(state_dir=state_dir, accel=accel, detach=True)
    zones = lab.start(specs, timeout=timeout)
    _write_tenants_file(lab.state_dir)
    out = []
    for zone in zones:
        status = zone.record.status()
        status["boot_seconds"] = round(lab.boot_seconds.get(zone.name, 0.0), 2)
        out.append(status)
    return out


def lab_status(state_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every recorded zone: name, tenant, index, pid, alive, layout, tap, host_link, host_ip,
    guest_ip, share, console; a kata zone's also sandbox_id, netns, netns_path, pod_ip,
    bundle, qmp, virtiofsd_pids (see ZoneRecord.status)."""
    return [r.status() for r in read_records(state_dir)]


def _orphan_qemus(root: Path) -> list[tuple[int, int]]:
    """(pid, start time) of QEMU processes that belong to the lab but may lack a record:
    their command line names the state root (a kata zone's too: its initrd and console
    are there) or a lab tap."""
    marker_dir = str(root) + "/"
    marker_tap = f"ifname={taps.TAP_PREFIX}"

    def is_lab_qemu(argv: list[str]) -> bool:
        return Path(argv[0]).name.startswith("qemu-system") and any(
            marker_dir in a or marker_tap in a for a in argv[1:]
        )

    return find_processes(is_lab_qemu)


def _lab_sandboxes(root: Path) -> tuple[list[kata.Sandbox], list[str]]:
    """The kata sandboxes this lab made: recorded in its zone folders, and (by id only)
    those whose bundle carries the lab's annotation for this state root."""
    recorded = []
    if root.is_dir():
        for zone_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            sandbox = kata.read_sandbox_file(zone_dir)
            if sandbox is not None:
                recorded.append(sandbox)
    known = {s.sandbox_id for s in recorded}
    return recorded, [i for i in kata.bundles_of(root) if i not in known]


def lab_down(state_dir: Path | None = None) -> int:
    """Stop every lab zone (recorded, or left by a killed run) and remove what it made:
    zwtap* taps; a kata zone's virtiofsd, zw-kata-* namespaces, zwkata* veths and sandbox
    folders; the state. Idempotent; returns the number of QEMU processes stopped."""
    root = state_root(state_dir)
    stopped = 0
    for record in read_records(root):
        if kill_process(record.pid, record.start_time):
            stopped += 1
    for pid, start in _orphan_qemus(root):
        if kill_process(pid, start):
            stopped += 1
    taps.delete_taps(taps.TAP_PREFIX)
    recorded, by_id = _lab_sandboxes(root)
    for sandbox in recorded:
        kata.remove_sandbox(sandbox)
    kata.remove_sandboxes_by_id(by_id)
    kata.delete_lab_networks()
    kata.remove_empty_roots()
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()
        with contextlib.suppress(OSError):
            root.rmdir()
    return stopped


def cleanup_leftovers(state_dir: Path | None = None) -> int:
    """What a test session runs first: `lab_down()` for whatever an earlier run left."""
    return lab_down(state_dir)
