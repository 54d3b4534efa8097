"""The rule engine: events in, model.Alert out.

    engine = RuleEngine.load(["rules/"], RuleContext(zone_addresses=inventory_addresses))
    alerts = engine.process(events)          # FileEvent, NetEvent, ProcEvent, KvmEvent, ...
    alerts += engine.process_stats(stats)    # model.ZoneStats, each interval
    alerts += engine.tick(now_ns)            # closes de-duplication windows
    engine.note_lost(source, count, now_ns)  # so alerts carry lost_in_window

An event meets only the rules that can match it: rules are indexed by (channel, op), and
each index entry holds the rule's closure for that channel. Hot reload: RuleSet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zonewatch.errors import ConfigError
from zonewatch.model import Alert, ZoneRef, ZoneStats
from zonewatch.rules.compiler import CompiledRule, Plan, Pred, Problem
from zonewatch.rules.dedup import Dedup, LossLedger
from zonewatch.rules.fields import Lookups
from zonewatch.rules.loader import Loaded, load, rule_files

log = logging.getLogger(__name__)

PRUNE_EVERY_NS = 10 * 10**9
_NO_VALUES: dict[str, Any] = {}


def _no_addresses() -> Mapping[str, ZoneRef]:
    return {}


@dataclass(slots=True)
class RuleContext:
    """What rules read besides events. `zone_addresses` gives every zone's IP addresses
    -> its zone (the inventory knows them); the engine calls it once per batch, and
    net.dst_tenant, net.dst_zone and net.dst_other_tenant read it."""

    zone_addresses: Callable[[], Mapping[str, ZoneRef]] = _no_addresses


class RulesError(ConfigError):
    """Rules that do not load: every problem, each as file:line:col + message."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        super().__init__(first.where, first.message + more)
        self.problems = list(problems)


@dataclass(slots=True)
class EngineCounters:
    events: int = 0
    matches: int = 0
    alerts: int = 0
    eval_errors: int = 0  # events a rule could not read (a field missing); not matches


Entry = tuple[Pred, CompiledRule, Plan]


@dataclass(slots=True)
class RuleEngine:
    rules: list[CompiledRule]
    context: RuleContext = field(default_factory=RuleContext)
    lookups: Lookups = field(default_factory=Lookups)
    loaded: Loaded | None = None
    losses: LossLedger = field(default_factory=LossLedger)
    dedup: Dedup | None = None
    counters: EngineCounters = field(default_factory=EngineCounters)
    _index: dict[tuple[str, str], tuple[Entry, ...]] = field(default_factory=dict)
    _next_prune: int = 0

    def __post_init__(self) -> None:
        if self.dedup is None:
            self.dedup = Dedup(self.losses)

    @classmethod
    def load(
        cls, paths: Sequence[str | Path] | str | Path, context: RuleContext | None = None
    ) -> RuleEngine:
        """Load and compile rules; raises RulesError (a ConfigError) listing every problem."""
        if isinstance(paths, str | Path):
            paths = [paths]
        lookups = Lookups()
        loaded = load(paths, lookups)
        if loaded.problems:
            raise RulesError(loaded.problems)
        return cls(loaded.rules, context or RuleContext(), lookups, loaded)

    # -- the hot path ---------------------------------------------------------------------

    def _resolve(self, channel: str, op: str) -> tuple[Entry, ...]:
        entries = tuple(
            (plan.pred, rule, plan)
            for rule in self.rules
            if (plan := rule.plans.get(channel)) is not None
            and (rule.ops is None or op in rule.ops)
        )
        self._index[(channel, op)] = entries
        return entries

    def process(self, events: Iterable[Any]) -> list[Alert]:
        """Run a batch of events (anything with channel, op, ts_ns, zone) through the rules."""
        self.lookups.addresses = self.context.zone_addresses()
        out: list[Alert] = []
        index = self._index
        n = 0
        for e in events:
            n += 1
            entries = index.get((e.channel, e.op))
            if entries is None:
                entries = self._resolve(e.channel, e.op)
            for pred, rule, plan in entries:
                try:
                    if pred(e):
                        self._matched(rule, plan, e, out)
                except (AttributeError, TypeError, ValueError, KeyError):
                    rule.errors += 1
                    self.counters.eval_errors += 1
        self.counters.events += n
        return out

    def process_stats(self, stats: Iterable[ZoneStats]) -> list[Alert]:
        """Run per-zone snapshots through the rules of channel `stats`."""
        out: list[Alert] = []
        entries = self._index.get(("stats", "snapshot")) or self._resolve("stats", "snapshot")
        for s in stats:
            self.counters.events += 1
            for pred, rule, plan in entries:
                try:
                    if pred(s):
                        self._matched(rule, plan, s, out)
                except (AttributeError, TypeError, ValueError, KeyError):
                    rule.errors += 1
                    self.counters.eval_errors += 1
        return out

    def _matched(self, rule: CompiledRule, plan: Plan, e: Any, out: list[Alert]) -> None:
        key = plan.key(e)
        ts = e.ts_ns
        values = _NO_VALUES
        if rule.stateful is not None:
            fired = rule.stateful.observe(key, ts, e)
            if fired is None:
                return
            values = fired
        self.counters.matches += 1

        def build() -> Alert:
            return Alert(
                ts_ns=ts,
                zone=e.zone,
                rule=rule.name,
                severity=rule.severity,
                summary=plan.render(e, values),
                tags=rule.tags,
                evidence={**plan.evidence(e), **values},
            )

        assert self.dedup is not None
        emitted = self.dedup.offer((rule.name, key), ts, rule.dedup_ns, rule.window_ns, build)
        self.counters.alerts += len(emitted)
        out.extend(emitted)

    # -- time and loss --------------------------------------------------------------------

    def tick(self, now_ns: int | None = None) -> list[Alert]:
        """Close de-duplication windows that have ended; prune idle window state."""
        now = time.time_ns() if now_ns is None else now_ns
        assert self.dedup is not None
        out = self.dedup.tick(now)
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY_NS
            for rule in self.rules:
                if rule.stateful is not None:
                    rule.stateful.prune(now)
            self.losses.prune(now)
        self.counters.alerts += len(out)
        return out

    def flush(self) -> list[Alert]:
        """Close every de-duplication window now (shutdown, end of a replay)."""
        assert self.dedup is not None
        out = self.dedup.flush()
        self.counters.alerts += len(out)
        return out

    def note_lost(self, source: str, count: int, now_ns: int | None = None) -> None:
        self.losses.note(source, count, time.time_ns() if now_ns is None else now_ns)

    def adopt(self, old: RuleEngine) -> int:
        """Take over a running engine's state (after a reload): open de-duplication windows,
        the loss ledger, and the learned state of every rule whose meaning did not change.
        Returns how many rules kept their state."""
        self.losses = old.losses
        self.dedup = old.dedup
        previous = {r.name: r for r in old.rules}
        kept = 0
        for rule in self.rules:
            before = previous.get(rule.name)
            if before is not None and before.fingerprint == rule.fingerprint:
                rule.stateful = before.stateful
                kept += 1
        return kept


class RuleSet:
    """The running rules, reloaded when a rules file changes or on request (SIGHUP). A bad
    edit keeps the running rules, and `last_error` (and the log) says why.

    The agent loop calls `maybe_reload()` often; it looks at the files at most every
    `check_interval` seconds. `request_reload()` only sets a flag: safe in a signal handler.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        context: RuleContext | None = None,
        check_interval: float = 1.0,
    ) -> None:
        self.paths = list(paths)
        self.context = context or RuleContext()
        self.check_interval = check_interval
        self._stamp = self._files_stamp()
        self.engine = RuleEngine.load(self.paths, self.context)
        self.last_error: str | None = None
        self.reloads = 0
        self._requested = False
        self._next_check = time.monotonic() + check_interval

    def _files_stamp(self) -> tuple[tuple[str, int, int], ...]:
        stamp = []
        for f in rule_files(self.paths):
            try:
                st = f.stat()
                stamp.append((str(f), st.st_mtime_ns, st.st_size))
            except OSError:
                stamp.append((str(f), -1, -1))
        return tuple(stamp)

    def request_reload(self) -> None:
        self._requested = True

    def maybe_reload(self) -> bool:
        """Reload if asked to or if a rules file changed; True when new rules run now."""
        now = time.monotonic()
        if not self._requested and now < self._next_check:
            return False
        self._next_check = now + self.check_interval
        stamp = self._files_stamp()
        if not self._requested and stamp == self._stamp:
            return False
        self._requested = False
        self._stamp = stamp
        try:
            engine = RuleEngine.load(self.paths, self.context)
        except RulesError as exc:
            self.last_error = str(exc)
            log.error("rules not reloaded, the running rules stay: %s", exc)
            return False
        kept = engine.adopt(self.engine)
        self.engine = engine
        self.last_error = None
        self.reloads += 1
        log.info("rules reloaded: %d rule(s), %d kept their state", len(engine.rules), kept)
        return True
