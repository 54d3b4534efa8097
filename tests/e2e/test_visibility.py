"""No silent blind spots, live: a Kata-layout lab zone (its tap in the pod's network
namespace) and a plain one, looked at without CAP_SYS_ADMIN (entering another network
namespace needs it). `zonewatch zones --json` says the pod's net channel is blind and why;
the agent, under the same bounding set, keeps watching the plain zone's traffic while it
logs the cause once and serves it as zonewatch_zone_channel_blind."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from zonewatch.exporters.prometheus import zone_label
from zonewatch.lab.lab import Lab
from zonewatch.lab.qemu import ZoneSpec
from zonewatch.model import ZoneRef

pytestmark = pytest.mark.e2e
WORKLOAD = """
while true; do
  ping -c 1 -W 1 "$ZW_HOST_IP" > /dev/null
  sleep 0.2
done
"""
NO_SYS_ADMIN = ["setpriv", "--bounding-set=-sys_admin", "--"]
CAP_SYS_ADMIN = 21


def zones_json(*prefix: str) -> dict[int, dict[str, Any]]:
    """`zonewatch zones --json` (run after `prefix`), by VMM pid."""
    out = subprocess.run(
        [*prefix, sys.executable, "-m", "zonewatch", "zones", "--json"],
        capture_output=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    return {z["pid"]: z for z in orjson.loads(out)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def blind_series(port: int) -> dict[tuple[str, str], str]:
    """zonewatch_zone_channel_blind series: (zone label, channel) -> reason."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.labels["zone"], s.labels["channel"]): s.labels["reason"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "zonewatch_zone_channel_blind"
    }


def test_a_pod_the_agent_cannot_enter_is_reported_and_the_others_still_watched(
    tmp_path: Path, lab: Lab
) -> None:
    pod, plain = lab.start(
        [ZoneSpec("vis-pod", "acme", WORKLOAD, 83, layout="kata"),
         ZoneSpec("vis-plain", "acme", WORKLOAD, 84)],
        timeout=90,
    )  # fmt: skip

    # With every capability the pod's tap is found in its namespace.
    full = zones_json()
    assert full[pod.pid]["coverage"]["net"]["state"] == "seen", full[pod.pid]
    assert (
        f"tap0_kata in netns {full[pod.pid]['netns']}" in full[pod.pid]["coverage"]["net"]["detail"]
    )
    assert full[pod.pid]["coverage"]["file"]["state"] == "seen"  # its virtiofsd found
    assert full[pod.pid]["coverage"]["sched"]["reason"] == "no_vcpu"  # TCG: never KVM_RUN
    # Without CAP_SYS_ADMIN: the pod's net channel is blind, with the reason; plain's is not.
    limited = zones_json(*NO_SYS_ADMIN)
    net = limited[pod.pid]["coverage"]["net"]
    assert (net["state"], net["reason"]) == ("blind", "netns"), net
    assert "cannot enter it: [Errno 1] failed to open netns" in net["detail"]
    assert limited[plain.pid]["coverage"]["net"]["state"] == "seen", limited[plain.pid]
    table = subprocess.run(
        [*NO_SYS_ADMIN, sys.executable, "-m", "zonewatch", "zones"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    pod_name = limited[pod.pid]["name"]
    assert f"{pod_name}: net blind (netns): " in table, table

    pod_label = zone_label(ZoneRef(*(limited[pod.pid][k] for k in ("id", "name", "tenant", "vmm"))))
    plain_label = zone_label(
        ZoneRef(*(limited[plain.pid][k] for k in ("id", "name", "tenant", "vmm")))
    )
    jsonl, log = tmp_path / "agent.jsonl", tmp_path / "agent.log"
    port = free_port()
    argv = [*NO_SYS_ADMIN, sys.executable, "-m", "zonewatch", "-v", "run", "--events",
            "--jsonl", str(jsonl), "--metrics", f"127.0.0.1:{port}"]  # fmt: skip
    with log.open("w") as log_file:
        agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            deadline = time.monotonic() + 120
            flows: list[dict[str, Any]] = []
            series: dict[tuple[str, str], str] = {}
            while True:
                assert agent.poll() is None, log.read_text()
                if jsonl.exists():
                    data = jsonl.read_bytes()
                    flows = [
                        x for x in map(orjson.loads, data[: data.rfind(b"\n") + 1].splitlines())
                        if x["type"] == "event" and x["channel"] == "net"
                        and x["zone"]["name"] == limited[plain.pid]["name"]
                    ]  # fmt: skip
                try:
                    series = blind_series(port)
                except OSError:
                    series = {}
                if flows and (pod_label, "net") in series:
                    break
                assert time.monotonic() < deadline, (
                    f"plain flows={len(flows)} blind={series}\n{log.read_text()}"
                )
                time.sleep(0.2)
            status = Path(f"/proc/{agent.pid}/status").read_text()
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()
    cap_eff = next(x for x in status.splitlines() if x.startswith("CapEff:")).split()[1]
    assert not int(cap_eff, 16) & (1 << CAP_SYS_ADMIN)  # the agent really lacked it
    assert series[(pod_label, "net")] == "netns"
    assert (plain_label, "net") not in series
    text = log.read_text()
    said = [x for x in text.splitlines() if "net channel blind to" in x]
    assert len(said) == 1, text  # once per cause
    assert "(netns)" in said[0] and "failed to open netns" in said[0], said
