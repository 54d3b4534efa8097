"""Per-zone windows into stats snapshots: rates, percentiles and the latency histograms."""

from __future__ import annotations

import orjson
import pytest

from zonewatch.aggregate import fill_kvm, fill_sched
from zonewatch.model import ZoneRef, ZoneStats, zone_stats_from_json
from zonewatch.probes.hist import Log2Hist
from zonewatch.probes.kvm_stats import UserspaceExitKey, ZoneKvm
from zonewatch.probes.sched import ZoneSched

pytestmark = pytest.mark.unit
REF = ZoneRef("z1", "web", "acme", "qemu")


def test_latency_histograms_and_percentiles_reach_the_stats_line() -> None:
    kvm = ZoneKvm(
        userspace_exits={UserspaceExitKey(2): 4},
        userspace_latency=Log2Hist.of_values([900, 1000, 3000, 70_000]),
    )
    sched = ZoneSched(run_delay=Log2Hist.of_values([5000] * 99 + [2_000_000]))
    stats = ZoneStats(1_700_000_000_000_000_000, REF, 2.0)
    fill_kvm(stats, kvm, 2.0)
    fill_sched(stats, sched, 2.0)

    assert stats.userspace_exits_per_s == 2.0
    assert stats.vmm_latency_hist_ns == {"512": 2, "2048": 1, "65536": 1}
    assert 65.536 <= stats.vmm_latency_p99_us < 131.072  # in the top bucket
    assert 0.512 <= stats.vmm_latency_p50_us < 4.096
    assert stats.exit_latency_hist_ns == {}  # kvm_exit never fired
    assert stats.run_delay_hist_ns == {"4096": 99, "1048576": 1}
    assert 4.096 <= stats.run_delay_p50_us < 8.192

    line = orjson.loads(orjson.dumps(stats.to_json()))
    assert line["kvm"]["vmm_latency_hist_ns"] == {"512": 2, "2048": 1, "65536": 1}
    assert line["sched"]["run_delay_hist_ns"] == {"4096": 99, "1048576": 1}
    back = zone_stats_from_json(line)
    assert back.vmm_latency_hist_ns == stats.vmm_latency_hist_ns
    assert back.run_delay_hist_ns == stats.run_delay_hist_ns
    assert back.vmm_latency_p99_us == round(stats.vmm_latency_p99_us, 3)
