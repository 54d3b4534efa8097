"""zonewatch/probes/base.py: how a zone that leaves is purged from the probes' maps."""

from __future__ import annotations

import pytest

from zonewatch.probes.base import LeavingZones

pytestmark = pytest.mark.unit


def test_a_zone_is_reported_once_then_its_leftovers_are_deleted_unreported() -> None:
    leaving = LeavingZones()
    leaving.follow({1, 2, 3}, {1, 2})  # 3 left
    assert leaving.next_collect() == ({3}, set())  # report 3 once more, delete it
    leaving.follow({1, 2}, {1})  # 2 left
    assert leaving.next_collect() == ({2}, {3})  # 3's leftovers: deleted, not reported
    assert leaving.next_collect() == (set(), {2})
    assert leaving.next_collect() == (set(), set())


def test_a_zone_that_returns_is_live_at_once() -> None:
    leaving = LeavingZones()
    leaving.follow({1, 2}, {1})
    leaving.follow({1}, {1, 2})  # back before any collect
    assert leaving.next_collect() == (set(), set())
    leaving.follow({1, 2}, {1})
    assert leaving.next_collect() == ({2}, set())
    leaving.follow({1}, {1, 2})  # back between the two collects: its entries are its own
    assert leaving.next_collect() == (set(), set())
