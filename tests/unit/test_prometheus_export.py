"""exporters/prometheus.py: every per-zone number of a stats snapshot is a series, named by
the OTel-to-Prometheus rules (unit suffixes, `_total` on counters), in base units, with
bounded labels only (the dashboards in dashboards/ query these names)."""

from __future__ import annotations

import dataclasses
import re

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from zonewatch.exporters.prometheus import ZONE_GAUGES, PrometheusSink
from zonewatch.model import Alert, Severity, ZoneRef, ZoneStats

ZONE = ZoneRef("qemu-1-2", "zone-a", "acme", "qemu")
BOUNDED_LABELS = {"zone", "tenant", "vmm", "reason", "severity", "source", "probe", "queue", "le"}
UNIT_SUFFIX = re.compile(r"_(per_second|seconds|ratio|total|bytes|count|sum|bucket|info)$")


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
    assert numeric <= set(ZONE_GAUGES), numeric - set(ZONE_GAUGES)


def test_zone_series_in_base_units() -> None:
    sink = PrometheusSink(None)
    sink.update_stats([stats()])
    values = {
        (s.name, s.labels.get("reason")): s.value
        for s in scrape(sink)
        if s.labels.get("zone") == "zone-a" and s.labels.get("tenant") == "acme"
    }
    assert values[("zonewatch_zone_sched_run_delay_p99_seconds", None)] == 250e-6
    assert values[("zonewatch_zone_sched_wait_ratio", None)] == 0.125
    assert values[("zonewatch_zone_cpu_utilization_ratio", None)] == 1.5
    assert values[("zonewatch_zone_kvm_hypercalls_per_second", None)] == 3.0
    assert values[("zonewatch_zone_kvm_msr_writes_per_second", None)] == 4.0
    assert values[("zonewatch_zone_network_receive_bytes_per_second", None)] == 1000.0
    assert values[("zonewatch_zone_network_transmit_packets_per_second", None)] == 7.0
    assert values[("zonewatch_zone_network_malformed_frames_per_second", None)] == 1.0
    assert values[("zonewatch_zone_file_ops_per_second", None)] == 9.0
    assert values[("zonewatch_zone_kvm_exits_by_reason_per_second", "IO")] == 200.0


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
    for name, _doc, _scale in ZONE_GAUGES.values():
        if name not in ("zonewatch_zone_alerts_open", "zonewatch_zone_vcpus"):  # counts
            assert UNIT_SUFFIX.search(name), name


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
