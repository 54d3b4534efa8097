"""Log2 histograms: the slot function the BPF side shares, percentiles, windows."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zonewatch.probes.hist import MAX_SLOT, Log2Hist, log2_slot, slot_bounds
from zonewatch.probes.records import ZW_HIST_SLOTS


def bpf_log2l(v: int) -> int:
    """bcc's helpers.h bpf_log2l(), transcribed (bpf_log2 on each 32-bit half, + 1)."""

    def bpf_log2(v: int) -> int:
        r = int(v > 0xFFFF) << 4
        v >>= r
        shift = int(v > 0xFF) << 3
        v >>= shift
        r |= shift
        shift = int(v > 0xF) << 2
        v >>= shift
        r |= shift
        shift = int(v > 0x3) << 1
        v >>= shift
        r |= shift
        r |= v >> 1
        return r

    hi = v >> 32
    return bpf_log2(hi) + 32 + 1 if hi else bpf_log2(v) + 1


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_slot_is_what_bpf_computes(v: int) -> None:
    # bpf/*.c: log2_slot(v) = min(v ? bpf_log2l(v) : 0, ZW_HIST_SLOTS - 1)
    assert log2_slot(v) == min(bpf_log2l(v) if v else 0, MAX_SLOT)


@given(st.integers(min_value=0, max_value=2 ** (MAX_SLOT - 1) - 1))
def test_value_lies_within_its_slot(v: int) -> None:
    low, high = slot_bounds(log2_slot(v))
    assert low <= v < high


def test_the_last_slot_holds_everything_larger() -> None:
    assert log2_slot(2 ** (MAX_SLOT - 1)) == MAX_SLOT
    assert log2_slot(2**63) == MAX_SLOT
    assert MAX_SLOT + 1 == ZW_HIST_SLOTS


def test_slot_edges() -> None:
    assert [log2_slot(v) for v in (0, 1, 2, 3, 4, 7, 8, 1023, 1024)] == [
        0,
        1,
        2,
        2,
        3,
        3,
        4,
        10,
        11,
    ]
    assert slot_bounds(0) == (0, 1)
    assert slot_bounds(1) == (1, 2)
    assert slot_bounds(11) == (1024, 2048)
    with pytest.raises(ValueError):
        log2_slot(-1)


def test_empty_histogram_has_no_percentiles() -> None:
    h = Log2Hist()
    assert h.count == 0
    assert h.p50() is None
    assert h.p99() is None


def test_percentile_interpolates_inside_the_slot() -> None:
    # 100 samples all in [1024, 2048): the rank q*100 sits q of the way through the slot.
    h = Log2Hist({11: 100})
    assert h.p50() == pytest.approx(1024 + 0.5 * 1024)
    assert h.p99() == pytest.approx(1024 + 0.99 * 1024)
    assert h.percentile(0.0) == 1024
    assert h.percentile(1.0) == 2048


def test_percentile_walks_the_slots_in_order() -> None:
    # 90 fast samples in [1, 2) us-ish slot 10, 10 slow in slot 20: p50 is fast, p99 slow.
    h = Log2Hist({20: 10, 10: 90})
    p50 = h.p50()
    p99 = h.p99()
    assert p50 is not None and p99 is not None
    assert 512 <= p50 < 1024
    assert 2**19 <= p99 < 2**20
    # p99: rank 99, 90 below, 9 of the 10 slow ones: 9/10 through [2^19, 2^20).
    assert p99 == pytest.approx(2**19 + 0.9 * 2**19)
    # p90 is exactly the top of the fast slot.
    assert h.percentile(0.90) == pytest.approx(1024)


def test_percentile_of_zero_values() -> None:
    h = Log2Hist.of_values([0, 0, 0, 0])
    assert h.buckets == {0: 4}
    assert h.p50() == pytest.approx(0.5)


def test_percentile_rejects_out_of_range_quantiles() -> None:
    with pytest.raises(ValueError):
        Log2Hist({1: 1}).percentile(1.5)
    with pytest.raises(ValueError):
        Log2Hist({1: 1}).percentile(-0.1)


@given(st.lists(st.integers(min_value=1, max_value=10**9), min_size=1, max_size=200))
def test_percentile_is_within_a_factor_of_two_of_the_exact_one(values: list[int]) -> None:
    """The price of log2 buckets: never more than one slot's width off."""
    h = Log2Hist.of_values(values)
    for q in (0.5, 0.9, 0.99):
        exact = sorted(values)[max(0, math.ceil(q * len(values)) - 1)]
        est = h.percentile(q)
        assert est is not None
        assert exact / 2 <= est <= exact * 2


@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=100))
def test_percentiles_are_monotonic(values: list[int]) -> None:
    h = Log2Hist.of_values(values)
    qs = [h.percentile(q / 20) for q in range(21)]
    if not values:
        assert all(v is None for v in qs)
        return
    nums = [v for v in qs if v is not None]
    assert nums == sorted(nums)


def test_since_is_the_window_and_survives_a_reset() -> None:
    earlier = Log2Hist({3: 5, 4: 1})
    now = Log2Hist({3: 8, 4: 1, 6: 2})
    assert now.since(earlier).buckets == {3: 3, 6: 2}
    # A slot that went down was purged and counts from zero.
    assert Log2Hist({3: 2}).since(earlier).buckets == {3: 2}


def test_merge_and_json() -> None:
    h = Log2Hist({1: 1})
    h.merge(Log2Hist({1: 2, 5: 1}))
    assert h.buckets == {1: 3, 5: 1}
    doc = h.to_json()
    assert doc["count"] == 4
    assert doc["buckets"] == {"1": 3, "16": 1}
