"""The agent works with exactly the privileges deploy/ grants it: root uid, the capability
set of deploy/systemd/zonewatch.service (= the DaemonSet's) and nothing else in its
bounding set, no_new_privs, and the kernel's memory-deny-write-execute (what
MemoryDenyWriteExecute= asks for). Under those, a lab zone's file and net activity, a
Kata-layout zone's net activity (its tap in the pod's network namespace, entered with
CAP_SYS_ADMIN) and a micro-VMM's VM exits still come out attributed: paths resolved, flows
seen, exits counted."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from zonewatch.lab.lab import Lab
from zonewatch.lab.microvm import MicroVmProcess
from zonewatch.lab.qemu import ZoneSpec

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "zonewatch.service"
CAP_BITS = {
    "CAP_NET_ADMIN": 12, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}  # fmt: skip
WORKLOAD = """
while true; do
  echo "least privilege" > /mnt/share/lp.txt
  cat /mnt/share/lp.txt > /dev/null
  ping -c 1 -W 1 "$ZW_HOST_IP" > /dev/null
  sleep 0.2
done
"""
# prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN): survives execve, refuses W+X mappings.
MDWE_EXEC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "assert libc.prctl(65, 1, 0, 0, 0) == 0, ctypes.get_errno()\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def unit_capabilities() -> set[str]:
    match = re.search(r"^CapabilityBoundingSet=(.*)$", UNIT.read_text(), re.MULTILINE)
    assert match
    return set(match.group(1).split())


def lines_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    data = path.read_bytes()
    return [orjson.loads(x) for x in data[: data.rfind(b"\n") + 1].splitlines()]


def test_agent_runs_with_the_deployed_capabilities_only(tmp_path: Path, lab: Lab) -> None:
    caps = unit_capabilities()
    assert set(CAP_BITS) == caps, "update CAP_BITS with the unit's capability set"
    zone, pod = lab.start(
        [ZoneSpec("lp-zone", "acme", WORKLOAD, 78),
         ZoneSpec("lp-pod", "acme", WORKLOAD, 79, layout="kata")],
        timeout=90,
    )  # fmt: skip
    (tmp_path / "tenants.yaml").write_text(lab.tenants_yaml())
    jsonl, log = tmp_path / "agent.jsonl", tmp_path / "agent.log"
    keep = ",".join("+" + c.removeprefix("CAP_").lower() for c in sorted(caps))
    argv = [
        sys.executable, "-c", MDWE_EXEC,
        "setpriv", f"--bounding-set=-all,{keep}", "--inh-caps=-all", "--ambient-caps=-all",
        "--no-new-privs", "--",
        sys.executable, "-m", "zonewatch", "-v", "run", "--events", "--jsonl", str(jsonl),
        "--tenants", str(tmp_path / "tenants.yaml"), "--share-mount", "share=/mnt/share",
    ]  # fmt: skip
    vm = MicroVmProcess("lp-microvm", rate=500)
    with log.open("w") as log_file:
        agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            vm.start()
            deadline = time.monotonic() + 120
            while True:
                lines = lines_of(jsonl)
                files = [
                    x for x in lines
                    if x["type"] == "event" and x["channel"] == "file"
                    and x["zone"]["name"] == "lp-zone" and x["file"]["path"] == "/mnt/share/lp.txt"
                ]  # fmt: skip
                flows = [
                    x for x in lines
                    if x["type"] == "event" and x["channel"] == "net"
                    and x["zone"]["name"] == "lp-zone"
                ]  # fmt: skip
                pod_flows = [
                    x for x in lines
                    if x["type"] == "event" and x["channel"] == "net"
                    and f"-{pod.pid}-" in x["zone"]["id"]
                ]  # fmt: skip
                exits = [
                    x for x in lines
                    if x["type"] == "stats" and x["zone"]["name"] == "lp-microvm"
                    and x["kvm"]["exits_per_s"] > 0
                ]  # fmt: skip
                if files and flows and pod_flows and exits:
                    break
                assert agent.poll() is None, log.read_text()
                assert time.monotonic() < deadline, (
                    f"file={len(files)} net={len(flows)} pod net={len(pod_flows)} "
                    f"kvm={len(exits)}\n{log.read_text()}"
                )
                time.sleep(0.1)
            status = Path(f"/proc/{agent.pid}/status").read_text()
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()
            vm.close()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    want = sum(1 << bit for bit in CAP_BITS.values())
    assert int(fields["CapBnd"], 16) == want
    assert int(fields["CapEff"], 16) == want
    assert fields["NoNewPrivs"].strip() == "1"
    text = log.read_text()
    attached = re.search(r"attached ([a-z, ]+); watching", text)
    assert attached, text
    assert {"file", "kvm", "sched", "net"} <= set(attached.group(1).split(", "))
    assert "not attached" not in text, text  # every probe of `zonewatch run` attached
    # The pod's namespace was entered and its virtiofsd found: no channel is blind to a zone
    # but sched to the TCG pod (its unnamed vCPU threads never run KVM_RUN under TCG).
    assert set(re.findall(r"(\w+) channel blind to", text)) <= {"sched"}, text
    assert pod_flows[0]["zone"]["tenant"] == "acme"
    assert files[0]["zone"]["tenant"] == "acme"
    assert files[0]["file"]["host_path"] == str(zone.share_dir / "lp.txt")
