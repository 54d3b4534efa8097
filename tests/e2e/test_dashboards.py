"""The Grafana dashboards query what the agent really exports: Debian's Prometheus scrapes a
real agent (`zonewatch run --metrics`) watching two lab zones of two tenants (file work on
their shares, pings on their taps, a rule alert) and a micro-VMM (VM exits), and every
target of every panel of every dashboard in dashboards/, with its template variables
substituted as Grafana would, returns data through Prometheus' HTTP API."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from itertools import product
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess
from zonewatch.lab.lab import Lab
from zonewatch.lab.microvm import MicroVmProcess
from zonewatch.lab.qemu import ZoneSpec

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
WORKLOAD = """
mkdir -p /mnt/share/etc /mnt/share/work
echo 'root:x:0:0' > /mnt/share/etc/shadow
while true; do
  echo "$ZW_NAME" > /mnt/share/work/out.txt
  cat /mnt/share/work/out.txt > /dev/null
  ping -c 1 -W 1 "$ZW_HOST_IP" > /dev/null
  sleep 0.2
done
"""
TENANTS = """version: 1
tenants:
  - name: acme
    zones: ["dash-acme-*"]
  - name: globex
    zones: ["dash-globex-*", "dash-vmm"]
"""
TOKENS = """version: 1
tokens:
  - name: dashboards
    token: dashboards-token-0001
    tenants: [acme, globex]
"""
ZONES = {"dash-acme-1": "acme", "dash-globex-1": "globex", "dash-vmm": "globex"}
# Grafana's own variables, as it would fill them for a 1 s scrape interval.
BUILTINS = {"$__rate_interval": "10s", "$__interval": "2s", "$__range": "5m"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title / refId, expr) of every target, rows' nested panels included."""
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            for target in p.get("targets", []):
                yield f"{p['title']} / {target['refId']}", target["expr"]


def variable_bindings(dashboard: dict[str, Any], agent: str) -> list[dict[str, str]]:
    """Every combination of the dashboard's query variables' values ("All" is .*)."""
    choices: dict[str, list[str]] = {}
    for var in dashboard["templating"]["list"]:
        name = var["name"]
        if var["type"] != "query":
            continue
        values = {
            "tenant": sorted(set(ZONES.values())),
            "zone": sorted(ZONES),
            "instance": [agent],
        }[name]
        if var.get("multi") or var.get("includeAll"):
            # Grafana writes these as a regex inside a PromQL string: escaped twice.
            values = [re.escape(v).replace("\\", "\\\\") for v in values]
        choices[name] = list(values)
        if var.get("includeAll"):
            choices[name].append(var["allValue"])
    names = list(choices)
    return [dict(zip(names, combo, strict=True)) for combo in product(*choices.values())]


def substitute(expr: str, binding: dict[str, str]) -> str:
    for key, value in BUILTINS.items():
        expr = expr.replace(key, value)
    for name, value in binding.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


class Prometheus:
    def __init__(self, workdir: Path, scrape_target: str) -> None:
        binary = shutil.which("prometheus")
        assert binary is not None
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: zonewatch\n"
            f"    static_configs:\n      - targets: ['{scrape_target}']\n"
        )
        self.log = workdir / "prometheus.log"
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/-/ready", timeout=5
                ) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "Prometheus not ready:\n" + self.log.read_text()
            time.sleep(0.1)

    def query(self, expr: str) -> list[dict[str, Any]]:
        try:
            doc = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr}: {exc.read().decode()}") from None
        assert doc["status"] == "success", (expr, doc)
        return doc["data"]["result"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


@pytest.fixture
def prometheus_binary() -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("Debian's prometheus is not installed (make setup installs it)")


def test_there_are_three_dashboards() -> None:
    assert {p.name for p in DASHBOARDS} == {
        "fleet-overview.json",
        "zone-detail.json",
        "agent-health.json",
    }


@pytest.mark.usefixtures("prometheus_binary")
def test_every_dashboard_panel_returns_data(tmp_path: Path, lab: Lab) -> None:
    lab.start(
        [
            ZoneSpec("dash-acme-1", "acme", WORKLOAD, 70),
            ZoneSpec("dash-globex-1", "globex", WORKLOAD, 71),
        ],
        timeout=90,
    )
    (tmp_path / "tenants.yaml").write_text(TENANTS)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS)
    tokens.chmod(0o600)
    metrics = f"127.0.0.1:{free_port()}"
    vm = MicroVmProcess("dash-vmm", rate=500)
    prometheus: Prometheus | None = None
    try:
        vm.start()
        with AgentProcess(
            tmp_path, "--tenants", str(tmp_path / "tenants.yaml"), "--share-mount", "share=/",
            "--rules", str(ROOT / "rules"), "--metrics", metrics,
            "--journal", str(tmp_path / "journal"), "--tokens", str(tokens),
            "--grpc", f"unix:{tmp_path}/zw.sock",
            "--kvm-detail",  # the VMM's time per exit, where kvm_entry does not fire (PVM)
        ) as agent:  # fmt: skip
            prometheus = Prometheus(tmp_path, metrics)
            prometheus.wait_ready(timeout=60)
            pending = {
                (path.name, where, expr): variable_bindings(json.loads(path.read_text()), metrics)
                for path in DASHBOARDS
                for where, expr in targets(json.loads(path.read_text()))
            }
            assert len(pending) >= 50, len(pending)
            every_binding = {"fleet-overview.json", "agent-health.json"}
            deadline = time.monotonic() + 120
            while pending:
                for key, bindings in list(pending.items()):
                    name, _, expr = key
                    empty = [b for b in bindings if not prometheus.query(substitute(expr, b))]
                    # Fleet and agent views: data for every tenant and for All. Zone
                    # detail: data for at least one lab zone (TCG zones make no VM exits,
                    # the micro-VMM has no tap); the values are checked below.
                    if (not empty) if name in every_binding else len(empty) < len(bindings):
                        del pending[key]
                    else:
                        pending[key] = bindings
                if not pending:
                    break
                assert agent.proc.poll() is None, agent.log.read_text()
                assert time.monotonic() < deadline, "no data for:\n" + "\n".join(
                    f"{name}: {where}: {expr}" for name, where, expr in pending
                )
                time.sleep(0.5)

            query = prometheus.query

            def latest(expr: str) -> dict[str, float]:
                return {r["metric"].get("zone", ""): float(r["value"][1]) for r in query(expr)}

            # Real numbers behind the panels: the workloads' files and pings, the
            # micro-VMM's port I/O exits, the rule alert and the isolation findings.
            files = latest("increase(zonewatch_zone_file_operations_total[30s])")
            rx = latest("increase(zonewatch_zone_network_receive_bytes_total[30s])")
            exits = latest('increase(zonewatch_zone_kvm_exits_by_reason_total{reason="IO"}[30s])')
            alerts = latest("sum by (zone) (zonewatch_alerts_total)")
            probes = latest("count(zonewatch_probe_attached)")
            # What a live agent serves passes promtool's lint (names, types, units, help).
            exposition = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read()
            lint = subprocess.run(["promtool", "check", "metrics"], input=exposition,
                                  capture_output=True, timeout=60, check=False)  # fmt: skip
    finally:
        if prometheus is not None:
            prometheus.stop()
        vm.close()
    assert files["dash-acme-1"] > 0 and files["dash-globex-1"] > 0, files
    assert rx["dash-acme-1"] > 0 and rx["dash-globex-1"] > 0, rx
    assert exits["dash-vmm"] > 0, exits
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, b""), lint
    assert b"zonewatch_zone_kvm_exits_total" in exposition
    assert alerts["dash-acme-1"] >= 1 and alerts["dash-globex-1"] >= 1, alerts
    attached = re.search(r"attached ([a-z, ]+); watching", agent.log.read_text())
    assert attached and probes[""] == len(attached.group(1).split(", ")) >= 4, probes
