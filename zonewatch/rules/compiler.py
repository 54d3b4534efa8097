"""Compile each rule once into Python closures: no rule text ever reaches eval or exec.

Steps for one rule: expand macros and lists (with cycle checks), fold constants, lift the
top-level `channel`/`op` terms into the engine's index (the index guarantees them, so they
cost nothing at run time), find the channels on which every field the rule names exists,
split the windowed/learned terms off, and build, per channel, a closure over attribute
getters for the rest.

Order matters once, on purpose: plain terms LEFT of the first windowed or learned term
choose the events its detectors see (`x > 1000 and count(10s) >= 3`: three hot ones);
plain terms RIGHT of it are checked afterwards (`baseline_ratio(x) > 20 and x > 1000`:
the baseline learns from every event, the alert needs x > 1000).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from zonewatch.model import Severity
from zonewatch.rules.budget import Budget, walk
from zonewatch.rules.detectors import (
    Baseline,
    CountWindow,
    DistinctWindow,
    FirstSeen,
    Inner,
    Key,
    Learned,
    ProfileShift,
    SumWindow,
    Window,
)
from zonewatch.rules.fields import (
    CHANNELS,
    FIELDS,
    NUMERIC,
    Field,
    FieldType,
    Getter,
    Lookups,
)
from zonewatch.rules.parser import (
    And,
    Call,
    Cmp,
    Const,
    FieldRef,
    Loc,
    MacroRef,
    Node,
    Not,
    Or,
    SyntaxProblem,
    Term,
    Text,
    Value,
    parse_operand,
)

Pred = Callable[[Any], bool]
Problem = SyntaxProblem  # every load or compile error: where (file:line:col) + message

WINDOW_FUNCS = ("count", "sum", "distinct")
LEARNED_FUNCS = ("first_seen", "baseline_ratio", "baseline_sigma", "baseline_shift")
FUNCS = WINDOW_FUNCS + LEARNED_FUNCS
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNITS_NS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9}
_OUTPUT_FIELD = re.compile(r"%(%|\{[^}]*\}|[A-Za-z_][A-Za-z0-9_.]*[A-Za-z0-9_])")

_OPS_BY_TYPE: dict[FieldType, frozenset[str]] = {
    FieldType.STR: frozenset(
        {"=", "!=", "in", "contains", "icontains", "startswith", "endswith", "glob", "exists"}
    ),
    FieldType.IP: frozenset({"=", "!=", "in", "startswith", "cidr", "exists"}),
    FieldType.INT: frozenset({"=", "!=", "<", "<=", ">", ">=", "in", "exists"}),
    FieldType.FLOAT: frozenset({"=", "!=", "<", "<=", ">", ">=", "in", "exists"}),
    FieldType.BOOL: frozenset({"=", "!=", "exists"}),
    FieldType.MAP: frozenset({"exists"}),
}


def parse_duration(text: str) -> int:
    """'500ms', '60s', '5m', '1h', '1d' or plain seconds -> nanoseconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"expected a duration such as 60s, 5m or 1h, got {text!r}")
    return int(float(m.group(1)) * _UNITS_NS[m.group(2) or "s"])


# -- what the loader hands over ----------------------------------------------------------


@dataclass(slots=True)
class ListSpec:
    name: str
    items: list[Value]
    where: str


@dataclass(slots=True)
class MacroSpec:
    name: str
    node: Node
    where: str


@dataclass(slots=True)
class RuleSpec:
    name: str
    where: str
    condition: Node
    output: Text
    severity: Severity
    tags: tuple[str, ...] = ()
    desc: str = ""
    enabled: bool = True
    by: tuple[FieldRef, ...] = ()
    learn_ns: int = 600 * 10**9
    dedup_ns: int = 60 * 10**9


# -- what the engine runs ----------------------------------------------------------------


@dataclass(slots=True)
class Stateful:
    """The windowed and learned terms of one rule, and the checks on their values."""

    windows: tuple[tuple[str, Window], ...]
    learned: tuple[tuple[str, Learned], ...]
    checks: tuple[tuple[str, Callable[[Any], bool]], ...]
    learn_ns: int
    # Plain terms written right of the first windowed or learned term: checked on the
    # event after the detectors saw it, so `baseline_ratio(x) > 20 and x > 1000` learns
    # from every snapshot and still only fires above 1000.
    post: Pred = field(default=lambda _e: True)
    born: dict[Key, int] = field(default_factory=dict)  # when each key was first seen

    def observe(self, key: Key, ts: int, event: Any) -> dict[str, Any] | None:
        """Feed one event that passed the rule's filter; the term values when it fires."""
        values: dict[str, Any] = {}
        for name, window in self.windows:
            values[name] = window.update(key, ts, event)
        born = self.born.get(key)
        if born is None:
            born = self.born[key] = ts
        learning = ts - born < self.learn_ns
        for name, term in self.learned:
            values[name] = term.judge(key, ts, event, values, learning)
        fired = self.post(event)
        for name, check in self.checks if fired else ():
            value = values[name]
            if value is None or not check(value):
                fired = False
                break
        for _, term in self.learned:
            term.commit(key, ts, event, values, fired)
        return values if fired else None

    def prune(self, now_ns: int) -> None:
        for _, window in self.windows:
            window.prune(now_ns)


@dataclass(slots=True)
class Plan:
    """One rule on one channel: the stateless filter and how to key, word and evidence."""

    pred: Pred
    key: Callable[[Any], Key]
    render: Callable[[Any, Mapping[str, Any]], str]
    evidence: Callable[[Any], dict[str, Any]]


@dataclass(slots=True)
class CompiledRule:
    name: str
    where: str
    severity: Severity
    tags: tuple[str, ...]
    desc: str
    ops: frozenset[str] | None  # None: any op of its channels
    plans: dict[str, Plan]  # channel -> plan
    stateful: Stateful | None
    dedup_ns: int
    window_ns: int  # the longest window the rule looks back over (for lost_in_window)
    fingerprint: str
    errors: int = 0  # events whose fields could not be read (a missing field); no match
    disabled: bool = False  # it raised (not a missing field): out of the index until reload


# -- the compiler ------------------------------------------------------------------------


def _and(items: Iterable[Node]) -> Node:
    flat: list[Node] = []
    for item in items:
        if isinstance(item, And):
            flat.extend(item.items)
        elif isinstance(item, Const):
            if not item.value:
                return Const(False)
        else:
            flat.append(item)
    if not flat:
        return Const(True)
    return flat[0] if len(flat) == 1 else And(tuple(flat))


def _or(items: Iterable[Node]) -> Node:
    flat: list[Node] = []
    for item in items:
        if isinstance(item, Or):
            flat.extend(item.items)
        elif isinstance(item, Const):
            if item.value:
                return Const(True)
        else:
            flat.append(item)
    if not flat:
        return Const(False)
    return flat[0] if len(flat) == 1 else Or(tuple(flat))


def _not(item: Node) -> Node:
    if isinstance(item, Const):
        return Const(not item.value)
    if isinstance(item, Not):
        return item.item
    return Not(item)


def _operand_refs(operand: Call | FieldRef | Value) -> Iterable[FieldRef]:
    """Function arguments nest only as deep as the parser allows (parser.MAX_DEPTH)."""
    if isinstance(operand, FieldRef):
        yield operand
    elif isinstance(operand, Call):
        for arg in operand.args:
            yield from _operand_refs(arg)


def _field_refs(node: Node) -> Iterable[FieldRef]:
    for n in walk(node):
        if isinstance(n, Cmp):
            yield from _operand_refs(n.left)
        elif isinstance(n, Term):
            yield from _operand_refs(n.call)


def _is_stateful(node: Node) -> bool:
    return isinstance(node, Term) or (isinstance(node, Cmp) and isinstance(node.left, Call))


def _nested_stateful(node: Node) -> Loc | None:
    for n in walk(node):
        if _is_stateful(n):
            return n.call.loc if isinstance(n, Term) else n.left.loc  # type: ignore[union-attr]
    return None


def canon(node: Node) -> str:
    """A condition as text without positions: equal text, equal meaning (for reloads)."""
    if isinstance(node, Const):
        return "true" if node.value else "false"
    if isinstance(node, And | Or):
        joiner = " and " if isinstance(node, And) else " or "
        parts = []  # a loop, not a generator: one stack frame per level of the condition
        for item in node.items:
            parts.append(canon(item))
        return "(" + joiner.join(parts) + ")"
    if isinstance(node, Not):
        return f"not {canon(node.item)}"
    if isinstance(node, Term):
        return node.call.canon()
    if isinstance(node, Cmp):
        values = ", ".join(repr(v.text) for v in node.values)
        return f"{node.left.canon()} {node.op} ({values})"
    return node.name


def _all_of(preds: tuple[Pred, ...]) -> Pred:
    """One node however many terms: a loop, never one stack frame per term."""
    if len(preds) == 2:
        a, b = preds
        return lambda e: a(e) and b(e)

    def all_of(e: Any) -> bool:
        for p in preds:  # noqa: SIM110 (all() over a generator: slower per event)
            if not p(e):
                return False
        return True

    return all_of


def _any_of(preds: tuple[Pred, ...]) -> Pred:
    if len(preds) == 2:
        a, b = preds
        return lambda e: a(e) or b(e)

    def any_of(e: Any) -> bool:
        for p in preds:  # noqa: SIM110
            if p(e):
                return True
        return False

    return any_of


def _one_of(get: Getter, members: frozenset[Any]) -> Pred:
    """`x = a or x = b or ...` as one lookup; a value that can't be hashed equals none."""

    def one_of(e: Any) -> bool:
        try:
            return get(e) in members
        except TypeError:  # unhashable (a list or map from a recording): == is False
            return False

    return one_of


def _none_of(get: Getter, members: frozenset[Any]) -> Pred:
    """`x != a and x != b and ...` as one lookup."""

    def none_of(e: Any) -> bool:
        try:
            return get(e) not in members
        except TypeError:
            return True

    return none_of


def _simple(node: Node, op: str) -> str | None:
    """The field of `field = value` (op "=") or `field != value` (op "!="), else None."""
    if (
        isinstance(node, Cmp)
        and node.op == op
        and isinstance(node.left, FieldRef)
        and len(node.values) == 1
        and not node.is_list
    ):
        return node.left.name
    return None


def _negate(a: Pred) -> Pred:
    return lambda e: not a(e)


def _constant(value: bool) -> Pred:
    return lambda _e: value


_IP_CACHE: dict[str, tuple[int, int] | None] = {}


def _ip_key(text: Any) -> tuple[int, int] | None:
    """An address as (version, integer), memoised: parsing one costs about a microsecond."""
    key = _IP_CACHE.get(text)
    if key is None and text not in _IP_CACHE:
        try:
            ip = ipaddress.ip_address(text)
            key = (ip.version, int(ip))
        except ValueError:
            key = None
        if len(_IP_CACHE) > 65536:
            _IP_CACHE.clear()
        _IP_CACHE[text] = key
    return key


class Compiler:
    def __init__(
        self, lists: Mapping[str, ListSpec], macros: Mapping[str, MacroSpec], lookups: Lookups
    ) -> None:
        self.lists = lists
        self.macros = macros
        self.lookups = lookups
        self._list_items: dict[str, list[Value]] = {}
        self.budget = Budget(lists, macros)  # before anything is expanded

    # -- expansion ------------------------------------------------------------------------

    def list_items(self, name: str, stack: tuple[str, ...] = ()) -> list[Value]:
        """A list's items with the lists it names spliced in (Falco's nested lists)."""
        if name in self._list_items:
            return self._list_items[name]
        if name in stack:
            raise Problem(self.lists[name].where, f"list cycle: {' -> '.join((*stack, name))}")
        items: list[Value] = []
        for item in self.lists[name].items:
            if not item.quoted and item.text in self.lists:
                items.extend(self.list_items(item.text, (*stack, name)))
            else:
                items.append(item)
        self._list_items[name] = items
        return items

    def expand(self, node: Node, stack: tuple[str, ...] = ()) -> Node:
        if isinstance(node, MacroRef):
            macro = self._known_macro(node)
            if node.name in stack:
                chain = " -> ".join((*stack, node.name))
                raise Problem(node.loc.where(), f"macro cycle: {chain}")
            return self.expand(macro.node, (*stack, node.name))
        if isinstance(node, Cmp) and node.is_list:
            values: list[Value] = []
            for v in node.values:
                if not v.quoted and v.text in self.lists:
                    values.extend(self.list_items(v.text))
                else:
                    values.append(v)
            return Cmp(node.left, node.op, tuple(values), True, node.loc)
        if isinstance(node, And | Or):
            items = []  # a loop, not a generator: one stack frame per level of the condition
            for item in node.items:
                items.append(self.expand(item, stack))
            return _and(items) if isinstance(node, And) else _or(items)
        if isinstance(node, Not):
            return _not(self.expand(node.item, stack))
        return node

    def check_list(self, spec: ListSpec) -> None:
        """A list's own problem (a cycle, over the budget), once, where it is."""
        self.budget.check_list(spec.name)

    def check_macro(self, macro: MacroSpec) -> None:
        """A macro no rule uses is still checked: the budget, then the macros, lists and
        fields it names (those of the macros it names are checked with them)."""
        self.budget.check_macro(macro.name)
        for node in walk(macro.node):
            if isinstance(node, MacroRef):
                self._known_macro(node)
        for ref in _field_refs(macro.node):
            self._field(ref)

    def _known_macro(self, node: MacroRef) -> MacroSpec:
        macro = self.macros.get(node.name)
        if macro is None:
            if node.name in FIELDS:
                raise Problem(node.loc.where(), f"field {node.name!r} needs an operator")
            raise Problem(node.loc.where(), f"unknown macro {node.name!r}")
        return macro

    # -- one rule -------------------------------------------------------------------------

    def compile_rule(self, spec: RuleSpec) -> CompiledRule:
        self.budget.check_rule(spec.name, spec.condition, spec.where)
        node = self.expand(spec.condition)
        conjuncts = list(node.items) if isinstance(node, And) else [node]
        channels: set[str] = set(CHANNELS)
        ops: set[str] | None = None
        rest: list[Node] = []
        stateful: list[Node] = []
        after: list[Node] = []  # plain terms right of the first windowed/learned one
        for c in conjuncts:
            lifted = self._lift(c)
            if lifted is not None:
                name, values = lifted
                if name == "channel":
                    channels &= values
                else:
                    ops = values if ops is None else ops & values
            elif _is_stateful(c):
                stateful.append(c)
            else:
                loc = _nested_stateful(c)
                if loc is not None:
                    raise Problem(
                        loc.where(),
                        "windowed and learned terms may only be top-level 'and' terms",
                    )
                (after if stateful else rest).append(c)

        refs = [*_field_refs(node), *spec.by]
        for ref in refs:
            f = self._field(ref)
            channels &= set(f.sources)
        if not channels:
            names = sorted({r.name for r in refs})
            raise Problem(spec.where, f"no channel has all of the fields: {', '.join(names)}")
        if stateful and len(channels) != 1:
            raise Problem(
                spec.where,
                "a windowed or learned rule needs one channel "
                f"(add `channel = ...`; candidates: {', '.join(sorted(channels))})",
            )

        filter_node = _and(rest)
        by = spec.by or (FieldRef("zone.id", Loc(spec.output, 0)),)
        state: Stateful | None = None
        term_names: set[str] = set()
        window_ns = 0
        if stateful:
            (only,) = channels
            state, window_ns = self._stateful(stateful, only, spec.learn_ns)
            state.post = self.pred(_and(after), only)
            term_names = {name for name, _ in state.windows} | {n for n, _ in state.learned}
        named = {r.name for r in _field_refs(filter_node)} | {r.name for r in spec.by}
        for c in stateful + after:
            named |= {r.name for r in _field_refs(c)}
        evidence_fields = sorted(named - {"channel", "zone.id"})
        plans: dict[str, Plan] = {}
        for ch in sorted(channels):
            plans[ch] = Plan(
                pred=self.pred(filter_node, ch),
                key=self._key(by, ch),
                render=self._render(spec.output, ch, term_names),
                evidence=self._evidence(evidence_fields, ch),
            )
        return CompiledRule(
            name=spec.name,
            where=spec.where,
            severity=spec.severity,
            tags=spec.tags,
            desc=spec.desc,
            ops=None if ops is None else frozenset(ops),
            plans=plans,
            stateful=state,
            dedup_ns=spec.dedup_ns,
            window_ns=window_ns,
            fingerprint=" | ".join(
                (canon(node), *(r.name for r in by), str(spec.learn_ns), str(spec.dedup_ns))
            ),
        )

    def _lift(self, node: Node) -> tuple[str, set[str]] | None:
        """`channel = x`, `op in (a, b)` at the top level: for the index, not for run time."""
        if not (
            isinstance(node, Cmp)
            and isinstance(node.left, FieldRef)
            and node.left.name in ("channel", "op")
            and node.op in ("=", "in")
        ):
            return None
        values = {v.text for v in node.values}
        if node.left.name == "channel":
            for v in node.values:
                if v.text not in CHANNELS:
                    raise Problem(
                        v.loc.where(),
                        f"unknown channel {v.text!r} (expected {'|'.join(CHANNELS)})",
                    )
        return node.left.name, values

    def _field(self, ref: FieldRef) -> Field:
        f = FIELDS.get(ref.name)
        if f is None:
            raise Problem(
                ref.loc.where(), f"unknown field {ref.name!r} (see `zonewatch rules fields`)"
            )
        return f

    # -- stateless closures ---------------------------------------------------------------

    def pred(self, node: Node, ch: str) -> Pred:
        if isinstance(node, Const):
            return _constant(node.value)
        if isinstance(node, And | Or):
            preds = self._terms(node, ch)
            if len(preds) == 1:
                return preds[0]
            return _all_of(preds) if isinstance(node, And) else _any_of(preds)
        if isinstance(node, Not):
            return _negate(self.pred(node.item, ch))
        if isinstance(node, Cmp) and isinstance(node.left, FieldRef):
            f = self._field(node.left)
            return self.compare(node, f, f.getter(ch, self.lookups))
        raise AssertionError(f"not compilable here: {node!r}")  # expand() removed the rest

    def _terms(self, node: And | Or, ch: str) -> tuple[Pred, ...]:
        """The items' predicates in order; a run of `x = a or x = b ...` (`x != a and
        x != b ...` in an and) on one field becomes one set lookup. Runs are of adjacent
        terms only, so every getter is still called in the order written."""
        op = "=" if isinstance(node, Or) else "!="
        preds: list[Pred] = []
        run: list[Cmp] = []

        def close_run() -> None:
            if len(run) == 1:
                preds.append(self.pred(run[0], ch))
            elif run:
                f = self._field(run[0].left)  # type: ignore[arg-type]
                get = f.getter(ch, self.lookups)
                for cmp in run:  # each term's own checks (operator, value) and errors
                    self.compare(cmp, f, get)
                members = frozenset(self._const(c.values[0], f.type) for c in run)
                preds.append(_one_of(get, members) if op == "=" else _none_of(get, members))
            run.clear()

        for item in node.items:
            name = _simple(item, op)
            if name is None or (run and _simple(run[0], op) != name):
                close_run()
            if name is None:
                preds.append(self.pred(item, ch))
            else:
                run.append(item)  # type: ignore[arg-type]
        close_run()
        return tuple(preds)

    def _const(self, v: Value, ftype: FieldType) -> Any:
        text = v.text
        if ftype in NUMERIC:
            try:
                return int(text, 0)
            except ValueError:
                pass
            try:
                return float(text)
            except ValueError:
                raise Problem(v.loc.where(), f"expected a number, got {text!r}") from None
        if ftype is FieldType.BOOL:
            if text.lower() not in ("true", "false"):
                raise Problem(v.loc.where(), f"expected true or false, got {text!r}")
            return text.lower() == "true"
        return text

    def compare(self, cmp: Cmp, f: Field, get: Getter) -> Pred:
        op = cmp.op
        if op not in _OPS_BY_TYPE[f.type]:
            allowed = ", ".join(sorted(_OPS_BY_TYPE[f.type]))
            raise Problem(
                cmp.loc.where(), f"'{op}' does not apply to {f.name} ({f.type}: {allowed})"
            )
        if op == "exists":
            return lambda e: (v := get(e)) is not None and v != ""
        if not cmp.values:
            raise Problem(cmp.loc.where(), f"'{op}' needs at least one value")
        if op == "cidr":
            return self._cidr(cmp, get)
        consts = [self._const(v, f.type) for v in cmp.values]
        if op == "in":
            members = frozenset(consts)
            return lambda e: get(e) in members
        if len(consts) > 1 and op in ("=", "!=", "<", "<=", ">", ">="):
            raise Problem(cmp.loc.where(), f"'{op}' takes one value")
        c = consts[0]
        if op == "=":
            return lambda e: get(e) == c
        if op == "!=":
            return lambda e: get(e) != c
        if op == "<":
            return lambda e: get(e) < c
        if op == "<=":
            return lambda e: get(e) <= c
        if op == ">":
            return lambda e: get(e) > c
        if op == ">=":
            return lambda e: get(e) >= c
        if op in ("startswith", "endswith"):
            affixes = tuple(consts)
            if op == "startswith":
                return lambda e: get(e).startswith(affixes)
            return lambda e: get(e).endswith(affixes)
        if op == "glob":
            pattern = "|".join(f"(?:{fnmatch.translate(x)})" for x in consts)
            match = re.compile(pattern).match
            return lambda e: match(get(e)) is not None
        if op == "contains":
            if len(consts) == 1:
                return lambda e: c in get(e)
            needles = tuple(consts)

            def contains_any(e: Any) -> bool:
                s = get(e)
                return any(n in s for n in needles)

            return contains_any
        # icontains
        lowered = tuple(x.lower() for x in consts)

        def icontains_any(e: Any) -> bool:
            s = get(e).lower()
            return any(n in s for n in lowered)

        return icontains_any

    def _cidr(self, cmp: Cmp, get: Getter) -> Pred:
        ranges: list[tuple[int, int, int]] = []
        for v in cmp.values:
            try:
                net = ipaddress.ip_network(v.text, strict=True)
            except ValueError as exc:
                raise Problem(v.loc.where(), f"bad CIDR {v.text!r}: {exc}") from None
            ranges.append((net.version, int(net.network_address), int(net.broadcast_address)))
        spans = tuple(ranges)

        def within(e: Any) -> bool:
            key = _ip_key(get(e))
            if key is None:
                return False
            version, n = key
            return any(ver == version and lo <= n <= hi for ver, lo, hi in spans)

        return within

    # -- stateful terms -------------------------------------------------------------------

    def _stateful(self, nodes: list[Node], ch: str, learn_ns: int) -> tuple[Stateful, int]:
        windows: dict[str, Window] = {}
        learned: dict[str, Learned] = {}
        checks: list[tuple[str, Callable[[Any], bool]]] = []
        for node in nodes:
            if isinstance(node, Term):
                if node.call.func != "first_seen":
                    raise Problem(
                        node.call.loc.where(),
                        f"{node.call.func}(...) is a number: compare it (e.g. > 10)",
                    )
                name = self._term(node.call, ch, windows, learned)
                checks.append((name, bool))
            elif isinstance(node, Cmp) and isinstance(node.left, Call):
                call = node.left
                if call.func == "first_seen":
                    raise Problem(call.loc.where(), "first_seen(...) is a condition on its own")
                name = self._term(call, ch, windows, learned)
                checks.append((name, self._check(node)))
        window_ns = max((w.window_ns for w in windows.values()), default=0)
        state = Stateful(tuple(windows.items()), tuple(learned.items()), tuple(checks), learn_ns)
        return state, window_ns

    def _check(self, cmp: Cmp) -> Callable[[Any], bool]:
        if cmp.op not in ("=", "!=", "<", "<=", ">", ">=") or len(cmp.values) != 1:
            raise Problem(cmp.loc.where(), f"compare {cmp.left.canon()} with =, !=, <, <=, > or >=")
        c = self._const(cmp.values[0], FieldType.FLOAT)
        checks: dict[str, Callable[[Any], bool]] = {
            "=": lambda v: v == c,
            "!=": lambda v: v != c,
            "<": lambda v: v < c,
            "<=": lambda v: v <= c,
            ">": lambda v: v > c,
            ">=": lambda v: v >= c,
        }
        return checks[cmp.op]

    def _arity(self, call: Call, names: str) -> None:
        wanted = names.count(",") + 1 if names else 0
        if len(call.args) != wanted:
            raise Problem(call.loc.where(), f"usage: {call.func}({names})")

    def _arg_field(self, call: Call, i: int, ch: str, types: Iterable[FieldType]) -> Getter:
        arg = call.args[i]
        if not isinstance(arg, FieldRef):
            raise Problem(call.loc.where(), f"{call.func}(...): argument {i + 1} must be a field")
        f = self._field(arg)
        if f.type not in tuple(types):
            raise Problem(arg.loc.where(), f"{call.func}(...) does not take {f.name} ({f.type})")
        return f.getter(ch, self.lookups)

    def _arg_duration(self, call: Call, i: int) -> int:
        arg = call.args[i]
        try:
            if not isinstance(arg, Value):
                raise ValueError("expected a duration such as 60s, 5m or 1h")
            ns = parse_duration(arg.text)
        except ValueError as exc:
            raise Problem(call.args[i].loc.where(), str(exc)) from None
        if ns <= 0:
            raise Problem(arg.loc.where(), "a window must be longer than 0")
        return ns

    def _term(
        self, call: Call, ch: str, windows: dict[str, Window], learned: dict[str, Learned]
    ) -> str:
        """Register the detector behind a function call; its name is its canonical text."""
        name = call.canon()
        if name in windows or name in learned:
            return name
        func = call.func
        scalar = (FieldType.STR, FieldType.IP, FieldType.INT, FieldType.FLOAT, FieldType.BOOL)
        if func == "count":
            self._arity(call, "window")
            windows[name] = CountWindow(self._arg_duration(call, 0))
        elif func == "sum":
            self._arity(call, "field, window")
            get = self._arg_field(call, 0, ch, NUMERIC)
            windows[name] = SumWindow(self._arg_duration(call, 1), get)
        elif func == "distinct":
            self._arity(call, "field, window")
            get = self._arg_field(call, 0, ch, scalar)
            windows[name] = DistinctWindow(self._arg_duration(call, 1), get)
        elif func == "first_seen":
            self._arity(call, "field")
            learned[name] = FirstSeen(_from_event(self._arg_field(call, 0, ch, scalar)))
        elif func in ("baseline_ratio", "baseline_sigma"):
            self._arity(call, "field or count/sum/distinct")
            arg = call.args[0]
            kind = func.removeprefix("baseline_")
            if isinstance(arg, Call) and arg.func in WINDOW_FUNCS:
                inner_name = self._term(arg, ch, windows, learned)
                sample_ns = windows[inner_name].window_ns
                learned[name] = Baseline(_from_values(inner_name), kind, sample_ns)
            else:
                get = self._arg_field(call, 0, ch, NUMERIC)
                learned[name] = Baseline(_from_event(get), kind, 0)
        elif func == "baseline_shift":
            self._arity(call, "map field")
            learned[name] = ProfileShift(_from_event(self._arg_field(call, 0, ch, [FieldType.MAP])))
        else:
            raise Problem(
                call.loc.where(), f"unknown function {func!r} (known: {', '.join(FUNCS)})"
            )
        return name

    # -- keys, words, evidence ------------------------------------------------------------

    def _key(self, by: Iterable[FieldRef], ch: str) -> Callable[[Any], Key]:
        getters = tuple(self._field(ref).getter(ch, self.lookups) for ref in by)
        if len(getters) == 1:
            (one,) = getters
            return lambda e: (one(e),)
        return lambda e: tuple(g(e) for g in getters)

    def _render(
        self, output: Text, ch: str, terms: set[str]
    ) -> Callable[[Any, Mapping[str, Any]], str]:
        """`%file.path` and `%{distinct(net.dst_port, 60s)}` in the output; `%%` is '%'."""
        parts: list[str | Getter | tuple[str]] = []
        text = output.text
        pos = 0
        for m in _OUTPUT_FIELD.finditer(text):
            parts.append(text[pos : m.start()])
            pos = m.end()
            token = m.group(1)
            if token == "%":  # noqa: S105 (not a password: the %% escape)
                parts.append("%")
                continue
            inner_offset = m.start(1) + (1 if token.startswith("{") else 0)
            sub = Text(
                token.strip("{}"),
                output.file,
                [output.positions[min(inner_offset + i, len(output.positions) - 1)]
                 for i in range(len(token) + 1)] if output.positions else [],
            )  # fmt: skip
            operand = parse_operand(sub)
            if isinstance(operand, Call):
                if operand.canon() not in terms:
                    raise Problem(
                        operand.loc.where(), f"{operand.canon()} is not a term of this condition"
                    )
                parts.append((operand.canon(),))
                continue
            f = self._field(operand)
            if ch in f.sources:
                parts.append(f.getter(ch, self.lookups))
            else:
                parts.append("<NA>")
        parts.append(text[pos:])
        frozen = tuple(p for p in parts if p != "")

        def render(e: Any, values: Mapping[str, Any]) -> str:
            out = []
            for p in frozen:
                if isinstance(p, str):
                    out.append(p)
                elif isinstance(p, tuple):
                    out.append(_show(values.get(p[0])))
                else:
                    out.append(_show(p(e)))
            return "".join(out)

        return render

    def _evidence(self, names: list[str], ch: str) -> Callable[[Any], dict[str, Any]]:
        getters = tuple(
            (n, FIELDS[n].getter(ch, self.lookups)) for n in names if ch in FIELDS[n].sources
        )

        def evidence(e: Any) -> dict[str, Any]:
            out = {}
            for n, g in getters:
                try:
                    out[n] = g(e)
                except AttributeError:
                    out[n] = None
            return out

        return evidence


def _show(value: Any) -> str:
    if value is None:
        return "<NA>"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _from_event(get: Getter) -> Inner:
    return lambda e, _values: get(e)


def _from_values(name: str) -> Inner:
    return lambda _e, values: values[name]
