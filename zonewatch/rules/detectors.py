"""Stateful detectors beside single-event rules, all keyed (by zone, or the rule's `by`):

- sliding windows over event time: count, sum of a field, distinct values of a field;
- first-seen: a value the key has never used (after its learning period);
- baselines: the key's own learned level of a number (ratio or sigmas above it) or of a
  profile (how far a distribution such as exits-by-reason moved from its usual shape).

State is bounded: at most MAX_KEYS keys per detector (the oldest goes first) and
MAX_VALUES remembered values per first-seen key.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Key = tuple[Any, ...]
Getter = Callable[[Any], Any]

MAX_KEYS = 50_000
MAX_VALUES = 10_000
MIN_SAMPLES = 3  # a baseline judges nothing before it has this many samples
EWMA_ALPHA = 0.05  # after the first 1/alpha samples the baseline moves this much per sample
SIGMA_FLOOR = 0.1  # a flat baseline's spread counts as 10% of its mean (plus 1)


def _bounded_slot(states: dict[Key, Any], key: Key, make: Callable[[], Any]) -> Any:
    state = states.get(key)
    if state is None:
        if len(states) >= MAX_KEYS:
            del states[next(iter(states))]  # dicts keep insertion order: the oldest key
        state = states[key] = make()
    return state


# -- sliding windows ---------------------------------------------------------------------


class CountWindow:
    def __init__(self, window_ns: int) -> None:
        self.window_ns = window_ns
        self.states: dict[Key, deque[int]] = {}

    def update(self, key: Key, ts: int, _event: Any) -> float:
        times: deque[int] = _bounded_slot(self.states, key, deque)
        times.append(ts)
        horizon = ts - self.window_ns
        while times[0] <= horizon:
            times.popleft()
        return len(times)

    def prune(self, now_ns: int) -> None:
        horizon = now_ns - self.window_ns
        for key in [k for k, t in self.states.items() if not t or t[-1] <= horizon]:
            del self.states[key]


@dataclass(slots=True)
class _Sum:
    items: deque[tuple[int, float]] = field(default_factory=deque)
    total: float = 0.0


class SumWindow:
    def __init__(self, window_ns: int, getter: Getter) -> None:
        self.window_ns = window_ns
        self.getter = getter
        self.states: dict[Key, _Sum] = {}

    def update(self, key: Key, ts: int, event: Any) -> float:
        state: _Sum = _bounded_slot(self.states, key, _Sum)
        value = self.getter(event) or 0
        state.items.append((ts, value))
        state.total += value
        horizon = ts - self.window_ns
        items = state.items
        while items[0][0] <= horizon:
            state.total -= items.popleft()[1]
        return state.total

    def prune(self, now_ns: int) -> None:
        horizon = now_ns - self.window_ns
        stale = [k for k, s in self.states.items() if not s.items or s.items[-1][0] <= horizon]
        for key in stale:
            del self.states[key]


@dataclass(slots=True)
class _Distinct:
    items: deque[tuple[int, Any]] = field(default_factory=deque)
    counts: dict[Any, int] = field(default_factory=dict)


class DistinctWindow:
    def __init__(self, window_ns: int, getter: Getter) -> None:
        self.window_ns = window_ns
        self.getter = getter
        self.states: dict[Key, _Distinct] = {}

    def update(self, key: Key, ts: int, event: Any) -> float:
        state: _Distinct = _bounded_slot(self.states, key, _Distinct)
        value = self.getter(event)
        counts = state.counts
        state.items.append((ts, value))
        counts[value] = counts.get(value, 0) + 1
        horizon = ts - self.window_ns
        items = state.items
        while items[0][0] <= horizon:
            old = items.popleft()[1]
            left = counts[old] - 1
            if left:
                counts[old] = left
            else:
                del counts[old]
        return len(counts)

    def prune(self, now_ns: int) -> None:
        horizon = now_ns - self.window_ns
        stale = [k for k, s in self.states.items() if not s.items or s.items[-1][0] <= horizon]
        for key in stale:
            del self.states[key]


Window = CountWindow | SumWindow | DistinctWindow


# -- learned terms -----------------------------------------------------------------------

# How a learned term reads its input: from the event, or from a window's value this event.
Inner = Callable[[Any, Mapping[str, Any]], Any]


class FirstSeen:
    """True when the key meets a value it has never met, once its learning period is over."""

    def __init__(self, inner: Inner) -> None:
        self.inner = inner
        self.states: dict[Key, dict[Any, None]] = {}

    def judge(self, key: Key, _ts: int, event: Any, values: Mapping[str, Any],
              learning: bool) -> bool:  # fmt: skip
        value = self.inner(event, values)
        seen: dict[Any, None] = _bounded_slot(self.states, key, dict)
        if value in seen:
            return False
        if len(seen) >= MAX_VALUES:
            del seen[next(iter(seen))]
        seen[value] = None
        return not learning

    def commit(self, key: Key, ts: int, event: Any, values: Mapping[str, Any],
               fired: bool) -> None:  # fmt: skip
        return None


@dataclass(slots=True)
class _Level:
    n: int = 0
    mean: float = 0.0
    var: float = 0.0
    last_sample: int = -(2**62)


class Baseline:
    """The key's usual level of a number: `ratio` = (x + 1) / (mean + 1) (+1 keeps an idle
    zone finite), `sigma` = (x - mean) / spread. A sample that fired is not learned, so an
    attack does not teach the baseline that it is normal. Windowed inputs are sampled once
    per window length, so overlapping windows do not count one burst many times."""

    def __init__(self, inner: Inner, kind: str, sample_ns: int) -> None:
        self.inner = inner
        self.kind = kind
        self.sample_ns = sample_ns
        self.states: dict[Key, _Level] = {}

    def judge(self, key: Key, _ts: int, event: Any, values: Mapping[str, Any],
              learning: bool) -> float | None:  # fmt: skip
        level: _Level = _bounded_slot(self.states, key, _Level)
        if learning or level.n < MIN_SAMPLES:
            return None
        x = float(self.inner(event, values) or 0)
        if self.kind == "ratio":
            return (x + 1.0) / (level.mean + 1.0)
        spread = max(math.sqrt(level.var), SIGMA_FLOOR * abs(level.mean) + 1.0)
        return (x - level.mean) / spread

    def commit(self, key: Key, ts: int, event: Any, values: Mapping[str, Any],
               fired: bool) -> None:  # fmt: skip
        level = self.states.get(key)
        if fired or level is None or ts - level.last_sample < self.sample_ns:
            return
        x = float(self.inner(event, values) or 0)
        level.n += 1
        level.last_sample = ts
        alpha = max(1.0 / level.n, EWMA_ALPHA)  # a plain mean at first, then exponential
        diff = x - level.mean
        level.mean += alpha * diff
        level.var = (1.0 - alpha) * (level.var + alpha * diff * diff)


@dataclass(slots=True)
class _Profile:
    n: int = 0
    shape: dict[str, float] = field(default_factory=dict)


def _normalised(profile: Mapping[str, float]) -> dict[str, float] | None:
    total = sum(v for v in profile.values() if v > 0)
    if total <= 0:
        return None
    return {k: v / total for k, v in profile.items() if v > 0}


class ProfileShift:
    """How far a distribution (exits by reason, ...) moved from the key's usual shape:
    the total variation distance, 0 (same shape) to 1 (nothing in common)."""

    def __init__(self, inner: Inner) -> None:
        self.inner = inner
        self.states: dict[Key, _Profile] = {}

    def judge(self, key: Key, _ts: int, event: Any, values: Mapping[str, Any],
              learning: bool) -> float | None:  # fmt: skip
        state: _Profile = _bounded_slot(self.states, key, _Profile)
        now = _normalised(self.inner(event, values) or {})
        if learning or state.n < MIN_SAMPLES or now is None:
            return None
        usual = state.shape
        keys = usual.keys() | now.keys()
        return 0.5 * sum(abs(now.get(k, 0.0) - usual.get(k, 0.0)) for k in keys)

    def commit(self, key: Key, ts: int, event: Any, values: Mapping[str, Any],
               fired: bool) -> None:  # fmt: skip
        state = self.states.get(key)
        now = _normalised(self.inner(event, values) or {})
        if fired or state is None or now is None:
            return
        state.n += 1
        alpha = max(1.0 / state.n, EWMA_ALPHA)
        shape = state.shape
        for k in shape.keys() | now.keys():
            shape[k] = shape.get(k, 0.0) + alpha * (now.get(k, 0.0) - shape.get(k, 0.0))


Learned = FirstSeen | Baseline | ProfileShift
