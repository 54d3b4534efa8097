"""exporters/prometheus.py: every per-zone number of a stats snapshot is a series, named by
the OTel-to-Prometheus rules (unit suffixes, `_total` on counters), in base units, with
bounded labels only (the dashboards in dashboards/ query these names)."""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
import subprocess

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from zonewatch.exporters.prometheus import (
    IN_HISTOGRAMS,
    ZONE_COUNTERS,
    ZONE_GAUGES,
    ZONE_HISTOGRAMS,
    AgentHealth,
    PrometheusSink,
    zone_label,
)
from zonewatch.model import Alert, Lost, Severity, ZoneRef, ZoneStats

ZONE = ZoneRef("qemu-1-2", "zone-a", "acme", "qemu")
BOUNDED_LABELS = {
    "zone", "tenant", "vmm", "reason", "severity", "source", "probe", "queue", "le", "channel",
}  # fmt: skip
UNIT_SUFFIX = re.compile(r"_(seconds|ratio|total|bytes|count|sum|bucket|info|open)$")


def scrape(sink: PrometheusSink) -> list[Sample]:
    text = generate_latest(sink.registry).decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def stats() -> ZoneStats:
    return ZoneStats(
        ts_ns=1,
        zone=ZONE,
        interval_s=1.0,
        vcpus=2,
        exits_per_s=300.0,
        exits_by_reason={"IO": 200.0, "HLT": 100.0},
        hypercalls_per_s=3.0,
        msr_writes_per_s=4.0,
        run_delay_p99_us=250.0,
        run_delay_pct=12.5,
        cpu_pct=150.0,
        rx_bytes_per_s=1000.0,
        tx_packets_per_s=7.0,
        malformed_per_s=1.0,
        file_ops_per_s=9.0,
    )


def test_every_numeric_stats_field_is_exported() -> None:
    numeric = {
        f.name
        for f in dataclasses.fields(ZoneStats)
        if f.type in ("int", "float") and f.name not in ("ts_ns", "interval_s")
    }
    assert len(numeric) > 15  # the annotations are strings here (postponed evaluation)
    exported = set(ZONE_COUNTERS) | set(ZONE_GAUGES) | set(IN_HISTOGRAMS)
    assert numeric <= exported, numeric - exported
    assert set(IN_HISTOGRAMS.values()) <= set(ZONE_HISTOGRAMS)


def values(sink: PrometheusSink, zone: str = "zone-a") -> dict[tuple[str, str | None], float]:
    return {
        (s.name, s.labels.get("reason")): s.value
        for s in scrape(sink)
        if s.labels.get("zone") == zone and s.labels.get("tenant") == "acme"
    }


def test_rates_become_counters_of_what_each_interval_counted() -> None:
    """A snapshot of 2 s at 300 exits/s counted 600 exits: /metrics serves the running
    total as a `_total` counter, in base units (bytes, seconds)."""
    sink = PrometheusSink(None)
    first = dataclasses.replace(stats(), interval_s=2.0)
    sink.update_stats([first])
    sink.update_stats([first])  # the same snapshot again (a re-send) counts once
    v = values(sink)
    assert v[("zonewatch_zone_kvm_exits_total", None)] == 600.0
    assert v[("zonewatch_zone_kvm_exits_by_reason_total", "IO")] == 400.0
    assert v[("zonewatch_zone_kvm_hypercalls_total", None)] == 6.0
    assert v[("zonewatch_zone_kvm_msr_writes_total", None)] == 8.0
    assert v[("zonewatch_zone_cpu_seconds_total", None)] == 3.0  # 150 % of a CPU for 2 s
    assert v[("zonewatch_zone_sched_wait_seconds_total", None)] == 0.25
    assert v[("zonewatch_zone_network_receive_bytes_total", None)] == 2000.0
    assert v[("zonewatch_zone_network_transmit_packets_total", None)] == 14.0
    assert v[("zonewatch_zone_network_malformed_frames_total", None)] == 2.0
    assert v[("zonewatch_zone_file_operations_total", None)] == 18.0
    second = dataclasses.replace(stats(), ts_ns=2, exits_per_s=0.0, exits_by_reason={})
    sink.update_stats([second])
    v = values(sink)
    assert v[("zonewatch_zone_kvm_exits_total", None)] == 600.0  # a quiet interval: no fall
    assert v[("zonewatch_zone_file_operations_total", None)] == 27.0
    stale = dataclasses.replace(stats(), ts_ns=1, file_ops_per_s=1000.0)
    sink.update_stats([stale])  # older than what was counted: nothing
    assert values(sink)[("zonewatch_zone_file_operations_total", None)] == 27.0


def test_counters_only_grow_over_many_scrapes() -> None:
    sink = PrometheusSink(None)
    seen: list[dict[tuple[str, str | None], float]] = []
    for ts in range(1, 30):
        rate = float((ts * 37) % 11)  # rates that go up and down
        st = dataclasses.replace(stats(), ts_ns=ts, exits_per_s=rate, rx_bytes_per_s=rate * 1e3,
                                 exits_by_reason={"IO": rate}, cpu_pct=rate)  # fmt: skip
        sink.update_stats([st])
        seen.append({k: x for k, x in values(sink).items() if k[0].endswith("_total")})
    assert len(seen[0]) >= len(ZONE_COUNTERS)
    for before, after in itertools.pairwise(seen):
        assert all(after[k] >= before[k] for k in before), (before, after)


def test_ratios_stay_between_0_and_1() -> None:
    """cpu_pct sums every thread of the zone's processes (150 = 1.5 CPUs): the ratio is of
    the host's CPUs; the wait ratio is per vCPU."""
    sink = PrometheusSink(None)
    sink.host_cpus = 2
    busy = dataclasses.replace(stats(), cpu_pct=150.0, run_delay_pct=120.0, vcpus=2)
    sink.update_stats([busy])
    v = values(sink)
    assert v[("zonewatch_zone_cpu_utilization_ratio", None)] == 0.75
    assert v[("zonewatch_zone_sched_wait_ratio", None)] == 0.6
    hog = dataclasses.replace(busy, ts_ns=2, cpu_pct=201.0, run_delay_pct=300.0, vcpus=0)
    sink.update_stats([hog])  # an interval measured short; no vCPU thread known
    v = values(sink)
    assert v[("zonewatch_zone_cpu_utilization_ratio", None)] == 1.0
    assert v[("zonewatch_zone_sched_wait_ratio", None)] == 0.0
    ratios = [s.value for s in scrape(sink) if s.name.endswith("_ratio")]
    assert ratios and all(0.0 <= r <= 1.0 for r in ratios)


def test_an_unnamed_zone_gets_a_stable_label_without_its_pid() -> None:
    """The inventory names a zone its VMM did not name `<vmm>-<pid>`: its label is the
    VMM and a hash of the zone's id instead, the same at every scrape."""
    unnamed = ZoneRef("firecracker-48213-99812", "firecracker-48213", "acme", "firecracker")
    label = zone_label(unnamed)
    assert label.startswith("firecracker-unnamed-") and "48213" not in label
    assert zone_label(unnamed) == label
    other = ZoneRef("firecracker-48214-99900", "firecracker-48214", "acme", "firecracker")
    assert zone_label(other) != label
    assert zone_label(ZONE) == "zone-a"  # a named zone keeps its name
    sink = PrometheusSink(None)
    sink.update_stats([dataclasses.replace(stats(), zone=unnamed)])
    sink.export([Alert(1, unnamed, "r", Severity.HIGH, "s")])
    labels = {s.labels["zone"] for s in scrape(sink) if "zone" in s.labels}
    assert labels == {label}


def test_the_agents_own_cpu_and_memory() -> None:
    names = {s.name for s in scrape(PrometheusSink(None))}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= names


def test_alerts_are_a_counter_by_severity() -> None:
    sink = PrometheusSink(None)
    alert = Alert(1, ZONE, "r", Severity.HIGH, "s")
    sink.export([alert, alert])
    samples = [s for s in scrape(sink) if s.name == "zonewatch_alerts_total"]
    assert [(s.labels, s.value) for s in samples] == [
        ({"zone": "zone-a", "tenant": "acme", "severity": "high"}, 2.0)
    ]


def test_names_and_labels_follow_the_conventions() -> None:
    sink = PrometheusSink(None)
    sink.update_stats([stats()])
    sink.set_zones([])  # the info series: no zones, still named
    sink.update_stats([stats()])
    sink.export([Alert(1, ZONE, "r", Severity.LOW, "s")])
    samples = scrape(sink)
    assert samples
    for s in samples:
        assert s.name.startswith(("zonewatch_", "process_")), s.name
        assert set(s.labels) <= BOUNDED_LABELS, (s.name, s.labels)
    types = {f.name: f.type for f in text_string_to_metric_families(generate_latest(
        sink.registry).decode())}  # fmt: skip
    for name, _doc, _scale in ZONE_COUNTERS.values():
        assert types[name] == "counter", name
    for name in ("zonewatch_zone_cpu_utilization_ratio", "zonewatch_zone_sched_wait_ratio"):
        assert types[name] == "gauge"
    for s in samples:
        if s.name.startswith("zonewatch_zone") and s.name not in (
            "zonewatch_zone_vcpus",
            "zonewatch_zone_info",
        ):
            assert UNIT_SUFFIX.search(s.name), s.name
        assert not s.name.endswith("_per_second"), s.name


def test_a_gone_zones_series_go_with_it() -> None:
    from zonewatch.model import Vmm, Zone

    def zone(name: str) -> Zone:
        return Zone(id=f"qemu-{name}", key=1, name=name, tenant="acme", vmm=Vmm.QEMU, pid=1,
                    start_time=1)  # fmt: skip

    sink = PrometheusSink(None)
    sink.set_zones([zone("zone-a"), zone("zone-b")])
    for name in ("zone-a", "zone-b"):
        ref = ZoneRef(f"qemu-{name}", name, "acme", "qemu")
        sink.export([Alert(1, ref, "r", Severity.HIGH, "s", (), {}, 1, 1, 1)])
    sink.update_stats(
        [dataclasses.replace(stats(), zone=ZoneRef("qemu-zone-a", "zone-a", "acme", "qemu"))]
    )
    sink.set_zones([zone("zone-b")])  # zone-a stopped
    zones = {s.labels.get("zone") for s in scrape(sink)} - {None}
    assert zones == {"zone-b"}


def test_latency_histograms_add_up_the_snapshots_windows() -> None:
    """Each snapshot carries its interval's samples by log2 bucket; /metrics serves their
    sum as one cumulative histogram per zone, in seconds, with fixed buckets."""
    sink = PrometheusSink(None)
    first = dataclasses.replace(stats(), ts_ns=1, run_delay_hist_ns={"4096": 3, "0": 1})
    second = dataclasses.replace(stats(), ts_ns=2, run_delay_hist_ns={"4096": 2, "65536": 1})
    sink.update_stats([first])
    sink.update_stats([first])  # the same snapshot again adds nothing
    sink.update_stats([second])
    buckets = {
        float(s.labels["le"]): s.value
        for s in scrape(sink)
        if s.name == "zonewatch_zone_sched_run_delay_seconds_bucket"
    }
    assert buckets[1024e-9] == 1  # the 0 ns sample
    assert buckets[4096e-9] == 1  # 4096..8191 ns is not under 4.096 us...
    assert buckets[8192e-9] == 6  # ...but is under 8.192 us
    assert buckets[131072e-9] == 7
    assert buckets[float("inf")] == 7
    assert len(buckets) == 26  # 2^10..2^34 ns and +Inf
    values = list(buckets.values())
    assert values == sorted(values)  # cumulative
    names = {s.name for s in scrape(sink)}
    assert "zonewatch_zone_kvm_exit_latency_seconds_bucket" not in names  # no samples: none
    # The kernel totals the waits it buckets (run_delay_pct: 12.5 % of 1 s, twice): a _sum
    # and a _count; no other histogram has a total, so none has either.
    sums = {s.name: s.value for s in scrape(sink) if s.name.endswith(("_sum", "_count"))}
    assert sums["zonewatch_zone_sched_run_delay_seconds_sum"] == 0.25
    assert sums["zonewatch_zone_sched_run_delay_seconds_count"] == 7
    sink.update_stats([dataclasses.replace(second, ts_ns=3, exit_latency_hist_ns={"4096": 5})])
    names = {s.name for s in scrape(sink)}
    assert "zonewatch_zone_kvm_exit_latency_seconds_bucket" in names
    assert "zonewatch_zone_kvm_exit_latency_seconds_sum" not in names


def test_promtool_finds_no_problem_in_a_populated_exposition() -> None:
    """promtool's lint on every family the sink serves (the live agent's /metrics is
    checked the same way in tests/e2e/test_dashboards.py)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("Debian's prometheus (promtool) is not installed (make setup installs it)")
    sink = PrometheusSink(None)
    unnamed = ZoneRef("qemu-4242-99", "qemu-4242", "globex", "qemu")
    hist = {"4096": 3, "65536": 1}
    hists = {"run_delay_hist_ns": hist, "exit_latency_hist_ns": hist, "vmm_latency_hist_ns": hist}
    sink.update_stats(
        [dataclasses.replace(stats(), **hists), dataclasses.replace(stats(), zone=unnamed)]
    )
    sink.export([Alert(1, ZONE, "r", Severity.LOW, "s"), Lost(1, "ringbuf", 2)])
    sink.health = lambda: AgentHealth(
        events=5, probes=("kvm",), queue_depths={"grpc": 0}, blind=[(ZONE, "net", "netns")]
    )
    sink.observe_rule_latency(0.001)
    exposition = generate_latest(sink.registry)
    lint = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True,
                          timeout=60, check=False)  # fmt: skip
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, b""), lint
    assert b"zonewatch_zone_sched_run_delay_seconds_sum" in exposition


def test_blind_channels_are_a_gauge_by_zone_channel_and_reason() -> None:
    """What `zonewatch zones` shows as blind, one series per (zone, channel, reason); a
    zone seen again drops its series (the gauge is what the agent reports now)."""
    sink = PrometheusSink(None)
    unnamed = ZoneRef("qemu-4242-99", "qemu-4242", "globex", "qemu")
    health = AgentHealth(blind=[(ZONE, "net", "netns"), (unnamed, "sched", "no_vcpu")])
    sink.health = lambda: health
    blind = {
        (s.labels["zone"], s.labels["tenant"], s.labels["channel"], s.labels["reason"]): s.value
        for s in scrape(sink)
        if s.name == "zonewatch_zone_channel_blind"
    }
    assert blind == {
        ("zone-a", "acme", "net", "netns"): 1.0,
        (zone_label(unnamed), "globex", "sched", "no_vcpu"): 1.0,
    }
    health.blind = []
    assert not [s for s in scrape(sink) if s.name == "zonewatch_zone_channel_blind"]
