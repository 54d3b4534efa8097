"""`python -m zonewatch.lab up|status|down|tenants|assets|run`: lab zones from the shell.

`configure_parser()` + `run()` let the main `zonewatch` command mount this as `lab`.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zonewatch.errors import ConfigError, ZonewatchError
from zonewatch.lab.state import LAYOUTS, Layout

if TYPE_CHECKING:  # the main CLI builds its parser from here: no netlink or QEMU code yet
    from zonewatch.lab.qemu import QemuZone, ZoneSpec

DEFAULT_WORKLOAD = (
    'echo "hello from $ZW_NAME ($ZW_TENANT)" > "$ZW_SHARE/hello-$ZW_NAME.txt"\n'
    'ping -c 1 -W 2 "$ZW_HOST_IP" >/dev/null && echo "ping $ZW_HOST_IP ok"\n'
)


def default_specs(
    count: int,
    tenants: Sequence[str] = ("acme", "globex"),
    workload: str = DEFAULT_WORKLOAD,
    *,
    taken_names: set[str] | None = None,
    taken_indexes: set[int] | None = None,
    poweroff_after: bool = False,
    memory_mb: int = 256,
    layout: Layout = "plain",
) -> list[ZoneSpec]:
    """`count` zones named zone-a, zone-b, ... spread round-robin over `tenants`, on the
    lowest free indexes, all of `layout`."""
    from zonewatch.lab.qemu import ZoneSpec

    if count < 1:
        raise ConfigError("--zones", "must be at least 1")
    if not tenants:
        raise ConfigError("--tenants", "names no tenant")
    names = taken_names or set()
    indexes = taken_indexes or set()
    free_names = (n for n in _zone_names() if n not in names)
    free_indexes = (i for i in range(256) if i not in indexes)
    specs = []
    for i in range(count):
        try:
            name, index = next(free_names), next(free_indexes)
        except StopIteration:
            raise ConfigError("--zones", f"{count} zones do not fit in the lab") from None
        specs.append(
            ZoneSpec(
                name=name,
                tenant=tenants[i % len(tenants)],
                workload=workload,
                index=index,
                poweroff_after=poweroff_after,
                memory_mb=memory_mb,
                layout=layout,
            )
        )
    return specs


def _zone_names() -> list[str]:
    letters = string.ascii_lowercase
    return [f"zone-{a}" for a in letters] + [f"zone-{a}{b}" for a in letters for b in letters]


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="lab state folder (default $ZONEWATCH_LAB_STATE or /run/zonewatch/lab)",
    )
    sub = parser.add_subparsers(dest="lab_command", required=True)
    up = sub.add_parser("up", help="boot zones that keep running after this command")
    up.add_argument("--zones", type=int, default=2, help="how many zones (default 2)")
    up.add_argument(
        "--tenants",
        default="acme,globex",
        help="comma-separated tenants, assigned round-robin (default acme,globex)",
    )
    up.add_argument("--workload", metavar="FILE", default=None, help="sh script each zone runs")
    up.add_argument("--poweroff", action="store_true", help="power off after the workload")
    up.add_argument("--memory", type=int, default=256, help="MiB per zone (default 256)")
    up.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto")
    up.add_argument("--timeout", type=float, default=60.0, help="boot timeout in seconds")
    add_layout_option(up)
    status = sub.add_parser("status", help="list the lab's zones")
    add_json_option(status)
    sub.add_parser("down", help="stop every lab zone and remove taps and state")
    sub.add_parser("tenants", help="print the tenants file for the running zones")
    sub.add_parser("assets", help="build (once) and show the guest kernel and initramfs")
    one = sub.add_parser("run", help="boot one zone, run a workload, show its console")
    one.add_argument("workload", metavar="FILE", help="busybox sh script")
    one.add_argument("--name", default="zone-run")
    one.add_argument("--tenant", default="default")
    one.add_argument("--timeout", type=float, default=120.0)
    add_layout_option(one)
    return parser


def add_layout_option(parser: argparse.ArgumentParser) -> None:
    """--layout, for `up` and `run` (here and in the main `zonewatch lab`)."""
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="plain",
        help="plain: a tap and a 9p share; kata: laid out as a Kata pod (network namespace, "
        "tap0_kata with mirred filters, virtiofsd, sandbox id, OCI bundle). Default plain",
    )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """--json, for `status` (here and in the main `zonewatch lab`)."""
    parser.add_argument("--json", action="store_true", help="every field, as JSON")


def status_table(zones: list[dict[str, Any]]) -> str:
    """`lab status` for a terminal: one line per zone, within 80 columns."""
    lines = [f"{'NAME':<16} {'TENANT':<10} {'LAYOUT':<6} {'PID':>7} {'UP':<3} "
             f"{'HOST LINK':<10} GUEST IP"]  # fmt: skip
    for z in zones:
        lines.append(
            f"{z['name'][:16]:<16} {z['tenant'][:10]:<10} {z['layout']:<6} {z['pid']:>7} "
            f"{'yes' if z['alive'] else 'no':<3} {z['host_link'][:10]:<10} {z['guest_ip']}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from zonewatch.lab import assets as lab_assets
    from zonewatch.lab import lab
    from zonewatch.lab.state import read_records

    command: str = args.lab_command
    state_dir: Path | None = getattr(args, "state_dir", None)
    if command == "assets":
        found = lab_assets.ensure_assets()
        print(json.dumps(found.describe(), indent=2))
        return 0
    if command == "status":
        zones = lab.lab_status(state_dir)
        if getattr(args, "json", False):
            print(json.dumps(zones, indent=2))
        else:
            print(status_table(zones))
        return 0
    if command == "tenants":
        live = [r for r in read_records(state_dir) if r.alive()]
        print(lab.tenants_yaml(lab.tenant_entries(live)), end="")
        return 0
    if command == "down":
        stopped = lab.lab_down(state_dir)
        print(f"lab down: stopped {stopped} zone(s)")
        return 0
    if command == "run":
        return _run_one(args)
    # up
    workload = DEFAULT_WORKLOAD
    if getattr(args, "workload", None) is not None:
        workload = _read_workload(args.workload)
    live = [r for r in read_records(state_dir) if r.alive()]
    tenants: str = getattr(args, "tenants", "acme,globex")
    specs = default_specs(
        getattr(args, "zones", 2),
        [t.strip() for t in tenants.split(",") if t.strip()],
        workload,
        taken_names={r.name for r in live},
        taken_indexes={r.index for r in live},
        poweroff_after=getattr(args, "poweroff", False),
        memory_mb=getattr(args, "memory", 256),
        layout=getattr(args, "layout", "plain"),
    )
    zones = lab.lab_up(
        specs,
        state_dir=state_dir,
        accel=getattr(args, "accel", "auto"),
        timeout=getattr(args, "timeout", lab.DEFAULT_BOOT_TIMEOUT),
    )
    print(json.dumps(zones, indent=2))
    return 0


def _read_workload(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the workload: {exc.strerror}") from exc


def _run_one(args: argparse.Namespace) -> int:
    """Boot one attached zone, stream its console until the workload ends, stop it."""
    from zonewatch.lab.lab import Lab
    from zonewatch.lab.qemu import EXIT_PATTERN, ZoneSpec

    workload = _read_workload(args.workload)
    timeout: float = getattr(args, "timeout", 120.0)
    with Lab(state_dir=getattr(args, "state_dir", None)) as lab:
        spec = ZoneSpec(
            args.name,
            args.tenant,
            workload,
            index=lab.next_index(),
            layout=getattr(args, "layout", "plain"),
        )
        (zone,) = lab.start([spec], wait=False)
        rc = _stream_console(zone, EXIT_PATTERN, timeout)
    if rc != 0:
        print(f"zonewatch lab run: the workload exited with {rc}", file=sys.stderr)
        return 1
    return 0


def _stream_console(zone: QemuZone, pattern: re.Pattern[str], timeout: float) -> int:
    shown = 0
    deadline = time.monotonic() + timeout
    while True:
        text = zone.console_text()
        if len(text) > shown:
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
        match = pattern.search(text)
        if match is not None:
            return int(match.group(1))
        if not zone.alive or time.monotonic() >= deadline:
            zone.wait_for_console(pattern, 0.0)  # raises with the console tail
        time.sleep(0.1)


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Run a lab command from arguments, or from the main CLI's parsed `lab` namespace."""
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        args = configure_parser(argparse.ArgumentParser(prog="zonewatch lab")).parse_args(argv)
    try:
        return run(args)
    except ZonewatchError as exc:
        print(f"zonewatch lab: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
