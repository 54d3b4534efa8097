"""Log2 histograms as the BPF programs keep them, and percentiles read from them.

Slot 0 holds the value 0; slot s >= 1 holds [2^(s-1), 2^s). The kernel side computes the
slot with bcc's bpf_log2l (floor(log2(v)) + 1 for v > 0), which is int.bit_length(), and
caps it at the last of ZW_HIST_SLOTS slots, which also holds everything larger.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

MAX_SLOT = 47  # ZW_HIST_SLOTS - 1 in bpf/zonewatch.h: 2^46 ns, about 20 hours


def log2_slot(value: int) -> int:
    """The slot a value falls in; the same function as log2_slot() in bpf/*.c."""
    if value < 0:
        raise ValueError(f"negative value {value}")
    return min(value.bit_length(), MAX_SLOT)


def slot_bounds(slot: int) -> tuple[int, int]:
    """The half-open range [low, high) of values that fall in `slot`."""
    if slot == 0:
        return 0, 1
    return 1 << (slot - 1), 1 << slot


@dataclass(slots=True)
class Log2Hist:
    """Counts by log2 slot. Cumulative as read from the kernel; `since()` makes a window."""

    buckets: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of_values(cls, values: Iterable[int]) -> Log2Hist:
        hist = cls()
        for value in values:
            hist.record(value)
        return hist

    def add(self, slot: int, count: int = 1) -> None:
        if count:
            self.buckets[slot] = self.buckets.get(slot, 0) + count

    def record(self, value: int) -> None:
        self.add(log2_slot(value))

    @property
    def count(self) -> int:
        return sum(self.buckets.values())

    def merge(self, other: Log2Hist) -> None:
        for slot, count in other.buckets.items():
            self.add(slot, count)

    def since(self, earlier: Log2Hist) -> Log2Hist:
        """What was added after `earlier` (a previous read of the same cumulative counts).

        A slot that went down (counters reset: the zone's entries were purged) counts from
        zero rather than going negative.
        """
        out = Log2Hist()
        for slot, count in self.buckets.items():
            before = earlier.buckets.get(slot, 0)
            out.add(slot, count - before if count >= before else count)
        return out

    def percentile(self, q: float) -> float | None:
        """The value below which a fraction `q` (0..1) of the samples fall; None if empty.

        Samples are taken as spread evenly over their slot, so the answer interpolates
        linearly inside the slot that holds the rank (as Prometheus' histogram_quantile
        does inside a bucket). Its error is bounded by that slot's width: a factor of two.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within 0..1, got {q}")
        total = self.count
        if total == 0:
            return None
        rank = q * total
        below = 0
        for slot in sorted(self.buckets):
            count = self.buckets[slot]
            if count and below + count >= rank:
                low, high = slot_bounds(slot)
                return low + (high - low) * (rank - below) / count
            below += count
        # Unreachable with non-negative counts (rank <= total); kept for float rounding.
        low, high = slot_bounds(max(self.buckets))
        return float(high)

    def p50(self) -> float | None:
        return self.percentile(0.50)

    def p99(self) -> float | None:
        return self.percentile(0.99)

    def by_lower_bound(self) -> dict[str, int]:
        """Counts keyed by each slot's lower bound ("1024" holds 1024..2047), as JSON and
        the stats snapshots carry them."""
        return {str(slot_bounds(s)[0]): n for s, n in sorted(self.buckets.items()) if n}

    def to_json(self) -> dict[str, object]:
        """Counts by slot's lower bound, plus the usual percentiles."""
        return {
            "count": self.count,
            "p50": self.p50(),
            "p99": self.p99(),
            "buckets": self.by_lower_bound(),
        }


def hist_from_slots(slots: Mapping[int, int]) -> Log2Hist:
    """A histogram from slot -> count (as read from a kernel map)."""
    hist = Log2Hist()
    for slot, count in slots.items():
        hist.add(slot, count)
    return hist
