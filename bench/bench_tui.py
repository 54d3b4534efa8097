"""The TUI with 200 zones: time to apply one stats snapshot and render the screen, against
the refresh interval it must fit in.

A synthetic feed hands the app a fresh snapshot of 200 zones (two tenants, rates varying
each time, a few alerts) on every poll. Each refresh is timed from the poll to the end of
the next screen update, in textual's headless pilot (App.run_test) at 80x24: what a
terminal user waits for, minus the terminal's own drawing. The baseline is the default
refresh interval (1 s); ratio = render time / interval, which must stay well under 1.

Environment: ZW_BENCH_TUI_REFRESHES (default 40), ZW_BENCH_TUI_ZONES (default 200).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time

from bench import Metric, metric
from zonewatch.model import Alert, Severity, ZoneRef, ZoneStats
from zonewatch.tui.app import TopApp
from zonewatch.tui.feed import Update

REFRESHES = int(os.environ.get("ZW_BENCH_TUI_REFRESHES", "40"))
ZONES = int(os.environ.get("ZW_BENCH_TUI_ZONES", "200"))
INTERVAL_S = 1.0


class SyntheticFeed:
    """A new snapshot of every zone on each poll (as a busy agent would send)."""

    source = "bench"
    carries_events = False

    def __init__(self, zones: int) -> None:
        self.rng = random.Random(1)  # noqa: S311  (synthetic rates, not secrets)
        self.refs = [
            ZoneRef(f"qemu-{1000 + i}-{i}", f"zone-{i:03d}", "acme" if i % 2 else "globex", "qemu")
            for i in range(zones)
        ]
        self.ts = 1_795_000_000_000_000_000

    def poll(self, timeout: float = 0.0) -> Update:
        self.ts += 1_000_000_000
        rng = self.rng
        snapshot = [
            ZoneStats(
                self.ts,
                ref,
                1.0,
                vcpus=2,
                exits_per_s=rng.uniform(100, 50_000),
                exits_by_reason={"HLT": rng.uniform(0, 9000), "IO": rng.uniform(0, 9000)},
                pio_ports={"0x3f8/out": 10.0},
                mmio_pages={"0xfee00000/write": 40.0},
                run_delay_p99_us=rng.uniform(5, 500),
                rx_bytes_per_s=rng.uniform(0, 1e7),
                tx_bytes_per_s=rng.uniform(0, 1e7),
                new_flows_per_s=rng.uniform(0, 50),
                file_ops_per_s=rng.uniform(0, 300),
            )
            for ref in self.refs
        ]
        alerts = [
            Alert(self.ts, rng.choice(self.refs), "bench rule", Severity.MEDIUM, "summary")
            for _ in range(3)
        ]
        return Update(snapshots=[snapshot], alerts=alerts)

    @property
    def finished(self) -> bool:
        return False

    def close(self) -> None:
        return None


async def _measure(refreshes: int, zones: int) -> list[float]:
    app = TopApp(SyntheticFeed(zones), interval=3600)  # the bench drives the refreshes
    times: list[float] = []
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        for _ in range(refreshes):
            start = time.perf_counter()
            app.tick()
            await pilot.pause()  # until the app has processed the redraw
            times.append(time.perf_counter() - start)
        assert app.state.snapshots == refreshes + 1
        assert len(app.state.zones) == zones
    return times


def run() -> dict[str, Metric]:
    times = asyncio.run(_measure(REFRESHES, ZONES))
    median = statistics.median(times)
    p95 = statistics.quantiles(times, n=20)[18] if len(times) >= 20 else max(times)
    return {
        "tui_refresh_200_zones_median": metric(median, "s", INTERVAL_S),
        "tui_refresh_200_zones_p95": metric(p95, "s", INTERVAL_S),
    }


if __name__ == "__main__":
    print(run())
