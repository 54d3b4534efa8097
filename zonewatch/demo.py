"""`make demo`: real lab zones of two tenants, one of them compromised, and the agent's live
UI watching them from the host.

Three QEMU zones: shop-web and shop-db of tenant "acme", ledger of "globex"; and a micro-VMM
zone of "globex" making port I/O and MMIO exits. shop-db and ledger do file work in their
9p shares and ping the host. shop-web is compromised: in a loop it asks the cloud metadata
service for credentials, probes the ledger zone (the other tenant) on service ports, tries
to get out through its share (a symlink to /etc/shadow, `..` past the share's root, a block
device node for the host's disk), plants an SSH key in its share and now and then scans the
host end of its tap (zonewatch.lab.workloads). Its traffic leaves the guest through its tap
and ends there: the host answers for its own address and forwards nothing (forwarding is
off on the demo's taps), so no probe reaches beyond this machine, or the ledger zone.

With --layout kata, the ledger zone (the other tenant's, which the compromised zone probes)
runs laid out as a Kata pod (zonewatch.lab.kata): its QEMU in a network namespace of its
own on tap0_kata, its share served by virtiofsd, its name a sandbox id.

The agent (`zonewatch run --tui --rules rules/`, a child process) shows the zones and the
alerts of the default rules as they come. Ctrl-C (or q) quits the UI, which stops the
agent; then every zone, tap (with the agent's tc filters) and file the demo made is
removed. Without a terminal, or with --jsonl, the agent prints JSON lines instead.

    python -m zonewatch.demo [--jsonl] [--duration S] [--no-events] [--layout plain|kata]
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from zonewatch.lab import kata, workloads
from zonewatch.lab.assets import SHARE_TAG
from zonewatch.lab.lab import Lab, tenant_entries, tenants_yaml
from zonewatch.lab.microvm import MicroVmProcess
from zonewatch.lab.qemu import QemuZone, ZoneSpec
from zonewatch.lab.state import LAYOUTS, LabError, Layout

RULES = Path(__file__).resolve().parents[1] / "rules"
COMPROMISED = ("shop-web", "acme")
BENIGN = (("shop-db", "acme", workloads.ORDERS), ("ledger", "globex", workloads.LEDGER))
TARGET = "ledger"  # the compromised zone's lateral probes go to the other tenant's zone
MICROVM = ("kvm-batch", "globex")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m zonewatch.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--jsonl",
        action="store_true",
        help="JSON lines on stdout instead of the UI (the default without a terminal)",
    )
    p.add_argument("--duration", metavar="S", type=float, help="stop after S seconds")
    p.add_argument("--no-events", action="store_true", help="no raw events: stats and alerts only")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="plain",
        help=f"the {TARGET} zone's layout: plain (default) or kata (laid out as a Kata pod)",
    )
    return p.parse_args(argv)


def use_tui(args: argparse.Namespace) -> bool:
    """The UI unless --jsonl, or this is not a terminal (said in one line). The UI reads
    keys from stdin and draws on stderr (textual's choice), so all three must be one."""
    if args.jsonl:
        return False
    streams = {"stdin": sys.stdin, "stdout": sys.stdout, "stderr": sys.stderr}
    off = [name for name, stream in streams.items() if not stream.isatty()]
    if not off:
        return True
    names = ", ".join(off[:-1]) + " and " + off[-1] if len(off) > 1 else off[0]
    verb = "are" if len(off) > 1 else "is"
    print(f"demo: {names} {verb} not a terminal: JSON lines instead of the UI", file=sys.stderr)
    return False


def agent_command(tenants: Path, workdir: Path, args: argparse.Namespace, tui: bool) -> list[str]:
    cmd = [sys.executable, "-m", "zonewatch", "-v", "run", "--tenants", str(tenants),
           "--share-mount", f"{SHARE_TAG}=/mnt/share",
           "--share-mount", f"{kata.SHARE_TAG}=/mnt/share",
           "--journal", str(workdir / "journal")]  # fmt: skip
    if RULES.is_dir():
        cmd += ["--rules", str(RULES)]
    if tui:
        cmd += ["--tui"]
    else:
        cmd += ["--jsonl", "-", "--stats-interval", "5"]
    if args.duration is not None:
        cmd += ["--duration", str(args.duration)]
    if not args.no_events:
        cmd.append("--events")
    return cmd


class MicroVm(MicroVmProcess):
    """The micro-VMM zone without its stats file: the VMM rewriting a host file twice a
    second is what "Zone VMM opened a host path outside its share" is for, and the demo's
    own tool is not what it should show. (Its stats go to the null device at exit.)"""

    def command(self) -> list[str]:
        argv = super().command()
        at = argv.index("--stats")
        del argv[at : at + 2]
        return argv


def no_forwarding(zone: QemuZone) -> None:
    """Nothing a guest sends past its /30 is routed on (even on a host that forwards): the
    metadata and lateral probes end at the host end of its link (a plain zone's tap, a
    kata zone's veth). The setting goes with that link."""
    Path(f"/proc/sys/net/ipv4/conf/{zone.host_link}/forwarding").write_text("0\n")


def boot(lab: Lab, target_layout: Layout = "plain") -> QemuZone:
    """Spawn the three zones (boots overlap), the compromised one last: its workload names
    the target zone's address. Returns the compromised zone once every zone is ready.

    The agent starts after the boots, not during them: on two cores it would not start any
    sooner, and each zone it saw come up would re-raise audit findings for every zone,
    crowding the UI's alerts pane just as the first attacks arrive."""
    by_name: dict[str, QemuZone] = {}
    for name, tenant, workload in BENIGN:  # free indexes: other labs may be running
        layout: Layout = target_layout if name == TARGET else "plain"
        spec = ZoneSpec(name, tenant, workload, index=lab.next_index(), layout=layout)
        (by_name[name],) = lab.start([spec], wait=False)
    target_ip = by_name[TARGET].guest_ip
    (compromised,) = lab.start(
        [ZoneSpec(*COMPROMISED, workloads.compromised(target_ip), index=lab.next_index())],
        wait=False,
    )
    for zone in lab.zones:
        no_forwarding(zone)  # before the guests are up
    lab.wait_ready()
    return compromised


def hold_signals() -> None:
    """From here on the demo is cleaning up: another Ctrl-C (users press it twice) must not
    cut that short and leave zones or taps behind. The agent gets 30 s, QEMU 5 s each."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def run_agent(cmd: list[str], duration: float | None) -> int:
    """The agent in the foreground of this terminal until it exits (q or Ctrl-C in the UI,
    --duration) or Ctrl-C reaches this process; returns its exit status."""
    agent = subprocess.Popen(cmd)
    try:
        # The agent stops itself after --duration; this is a backstop if it hangs.
        deadline = None if duration is None else time.monotonic() + duration + 30
        while agent.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        hold_signals()
        if agent.poll() is None:
            agent.send_signal(signal.SIGINT)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    return agent.returncode


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tui = use_tui(args)
    # SIGTERM, and SIGHUP (the terminal closed), end the demo as Ctrl-C does: through the
    # finally blocks that clean up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zw-demo-")))
        lab = stack.enter_context(Lab())
        print("demo: booting 3 QEMU zones (TCG: a few seconds)...", file=sys.stderr)
        try:
            compromised = boot(lab, target_layout=args.layout)
            stack.enter_context(MicroVm(MICROVM[0], rate=500.0))
        except KeyboardInterrupt:
            hold_signals()
            print("demo: interrupted; stopping zones", file=sys.stderr)
            return 130
        except LabError as exc:
            hold_signals()
            print(f"demo: {exc}; stopping zones", file=sys.stderr)
            return 1
        tenants = workdir / "tenants.yaml"
        entries = tenant_entries(z.record for z in lab.zones)
        tenants.write_text(tenants_yaml([*entries, MICROVM]))
        for zone in lab.zones:
            role = " COMPROMISED" if zone is compromised else ""
            pod = f" (kata pod, netns {zone.netns})" if zone.layout == "kata" else ""
            print(f"demo: {zone.name} ({zone.tenant}) tap {zone.tap}{pod} {zone.guest_ip} "
                  f"share {zone.share_dir}{role}", file=sys.stderr)  # fmt: skip
        print(f"demo: agent starting{' (UI)' if tui else ''}; Ctrl-C stops everything",
              file=sys.stderr)  # fmt: skip
        rc = run_agent(agent_command(tenants, workdir, args, tui), args.duration)
        print("demo: stopping zones", file=sys.stderr)
    return 0 if rc in (0, -signal.SIGINT, 130) else 1


if __name__ == "__main__":
    sys.exit(main())
