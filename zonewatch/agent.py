"""The agent: inventory, probes, attribution and sinks in one loop.

The loop polls the probes' ring buffers briefly, rescans the inventory every
`scan_interval` (the kernel filter follows within a second), follows the tenants file
(a zone whose tenant changes is updated everywhere, probes keep running), turns the
counting probes' kernel maps into per-zone stats every `stats_interval`, and reports loss
each second.
Probes are attached once and detached on stop; nothing is pinned, so a killed agent leaves
no program attached once its file descriptors close.
"""

from __future__ import annotations

import ctypes
import logging
import select
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from zonewatch import coverage
from zonewatch.aggregate import Aggregator
from zonewatch.audit import audit
from zonewatch.delivery import Delivery
from zonewatch.errors import EnvironmentProblem
from zonewatch.exporters.base import JsonRecord, Sink
from zonewatch.inventory import Inventory, InventoryChange
from zonewatch.inventory.tenants import TenantsFile
from zonewatch.model import Alert, Lost, ZoneRef, ZoneStats
from zonewatch.pipeline import Attribution
from zonewatch.probes.base import Probe
from zonewatch.probes.kvm import KvmProbe
from zonewatch.probes.net import NetProbe
from zonewatch.rules.engine import RuleSet

log = logging.getLogger(__name__)


def release_freed_heap() -> None:
    """Give back the heap bcc's compiler freed: clang and LLVM leave ~50 MB that glibc keeps
    mapped, a third of the agent's resident memory for the rest of its life."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass


@dataclass(slots=True)
class AgentOptions:
    emit_events: bool = False
    emit_stats: bool = True  # `stats` lines to the sinks each stats_interval
    duration: float | None = None
    stats_interval: float = 1.0
    scan_interval: float = 0.5
    # Also the longest a record sent without a wake-up waits (bpf/file.c batches them).
    poll_ms: int = 25
    loss_interval: float = 1.0


@dataclass(slots=True)
class AgentCounters:
    events: int = 0
    lost_reported: dict[str, int] = field(default_factory=dict)


class Agent:
    def __init__(
        self,
        inventory: Inventory,
        probes: Sequence[Probe],
        sinks: Sequence[Sink],
        options: AgentOptions | None = None,
        on_attached: Callable[[], None] | None = None,
        *,
        rules: RuleSet | None = None,
        delivery: Delivery | None = None,
        tenants: TenantsFile | None = None,
    ) -> None:
        self.inventory = inventory
        self.probes = list(probes)
        self.sinks = list(sinks)
        self.options = options or AgentOptions()
        self.attribution = Attribution(inventory.by_key)
        self.counters = AgentCounters()
        self.latest_stats: list[ZoneStats] = []
        self._on_attached = on_attached
        self.delivery = delivery  # alerts: journal first, then gRPC, OTLP and the sinks
        self.rules = rules  # alerts from events, stats and losses; reloads itself
        self.tenants = tenants  # the tenants file, followed; None: the inventory's map stays
        if rules is not None:  # net.dst_zone, net.dst_other_tenant: addresses seen on taps
            rules.context.zone_addresses = self.zone_addresses
        self._aggregator: Aggregator | None = None
        self._findings: set[tuple[str, str, str]] = set()  # audit findings already raised
        # Which channels see each zone (zonewatch.coverage), after each rescan.
        self.coverage: list[coverage.ZoneCoverage] = []
        self._blind_logged: set[tuple[str, str]] = set()  # (channel, reason) said in the log
        # Seconds the rules took over one batch (the /metrics histogram, when served).
        self.on_rule_eval: Callable[[float], None] | None = None

    def run(self, stop: threading.Event) -> None:
        self.inventory.refresh()
        attached: list[Probe] = []
        try:
            for probe in self.probes:
                started = time.monotonic()
                try:
                    probe.attach()
                except EnvironmentProblem as exc:
                    # One channel this host can't provide (`zonewatch doctor` says why)
                    # doesn't take the others down.
                    log.warning("%s probe not attached: %s", probe.name, exc)
                    continue
                attached.append(probe)
                probe.set_zones(list(self.inventory.zones.values()))
                # From here the kernel counts and queues this channel's records.
                log.info("%s probe ready in %.2f s", probe.name, time.monotonic() - started)
            if not attached:
                raise EnvironmentProblem("agent", "no probe could attach on this host")
            self.probes = attached
            release_freed_heap()
            self._aggregator = Aggregator(attached)
            if self.delivery is not None:
                self.delivery.set_zones(list(self.inventory.zones.values()))
            log.info(
                "attached %s; watching %d zone(s)",
                ", ".join(p.name for p in attached),
                len(self.inventory.zones),
            )
            self._audit()
            self._check_coverage()
            if self._on_attached:
                self._on_attached()
            self._loop(stop)
        finally:
            self._report_loss()
            if self.rules is not None:
                self._export(self.rules.engine.flush())  # folded repeats still pending
            for probe in reversed(attached):
                probe.detach()
            for sink in self.sinks:
                sink.shutdown()
            if self.delivery is not None:
                self.delivery.close()

    def _loop(self, stop: threading.Event) -> None:
        # One wait for every probe's ring buffer: a record on any probe wakes the loop.
        ready = select.epoll()
        try:
            for probe in self.probes:
                for fd in probe.ring_fds():
                    ready.register(fd, select.EPOLLIN)
            self._run_until(stop, ready)
        finally:
            ready.close()

    def _run_until(self, stop: threading.Event, ready: select.epoll) -> None:
        opts = self.options
        started = time.monotonic()
        next_scan = started + opts.scan_interval
        next_loss = started + opts.loss_interval
        next_stats = started + opts.stats_interval
        while not stop.is_set():
            now = time.monotonic()
            if opts.duration is not None and now - started >= opts.duration:
                break
            if now >= next_scan:
                self._rescan()
                next_scan = now + opts.scan_interval
            self._follow_tenants()
            ready.poll(opts.poll_ms / 1000)
            self.drain()
            if self.rules is not None:
                self.rules.maybe_reload()
                self._export(self.rules.engine.tick())
            if now >= next_stats:
                self._take_stats()
                next_stats = now + opts.stats_interval
            if now >= next_loss:
                self._report_loss()
                next_loss = now + opts.loss_interval

    def drain(self) -> int:
        """One batch: every probe's waiting records decoded, attributed, counted, run
        through the rules and delivered (never waits). Returns how many events passed."""
        passed = 0
        for probe in self.probes:
            events = self.attribution.process(probe.poll(0))  # drain, never wait
            passed += len(events)
            if self._aggregator:
                self._aggregator.count_events(events)
            if self.options.emit_events:
                self._export(events)
            if self.rules is not None:
                started = time.perf_counter()
                alerts = self.rules.engine.process(events)
                if events and self.on_rule_eval is not None:
                    self.on_rule_eval(time.perf_counter() - started)
                self._export(alerts)
        self.counters.events += passed
        return passed

    def zone_addresses(self) -> Mapping[str, ZoneRef]:
        """Every zone's IP addresses (learned by the net probe) -> its zone."""
        for probe in self.probes:
            if isinstance(probe, NetProbe):
                return probe.zone_addresses()
        return {}

    def _observe_vcpu_threads(self) -> None:
        """Tell the inventory which threads the kvm probe saw run KVM_RUN: vCPUs of zones
        whose VMM leaves its threads unnamed are known only this way."""
        for probe in self.probes:
            if isinstance(probe, KvmProbe):
                self.inventory.observe_vcpu_threads(probe.vcpu_threads())

    def _rescan(self) -> None:
        self._observe_vcpu_threads()
        self._zones_changed(self.inventory.refresh())

    def _follow_tenants(self) -> None:
        """A changed (or, on SIGHUP, re-read) tenants file moves zones between tenants."""
        if self.tenants is None:
            return
        tenants = self.tenants.maybe_reload()
        if tenants is None:
            return
        change = self.inventory.set_tenants(tenants)
        for zone in change.updated:
            log.info("zone %s is now tenant %s", zone.name, zone.tenant)
        self._zones_changed(change)

    def _zones_changed(self, change: InventoryChange) -> None:
        if not change:
            return
        try:
            self._apply(change)
        finally:
            self._check_coverage()

    def _apply(self, change: InventoryChange) -> None:
        zones = list(self.inventory.zones.values())
        for probe in self.probes:
            probe.set_zones(zones)
        if self.delivery is not None:
            self.delivery.set_zones(zones)
        for zone in change.added:
            log.info(
                "zone up: %s (%s, tenant %s, pid %d)", zone.name, zone.vmm, zone.tenant, zone.pid
            )
        for zone in change.removed:
            log.info("zone gone: %s (pid %d)", zone.name, zone.pid)
            for pid in zone.pids:
                self.attribution.files.fds.forget_pid(pid)
        self._audit()

    def _check_coverage(self) -> None:
        """Which channels see each zone now; each cause of a blind spot logged once (when
        the first zone has it, again only after it cleared for every zone), naming a zone;
        `zonewatch zones` and the zonewatch_zone_channel_blind gauge list them all."""
        net_causes: dict[int, dict[str, str]] = {}
        for probe in self.probes:
            if isinstance(probe, NetProbe):
                net_causes = probe.blind_causes()
        self.coverage = coverage.from_probes(
            list(self.inventory.zones.values()), {p.name for p in self.probes}, net_causes
        )
        causes = coverage.blind_keys(self.coverage)
        for channel, reason in sorted(causes - self._blind_logged):
            hit = [
                (c.zone.name, v.detail)
                for c in self.coverage
                for v in c.blind()
                if (v.channel, v.reason) == (channel, reason)
            ]
            log.warning(
                "%s channel blind to %d zone(s) (%s), e.g. %s: %s",
                channel,
                len(hit),
                reason,
                hit[0][0],
                hit[0][1],
            )
        for channel, reason in sorted(self._blind_logged - causes):
            log.info("%s channel: no zone blind by %s any more", channel, reason)
        self._blind_logged = causes

    def _audit(self) -> None:
        """Raise each isolation finding (zonewatch.audit) once per zone, as an alert."""
        findings = audit(list(self.inventory.zones.values()))
        current = {(f.zone.id, f.check, f.summary): f for f in findings}
        now = time.time_ns()
        self._export([f.to_alert(now) for k, f in current.items() if k not in self._findings])
        self._findings = set(current)

    def _take_stats(self) -> None:
        if self._aggregator is None:
            return
        self.latest_stats = self._aggregator.snapshot(list(self.inventory.zones.values()))
        if self.delivery is not None:
            self.delivery.publish_stats(self.latest_stats)
        if self.options.emit_stats:
            self._export(self.latest_stats)
        if self.rules is not None:
            self._export(self.rules.engine.process_stats(self.latest_stats))

    def _report_loss(self) -> None:
        """Emit a `lost` line for every source whose count grew since the last report."""
        lines: list[JsonRecord] = []
        now = time.time_ns()
        for probe in self.probes:
            for source, total in probe.lost().items():
                previous = self.counters.lost_reported.get(source, 0)
                if total > previous:
                    lines.append(Lost(now, source, total - previous))
                    if self.rules is not None:
                        self.rules.engine.note_lost(source, total - previous, now)
                    self.counters.lost_reported[source] = total
        self._export(lines)

    def _export(self, records: Sequence[JsonRecord]) -> None:
        if not records:
            return
        if self.delivery is not None and any(isinstance(r, Alert) for r in records):
            # Alerts are journaled (numbered) before anyone sees them; delivery hands them
            # to the subscribers and to every sink, the agent's JSONL included.
            self.delivery.publish([r for r in records if isinstance(r, Alert)])
            records = [r for r in records if not isinstance(r, Alert)]
        for sink in self.sinks:
            sink.export(records)
