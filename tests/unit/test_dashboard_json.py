"""dashboards/: Grafana conventions (shared/design.md) checked on the JSON: a datasource
template variable instead of `__inputs`, stable unique uids, `$__rate_interval` in every
rate(), only metric names the agent exports, only bounded labels. Whether each query returns
data from a real agent is tests/e2e/test_dashboards.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from zonewatch.exporters.prometheus import AgentHealth, PrometheusSink
from zonewatch.model import Alert, Lost, Severity, Zone, ZoneRef, ZoneStats

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
UIDS = {"zonewatch-fleet", "zonewatch-zone", "zonewatch-agent"}
LABELS = {
    "zone",
    "tenant",
    "vmm",
    "reason",
    "severity",
    "source",
    "probe",
    "queue",
    "instance",
    "le",
    "measure",  # made by a query (label_replace), two fixed values: not an exported label
}


def exported_names() -> set[str]:
    """Every sample name a populated sink serves."""
    sink = PrometheusSink(None)
    ref = ZoneRef("z1", "zone-a", "acme", "qemu")
    hist = {"4096": 1}
    sink.update_stats([ZoneStats(1, ref, 1.0, exits_by_reason={"IO": 1.0}, run_delay_hist_ns=hist,
                                 vmm_latency_hist_ns=hist, exit_latency_hist_ns=hist)])  # fmt: skip
    sink.set_zones([Zone("z1", 1, "zone-a", "acme", "qemu", 1, 0)])  # type: ignore[arg-type]
    sink.update_stats([ZoneStats(1, ref, 1.0, exits_by_reason={"IO": 1.0})])
    sink.export([Alert(1, ref, "r", Severity.LOW, "s"), Lost(1, "file", 3)])
    sink.health = lambda: AgentHealth(probes=("file",), queue_depths={"grpc": 0})
    text = generate_latest(sink.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for top in d["panels"] for p in [top, *top.get("panels", [])] if p["type"] != "row"]


def exprs(d: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(d) for t in p["targets"]]


def test_uids_are_stable_and_unique() -> None:
    assert [load(p)["uid"] for p in DASHBOARDS] == sorted(
        UIDS, key=lambda u: {"zonewatch-agent": 0, "zonewatch-fleet": 1, "zonewatch-zone": 2}[u]
    )


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_datasource_is_a_template_variable(path: Path) -> None:
    d = load(path)
    assert "__inputs" not in d and "__requires" not in d
    var = next(v for v in d["templating"]["list"] if v["name"] == "datasource")
    assert (var["type"], var["query"]) == ("datasource", "prometheus")
    for p in panels(d):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_queries_use_exported_names_bounded_labels_and_rate_interval(path: Path) -> None:
    names = exported_names()
    d = load(path)
    assert exprs(d)
    for expr in exprs(d):
        for metric in re.findall(r"\b(?:zonewatch|process)_[a-z0-9_]+", expr):
            assert metric in names, f"{metric} is not exported ({expr})"
        for window in re.findall(r"\b(?:rate|irate|increase)\([^\[]*\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", expr
        for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", expr):
            assert label in LABELS, (label, expr)
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            assert {g.strip() for g in group.split(",")} <= LABELS, expr


def test_every_variable_is_defined_and_panels_do_not_overlap() -> None:
    for path in DASHBOARDS:
        d = load(path)
        defined = {v["name"] for v in d["templating"]["list"]}
        for expr in exprs(d):
            used = set(re.findall(r"\$\{?([a-z]\w*)", expr))
            assert used <= defined, (path.name, expr)
        cells: set[tuple[int, int]] = set()
        for p in d["panels"]:
            g = p["gridPos"]
            mine = {
                (x, y)
                for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])
            }
            assert g["x"] + g["w"] <= 24 and not mine & cells, (path.name, p["title"])
            cells |= mine


def test_provisioning_files() -> None:
    prov = ROOT / "dashboards" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "zonewatch.yaml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    dash = yaml.safe_load((prov / "dashboards" / "zonewatch.yaml").read_text())
    provider = dash["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
