"""Subscriber queues of the gRPC hub: bounded in alerts, in bytes, and in bytes per token.

The hub's fan-out runs here without a server loop: it is plain code called on the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.alerts import make_alert
from zonewatch.api.auth import Principal
from zonewatch.api.filters import AlertMatcher
from zonewatch.api.server import Hub, QueueLimits, Subscription
from zonewatch.journal import Journal
from zonewatch.model import Alert

ACME = Principal("acme-policy", frozenset({"acme"}))
ADMIN = Principal("siem", None)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal")
    try:
        yield j
    finally:
        j.close()


def numbered(journal: Journal, n: int) -> list[Alert]:
    alerts = [make_alert(i) for i in range(n)]
    journal.append(alerts)
    return alerts


def subscribe(hub: Hub, principal: Principal) -> Subscription:
    sub = Subscription(AlertMatcher(), principal, asyncio.Event())
    hub.subs.add(sub)
    return sub


def test_a_queue_is_bounded_in_bytes(journal: Journal) -> None:
    one = len(Hub(journal, "boot", QueueLimits(10, 10, 10)).response(numbered(journal, 1)[0]))
    hub = Hub(journal, "boot", QueueLimits(alerts=1000, bytes=3 * one + 10, token_bytes=1 << 20))
    sub = subscribe(hub, ADMIN)
    hub._fanout(numbered(journal, 2))
    assert len(sub.pending) == 2 and sub.pending_bytes == hub.token_bytes["siem"] > 2 * one - 10
    hub._fanout(numbered(journal, 2))  # 4 alerts would pass the byte bound (not the count)
    assert sub.overflowed and sub.overflows == 1
    assert not sub.pending and sub.pending_bytes == 0 == hub.token_bytes["siem"]


def test_the_queues_of_one_token_share_a_byte_cap(journal: Journal) -> None:
    one = len(Hub(journal, "boot", QueueLimits(10, 10, 10)).response(numbered(journal, 1)[0]))
    limits = QueueLimits(alerts=1000, bytes=10 * one, token_bytes=int(5.5 * one))
    hub = Hub(journal, "boot", limits)
    first, second = subscribe(hub, ACME), subscribe(hub, ACME)
    other = subscribe(hub, ADMIN)
    hub._fanout(numbered(journal, 3))  # acme's token holds 3 of its 5.5, then overflows
    overflowed = [s for s in (first, second) if s.overflowed]
    assert len(overflowed) == 1  # the one that would have passed the token's cap
    kept = second if overflowed == [first] else first
    assert len(kept.pending) == 3 and hub.token_bytes["acme-policy"] == kept.pending_bytes
    assert not other.overflowed and len(other.pending) == 3  # another token: its own cap
    seq, data = hub.take(kept)
    assert seq == kept.pending[0][0] - 1
    assert hub.token_bytes["acme-policy"] == kept.pending_bytes
    hub.clear(kept)
    assert hub.token_bytes["acme-policy"] == 0
    assert len(data) > 0


def test_the_alert_count_bound_still_holds(journal: Journal) -> None:
    hub = Hub(journal, "boot", QueueLimits(alerts=4, bytes=1 << 20, token_bytes=1 << 20))
    sub = subscribe(hub, ADMIN)
    hub._fanout(numbered(journal, 4))
    assert not sub.overflowed
    hub._fanout(numbered(journal, 1))
    assert sub.overflowed and not sub.pending
