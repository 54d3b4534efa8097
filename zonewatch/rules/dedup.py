"""De-duplication and loss accounting.

The first match of a rule and key alerts at once (count 1). Repeats of that rule and key
within its `dedup` window fold into ONE more alert, emitted when the window closes
(`tick`), with how many repeats it stands for and the first and last time. So every
match is counted in exactly one alert: nothing is dropped silently, and the sum of the
counts is the number of matches.

Each alert also says how many events the probes reported lost while its window was open
(`lost_in_window`): an alert, or the quiet after it, is only as complete as that says.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from zonewatch.model import Alert

LOSS_MEMORY_NS = 3600 * 10**9  # how far back losses are remembered


class LossLedger:
    def __init__(self) -> None:
        self._entries: deque[tuple[int, str, int]] = deque()
        self.total = 0

    def note(self, source: str, count: int, ts_ns: int) -> None:
        if count > 0:
            self._entries.append((ts_ns, source, count))
            self.total += count

    def between(self, start_ns: int, end_ns: int) -> int:
        return sum(n for ts, _, n in self._entries if start_ns <= ts <= end_ns)

    def prune(self, now_ns: int) -> None:
        horizon = now_ns - LOSS_MEMORY_NS
        while self._entries and self._entries[0][0] < horizon:
            self._entries.popleft()


@dataclass(slots=True)
class _Window:
    ends_ns: int
    span_ns: int  # how far before its first event the rule looked (its longest window)
    repeats: Alert | None = None  # the folded repeats so far


class Dedup:
    def __init__(self, losses: LossLedger) -> None:
        self.losses = losses
        self._open: dict[Hashable, _Window] = {}
        self._ends: list[tuple[int, int, Hashable]] = []  # heap: when each window ends
        self._serial = 0  # heap tie-breaker: keys need not be comparable
        self.folded = 0  # matches folded into a later alert

    def offer(
        self, key: Hashable, ts_ns: int, dedup_ns: int, span_ns: int, build: Callable[[], Alert]
    ) -> list[Alert]:
        """A match: the alerts to emit now (none when it folds into an open window)."""
        out: list[Alert] = []
        window = self._open.get(key)
        if window is not None:
            if ts_ns < window.ends_ns:
                self.folded += 1
                repeats = window.repeats
                if repeats is None:
                    window.repeats = self._stamp(build(), span_ns)
                else:
                    repeats.count += 1
                    repeats.last_ts_ns = max(repeats.last_ts_ns, ts_ns)
                    repeats.ts_ns = repeats.last_ts_ns
                return out
            out.extend(self._close(key, window, ts_ns))  # expired, not yet ticked
        alert = self._stamp(build(), span_ns)
        out.append(alert)
        if dedup_ns > 0:
            self._open[key] = _Window(ts_ns + dedup_ns, span_ns)
            self._serial += 1
            heapq.heappush(self._ends, (ts_ns + dedup_ns, self._serial, key))
        return out

    def _stamp(self, alert: Alert, span_ns: int) -> Alert:
        alert.first_ts_ns = alert.last_ts_ns = alert.ts_ns
        alert.lost_in_window = self.losses.between(alert.ts_ns - span_ns, alert.ts_ns)
        return alert

    def _close(self, key: Hashable, window: _Window, now_ns: int) -> list[Alert]:
        del self._open[key]
        repeats = window.repeats
        if repeats is None:
            return []
        repeats.summary = f"{repeats.summary} (x{repeats.count} in the dedup window)"
        repeats.lost_in_window = self.losses.between(
            repeats.first_ts_ns - window.span_ns, min(now_ns, window.ends_ns)
        )
        return [repeats]

    def tick(self, now_ns: int) -> list[Alert]:
        """Close every window that has ended by now; their folded repeats become alerts."""
        out: list[Alert] = []
        ends = self._ends
        while ends and ends[0][0] <= now_ns:
            end, _, key = heapq.heappop(ends)
            window = self._open.get(key)
            if window is not None and window.ends_ns == end:  # else: closed and reopened
                out.extend(self._close(key, window, now_ns))
        return out

    def flush(self) -> list[Alert]:
        """Close every window now (shutdown, end of a replay)."""
        out: list[Alert] = []
        for key in list(self._open):
            window = self._open[key]
            out.extend(self._close(key, window, window.ends_ns))
        self._ends.clear()
        return out

    def __len__(self) -> int:
        return len(self._open)
