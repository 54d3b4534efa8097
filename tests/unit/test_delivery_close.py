"""Stopping the delivery is bounded: a sink whose peer is gone does not hold the agent."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.alerts import make_alert
from zonewatch.delivery import SINK_SHUTDOWN_S, Delivery
from zonewatch.exporters.otlp import OtlpConfig, OtlpSink
from zonewatch.journal import Journal


def dead_endpoint() -> str:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_close_leaves_an_otlp_sink_retrying_a_dead_collector_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = set(threading.enumerate())
    sink = OtlpSink(OtlpConfig(dead_endpoint(), "grpc", timeout_s=5, schedule_delay_ms=50))
    d = Delivery(Journal(tmp_path / "journal"), [sink])
    try:
        d.publish([make_alert(i) for i in range(50)])
        time.sleep(0.3)  # the batch processors' exports are under way (retrying)
        started = time.monotonic()
        d.close()
        took = time.monotonic() - started
        assert took < SINK_SHUTDOWN_S + 1.0, f"close took {took:.1f} s"
        assert "sink otlp: shutdown unfinished" in caplog.text
        again = Journal(tmp_path / "journal")  # the journal closed: its lock is free
        try:
            assert again.last_seq == 50
        finally:
            again.close()
    finally:
        # The exports left behind retry (with random jitter) until their 5 s timeout: wait
        # them out, so no later test shares this process with them.
        for thread in set(threading.enumerate()) - before:
            thread.join(timeout=15)


def test_a_process_with_such_a_sink_exits_in_under_3_seconds(tmp_path: Path) -> None:
    """The SDK's own at-exit shutdown waited out the retries too (20 s before)."""
    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from tests.helpers.alerts import make_alert
from zonewatch.delivery import Delivery
from zonewatch.exporters.otlp import OtlpConfig, OtlpSink
from zonewatch.journal import Journal
sink = OtlpSink(OtlpConfig({dead_endpoint()!r}, "grpc", timeout_s=20, schedule_delay_ms=50))
d = Delivery(Journal({str(tmp_path / "journal")!r}), [sink])
d.publish([make_alert(i) for i in range(50)])
time.sleep(0.3)
print("closing", flush=True)
d.close()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "closing\n"
        started = time.monotonic()
        assert proc.wait(timeout=30) == 0
        took = time.monotonic() - started
        assert took < 3.0, f"exit took {took:.1f} s after close began"
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
