"""A Kata pod from the lab, watched by the real agent with no tenants file: its zone is the
tenant its sandbox bundle names, and the guest's file work through virtiofsd (started with
its socket as fd 3, forking a worker that pivots into the share) arrives as file events on
the guest's paths, with no false "outside the share" opens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess
from zonewatch.lab.lab import Lab
from zonewatch.lab.qemu import ZoneSpec

pytestmark = pytest.mark.e2e

WORKLOAD = """\
i=0
while [ $i -lt 2000 ]; do
  echo "line $i" > "$ZW_SHARE/f$i.txt"
  cat "$ZW_SHARE/f$i.txt" > /dev/null
  i=$((i+1))
  sleep 0.2
done
"""


@pytest.mark.parametrize("hooks", ["tracepoints", "uprobes"])
def test_agent_follows_a_kata_pods_share_under_its_namespace(
    tmp_path: Path, lab: Lab, hooks: str
) -> None:
    (pod,) = lab.start([ZoneSpec("pod-a", "shop", WORKLOAD, index=9, layout="kata")])
    share = str(pod.share_dir)

    def of_pod(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [line for line in lines if line.get("zone", {}).get("name") == pod.sandbox_id]

    def created(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            line
            for line in of_pod(lines)
            if line.get("channel") == "file" and line["op"] == "create"
        ]

    with AgentProcess(
        tmp_path,
        "--events", "--no-stats", "--share-mount", "kataShared=/mnt/share",
        "--file-hooks", hooks,
    ) as agent:  # fmt: skip
        agent.wait_for(lambda lines: len(created(lines)) >= 5, 60, "5 creates in the pod's share")
        lines = of_pod(agent.read())

    events = created(lines)
    assert {e["zone"]["tenant"] for e in events} == {"shop"}  # the bundle's namespace
    for event in events:
        name = event["file"]["path"].removeprefix("/mnt/share/")
        assert name.startswith("f") and name.endswith(".txt"), event
        assert event["file"]["host_path"] == f"{share}/{name}"
        assert event["file"]["share"] == "kataShared"
    # The file work is virtiofsd's (the worker it forked), not QEMU's.
    assert {e["proc"]["pid"] for e in events} <= set(pod.virtiofsd_pids)
    outside = [e for e in lines if e.get("op") == "open_outside_share"]
    assert not outside, outside[:3]
