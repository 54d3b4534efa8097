"""`make demo`: real lab zones of two tenants, and the agent watching them from the host.

Three QEMU zones (two of tenant "acme", one of "globex") loop over file work in their 9p
shares and ping the host through their taps; a micro-VMM zone of "globex" makes port I/O
and MMIO exits. The agent (`zonewatch run`, a child process) prints their events and
per-zone stats as JSON lines. Ctrl-C (or --duration) stops the agent, then every zone, tap
and file the demo created.

    python -m zonewatch.demo [--duration S] [--no-events]
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
from dataclasses import replace
from pathlib import Path

from zonewatch.lab.lab import Lab, tenants_yaml
from zonewatch.lab.microvm import MicroVmProcess
from zonewatch.lab.qemu import ZoneSpec

# A shop's order queue: create, read, rename, and now and then sweep the finished ones.
ORDERS = """
mkdir -p $ZW_SHARE/orders
i=0
while true; do
  i=$((i+1))
  echo "order $i from $ZW_NAME" > $ZW_SHARE/orders/new-$i.txt
  cat $ZW_SHARE/orders/new-$i.txt > /dev/null
  mv $ZW_SHARE/orders/new-$i.txt $ZW_SHARE/orders/done-$i.txt
  if [ $((i % 5)) -eq 0 ]; then rm -f $ZW_SHARE/orders/done-*.txt; fi
  ping -c 1 -W 1 $ZW_HOST_IP > /dev/null 2>&1
  sleep 2
done
"""

# A ledger that appends and rotates its journal.
LEDGER = """
mkdir -p $ZW_SHARE/ledger
n=0
while true; do
  n=$((n+1))
  echo "entry $n" >> $ZW_SHARE/ledger/journal.log
  if [ $((n % 10)) -eq 0 ]; then
    mv $ZW_SHARE/ledger/journal.log $ZW_SHARE/ledger/journal.$n.log
    chmod 0400 $ZW_SHARE/ledger/journal.$n.log
  fi
  sleep 1
done
"""

ZONES = (
    ZoneSpec("shop-web", "acme", ORDERS, index=0),
    ZoneSpec("shop-db", "acme", ORDERS, index=1),
    ZoneSpec("ledger", "globex", LEDGER, index=2),
)
MICROVM = ("kvm-batch", "globex")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m zonewatch.demo", description=__doc__)
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    p.add_argument("--no-events", action="store_true", help="stats and alerts only")
    return p.parse_args(argv)


def agent_command(tenants: Path, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "zonewatch", "-v", "run", "--jsonl", "-",
           "--tenants", str(tenants), "--stats-interval", "5"]  # fmt: skip
    if not args.no_events:
        cmd.append("--events")
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM ends the demo as Ctrl-C does: through the finally blocks that clean up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zw-demo-")))
        lab = stack.enter_context(Lab())
        print(f"demo: booting {len(ZONES)} QEMU zones (TCG: a few seconds)...", file=sys.stderr)
        try:
            for spec in ZONES:  # free tap indexes: other labs may be running
                lab.start([replace(spec, index=lab.next_index())], wait=False)
            lab.wait_ready()
            stack.enter_context(MicroVmProcess(MICROVM[0], rate=500.0))
        except KeyboardInterrupt:
            return 130
        tenants = workdir / "tenants.yaml"
        tenants.write_text(tenants_yaml([*((z.name, z.tenant) for z in lab.zones), MICROVM]))
        for zone in lab.zones:
            print(f"demo: {zone.name} ({zone.tenant}) tap {zone.tap} share {zone.share_dir}",
                  file=sys.stderr)  # fmt: skip
        print("demo: agent starting; Ctrl-C stops everything", file=sys.stderr)
        agent = subprocess.Popen(agent_command(tenants, args))
        try:
            deadline = None if args.duration is None else time.monotonic() + args.duration
            while agent.poll() is None:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGINT)
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        print("demo: stopping zones", file=sys.stderr)
    return 0 if agent.returncode in (0, -signal.SIGINT, 130) else 1


if __name__ == "__main__":
    sys.exit(main())
