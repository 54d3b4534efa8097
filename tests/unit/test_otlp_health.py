"""OTLP health: one log line when the collector goes and one when it is back, however the
three signals' concurrent exports interleave."""

from __future__ import annotations

import logging
import time

import pytest

from zonewatch.exporters.otlp import OtlpHealth

pytestmark = pytest.mark.unit
ENDPOINT = "http://127.0.0.1:4318"


def test_an_outage_and_a_return_cost_one_line_each(caplog: pytest.LogCaptureFixture) -> None:
    health = OtlpHealth()
    with caplog.at_level(logging.WARNING, logger="zonewatch.exporters.otlp"):
        health.result("logs", False, 5, ENDPOINT, time.monotonic())
        health.result("traces", False, 5, ENDPOINT, time.monotonic())
        health.result("logs", True, 3, ENDPOINT, time.monotonic())
        health.result("metrics", True, 2, ENDPOINT, time.monotonic())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "unreachable" in messages[0]
    assert "resumed (10 records dropped so far)" in messages[1]
    assert health.failed == {"logs": 5, "traces": 5}
    assert health.exported == {"logs": 3, "metrics": 2}


def test_an_export_under_way_when_the_collector_left_says_nothing_of_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = OtlpHealth()
    down: list[bool] = []
    with caplog.at_level(logging.WARNING, logger="zonewatch.exporters.otlp"):
        before_outage = time.monotonic()
        health.result("logs", False, 1, ENDPOINT, time.monotonic())
        health.result("metrics", True, 4, ENDPOINT, before_outage)  # sent before it left
        down.append(health.down)
        before_return = time.monotonic()
        health.result("logs", True, 1, ENDPOINT, time.monotonic())
        health.result("traces", False, 1, ENDPOINT, before_return)  # timed out meanwhile
        down.append(health.down)
    assert down == [True, False]
    messages = [r.getMessage() for r in caplog.records]
    assert [("unreachable" in m, "resumed" in m) for m in messages] == [
        (True, False),
        (False, True),
    ], messages
    assert health.exported == {"metrics": 4, "logs": 1}  # every result is still counted
    assert health.failed == {"logs": 1, "traces": 1}
