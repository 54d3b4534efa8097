"""The rule engine: events in, model.Alert out.

    engine = RuleEngine.load(["rules/"], RuleContext(zone_addresses=inventory_addresses))
    alerts = engine.process(events)          # FileEvent, NetEvent, ProcEvent, KvmEvent, ...
    alerts += engine.process_stats(stats)    # model.ZoneStats, each interval
    alerts += engine.tick(now_ns)            # closes de-duplication windows
    engine.note_lost(source, count, now_ns)  # so alerts carry lost_in_window

An event meets only the rules that can match it: rules are indexed by (channel, op), and
each index entry holds the rule's closure for that channel. Hot reload: RuleSet.

Nothing a rule does at evaluation leaves the engine: an event lacking a field a rule reads
counts as an evaluation error of that rule (no match); a rule that fails any other way is
disabled until the next reload, and says so in a `zonewatch.rule_disabled` alert.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zonewatch.errors import ConfigError
from zonewatch.model import Alert, Severity, ZoneRef, ZoneStats
from zonewatch.rules.compiler import CompiledRule, Plan, Pred, Problem
from zonewatch.rules.dedup import Dedup, LossLedger
from zonewatch.rules.fields import Lookups
from zonewatch.rules.loader import Loaded, load, rule_files

log = logging.getLogger(__name__)

PRUNE_EVERY_NS = 10 * 10**9
_NO_VALUES: dict[str, Any] = {}
# Alerts about the agent itself. A rule that failed names the zone whose event it failed
# on; a rules file refused names the agent's host (tenant "": only tokens for all see it).
RULE_DISABLED = "zonewatch.rule_disabled"
RULES_REJECTED = "zonewatch.rules_rejected"
AGENT_TAGS = ("agent", "rules")
DETAIL_LIMIT = 300  # characters of an error kept in an alert's evidence
# Errors of an event, not of the rule: a field the event lacks or holds as another type.
DATA_ERRORS = (AttributeError, TypeError, ValueError, KeyError)


def host_zone() -> ZoneRef:
    return ZoneRef("host", socket.gethostname(), "", "")


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
    eval_errors: int = 0  # rule evaluations that raised: a field missing, or the rule failed
    rules_disabled: int = 0  # rules that failed on their own and were switched off


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
    _agent_alerts: list[Alert] = field(default_factory=list)  # handed out by the next tick

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
            and not rule.disabled
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
                except DATA_ERRORS:
                    rule.errors += 1
                    self.counters.eval_errors += 1
                except Exception as exc:  # any failure of the rule itself
                    self._disable(rule, e, exc, out)
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
                except DATA_ERRORS:
                    rule.errors += 1
                    self.counters.eval_errors += 1
                except Exception as exc:  # any failure of the rule itself
                    self._disable(rule, s, exc, out)
        return out

    def _disable(self, rule: CompiledRule, e: Any, exc: Exception, out: list[Alert]) -> None:
        """Switch off a rule that failed on its own, and raise an alert saying so."""
        if rule.disabled:  # already off: a later entry of the same batch
            return
        rule.disabled = True
        rule.errors += 1
        self.counters.eval_errors += 1
        self.counters.rules_disabled += 1
        self._index.clear()  # rebuilt without it
        error = f"{type(exc).__name__}: {exc}"[:DETAIL_LIMIT]
        log.error("rule %r (%s) disabled until the rules reload: %s", rule.name, rule.where, error)
        out.append(
            Alert(
                ts_ns=e.ts_ns,
                zone=e.zone,
                rule=RULE_DISABLED,
                severity=Severity.HIGH,
                summary=f"rule {rule.name!r} failed and is disabled until the rules reload",
                tags=AGENT_TAGS,
                evidence={"rule.name": rule.name, "rule.where": rule.where, "error": error},
            )
        )
        self.counters.alerts += 1

    def agent_alert(self, alert: Alert) -> None:
        """An alert about the agent's rules, handed out by the next tick()."""
        self._agent_alerts.append(alert)

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
        if self._agent_alerts:
            out += self._agent_alerts
            self._agent_alerts = []
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
        the loss ledger, the counters, and the learned state of every rule whose meaning
        did not change.
        Returns how many rules kept their state."""
        self.losses = old.losses
        self.dedup = old.dedup
        self.counters = old.counters  # counted over the agent's life, not one rule set's
        self._agent_alerts = old._agent_alerts + self._agent_alerts
        previous = {r.name: r for r in old.rules}
        kept = 0
        for rule in self.rules:
            before = previous.get(rule.name)
            if before is not None and before.fingerprint == rule.fingerprint:
                rule.stateful = before.stateful
                kept += 1
        return kept


class RuleSet:
    """The running rules, reloaded when a rules file changes or on request (SIGHUP).

    A reload compiles in a thread of its own, into a new engine the running one never sees,
    so the agent loop keeps draining events meanwhile; only an engine that compiled
    completely is swapped in (taking over the state of unchanged rules). A bad edit keeps
    the running rules: `last_error`, the log and a `zonewatch.rules_rejected` alert say why.

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
        self._compiling: threading.Thread | None = None
        self._compiled: RuleEngine | Exception | None = None

    def _files_stamp(self) -> tuple[tuple[str, int, int], ...]:
        stamp = []
        try:
            files = rule_files(self.paths)
        except OSError as exc:  # a directory that went away or can't be listed
            return ((f"{exc.filename}: {exc.strerror}", -1, -1),)
        for f in files:
            try:
                st = f.stat()
                stamp.append((str(f), st.st_mtime_ns, st.st_size))
            except OSError:
                stamp.append((str(f), -1, -1))
        return tuple(stamp)

    def request_reload(self) -> None:
        self._requested = True

    def maybe_reload(self) -> bool:
        """Start a reload if asked to or if a rules file changed; swap in a finished one.
        True when new rules run from now on."""
        if self._compiling is not None:
            if self._compiling.is_alive():
                return False
            return self._finish()
        now = time.monotonic()
        if not self._requested and now < self._next_check:
            return False
        self._next_check = now + self.check_interval
        stamp = self._files_stamp()
        if not self._requested and stamp == self._stamp:
            return False
        self._requested = False
        self._stamp = stamp
        self._compiling = threading.Thread(
            target=self._compile, name="zonewatch-rules-reload", daemon=True
        )
        self._compiling.start()
        return False

    def join(self, timeout: float | None = None) -> None:
        """Wait for a reload under way to finish compiling (the next maybe_reload swaps)."""
        if self._compiling is not None:
            self._compiling.join(timeout)

    def _compile(self) -> None:
        try:
            self._compiled = RuleEngine.load(self.paths, self.context)
        except Exception as exc:  # RulesError; anything else is a bug, never the agent's end
            self._compiled = exc

    def _finish(self) -> bool:
        compiled, self._compiled, self._compiling = self._compiled, None, None
        if isinstance(compiled, RulesError):
            self._rejected(str(compiled), len(compiled.problems))
            return False
        if not isinstance(compiled, RuleEngine):
            log.error("rules reload failed", exc_info=compiled)
            self._rejected(f"internal error: {type(compiled).__name__}: {compiled}", 1)
            return False
        kept = compiled.adopt(self.engine)
        self.engine = compiled
        self.last_error = None
        self.reloads += 1
        log.info("rules reloaded: %d rule(s), %d kept their state", len(compiled.rules), kept)
        return True

    def _rejected(self, error: str, problems: int) -> None:
        """A reload that did not pass: the running rules stay, and an alert says why."""
        self.last_error = error
        log.error("rules not reloaded, the running rules stay: %s", error)
        self.engine.agent_alert(
            Alert(
                ts_ns=time.time_ns(),
                zone=host_zone(),
                rule=RULES_REJECTED,
                severity=Severity.MEDIUM,
                summary=f"rules not reloaded ({problems} problem(s)); the running rules stay",
                tags=AGENT_TAGS,
                evidence={"problems": problems, "error": error[:DETAIL_LIMIT]},
            )
        )
