"""The complexity budget of rules: how many values a rule compares and how deeply it nests
once every macro and list is written out in place.

Measured from the definitions, each macro and list once (memoised, in dependency order),
so a rule that would expand to millions of terms (macros that double: `m2: (m1 or m1)`)
is refused in microseconds, before anything is expanded. Every walk here is iterative:
no input, however deep, reaches Python's recursion limit. The compiler's own walks
recurse once per level, which the depth budget keeps far from that limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from zonewatch.rules.parser import (
    And,
    Cmp,
    Loc,
    MacroRef,
    Node,
    Not,
    Or,
    SyntaxProblem,
    Term,
    Value,
)

TERMS_PER_RULE = 50_000  # values one rule compares, lists and macros spliced in
TERMS_PER_LOAD = 250_000  # the same summed over every rule of a load (compile time)
LEVELS = 200  # and/or/not levels plus macro references, counted before flattening
LIST_LEVELS = 64  # lists naming lists naming lists...

CODE_TERMS = "budget.terms"
CODE_LOAD = "budget.load"
CODE_LEVELS = "budget.depth"


class _ListDef(Protocol):
    where: str
    items: list[Value]


class _MacroDef(Protocol):
    where: str
    node: Node


class _Refused(SyntaxProblem):
    """A reference to a list or macro that can't be expanded; `root` says why."""

    def __init__(self, where: str, message: str, root: SyntaxProblem) -> None:
        super().__init__(where, message, root.code)
        self.root = root


@dataclass(slots=True, frozen=True)
class Measure:
    terms: int  # values compared (a list counts its items), at least 1 per term
    levels: int  # the tree's height once expanded, each macro reference a level


def children(node: Node) -> Sequence[Node]:
    if isinstance(node, And | Or):
        return node.items
    if isinstance(node, Not):
        return (node.item,)
    return ()


def walk(node: Node) -> Iterator[Node]:
    """Every node of a condition as written (macros not followed), without recursion."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(children(n)))


def first_loc(node: Node) -> Loc | None:
    for n in walk(node):
        if isinstance(n, Cmp | MacroRef):
            return n.loc
        if isinstance(n, Term):
            return n.call.loc
    return None


def _chain(names: Sequence[str], limit: int = 6) -> str:
    if len(names) <= limit:
        return " -> ".join(names)
    return " -> ".join([*names[: limit // 2], "...", *names[-(limit // 2) :]])


def _order(
    names: Sequence[str], deps: Callable[[str], Sequence[tuple[str, str]]]
) -> tuple[list[str], dict[str, tuple[str, list[str]]]]:
    """Names in dependency order (each after what it names) and, for each cycle found, its
    first member -> (where the closing reference is, the cycle's names)."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    order: list[str] = []
    cycles: dict[str, tuple[str, list[str]]] = {}
    for root in names:
        if root in state:
            continue
        path: list[str] = [root]
        todo: list[Iterator[tuple[str, str]]] = [iter(deps(root))]
        state[root] = 1
        while todo:
            step = next(todo[-1], None)
            if step is None:
                todo.pop()
                done = path.pop()
                state[done] = 2
                order.append(done)
                continue
            name, where = step
            seen = state.get(name)
            if seen == 1:
                loop = [*path[path.index(name) :], name]
                cycles.setdefault(loop[0], (where, loop))
            elif seen is None:
                state[name] = 1
                path.append(name)
                todo.append(iter(deps(name)))
    return order, cycles


class Budget:
    """Measures every list and macro of a load once; then each rule against the budget."""

    def __init__(self, lists: Mapping[str, _ListDef], macros: Mapping[str, _MacroDef]) -> None:
        self.lists = lists
        self.macros = macros
        self.list_sizes: dict[str, int] = {}
        self.macro_sizes: dict[str, Measure] = {}
        # A list or macro that can't be expanded -> the problem at its root (a cycle, over
        # the budget: reported once, where it is); whatever names it is refused too.
        self.bad_lists: dict[str, SyntaxProblem] = {}
        self.bad_macros: dict[str, SyntaxProblem] = {}
        self.own_lists: set[str] = set()  # bad on their own, not through another
        self.own_macros: set[str] = set()
        self.total = 0
        self._measure_lists()
        self._measure_macros()

    # -- lists ----------------------------------------------------------------------------

    def _list_deps(self, name: str) -> list[tuple[str, str]]:
        spec = self.lists[name]
        return [(v.text, spec.where) for v in spec.items if not v.quoted and v.text in self.lists]

    def _measure_lists(self) -> None:
        order, cycles = _order(list(self.lists), self._list_deps)
        for first, (where, loop) in cycles.items():
            self.bad_lists[first] = SyntaxProblem(where, f"list cycle: {_chain(loop)}")
            self.own_lists.add(first)
        depth: dict[str, int] = {}
        for name in order:
            if name in self.bad_lists:
                continue
            spec = self.lists[name]
            deps = [d for d, _ in self._list_deps(name)]
            bad = next((d for d in deps if d in self.bad_lists), None)
            if bad is not None:
                self.bad_lists[name] = self.bad_lists[bad]
                continue
            depth[name] = 1 + max((depth[d] for d in deps), default=0)
            size = sum(
                self.list_sizes[v.text] if not v.quoted and v.text in self.lists else 1
                for v in spec.items
            )
            if depth[name] > LIST_LEVELS:
                self.bad_lists[name] = SyntaxProblem(spec.where, f"list {name!r} names lists "
                    f"{depth[name]} deep; the budget is {LIST_LEVELS}", CODE_LEVELS)  # fmt: skip
            elif size > TERMS_PER_RULE:
                self.bad_lists[name] = SyntaxProblem(spec.where, f"list {name!r} holds {size} "
                    f"items once the lists it names are spliced in; the budget is "
                    f"{TERMS_PER_RULE}", CODE_TERMS)  # fmt: skip
            else:
                self.list_sizes[name] = size
                continue
            self.own_lists.add(name)

    # -- macros ---------------------------------------------------------------------------

    def _macro_deps(self, name: str) -> list[tuple[str, str]]:
        return [
            (n.name, n.loc.where())
            for n in walk(self.macros[name].node)
            if isinstance(n, MacroRef) and n.name in self.macros
        ]

    def _measure_macros(self) -> None:
        order, cycles = _order(list(self.macros), self._macro_deps)
        for first, (where, loop) in cycles.items():
            self.bad_macros[first] = SyntaxProblem(where, f"macro cycle: {_chain(loop)}")
            self.own_macros.add(first)
        for name in order:
            if name in self.bad_macros:
                continue
            spec = self.macros[name]
            try:
                size = self.measure(spec.node)
            except _Refused as refused:  # it names a bad list or macro
                self.bad_macros[name] = refused.root
                continue
            if size.levels > LEVELS or size.terms > TERMS_PER_RULE:
                self.bad_macros[name] = self._over("macro", name, size, spec.where)
                self.own_macros.add(name)
            else:
                self.macro_sizes[name] = size

    @staticmethod
    def _through(kind: str, name: str, root: SyntaxProblem, where: str) -> _Refused:
        """A reference to a bad list or macro: refused where it is, saying why."""
        why = root.detail if root.detail.startswith(f"{kind} {name!r}") else (
            f"{kind} {name!r} can't be expanded: {root.detail}")  # fmt: skip
        return _Refused(where, f"{why} (at {root.where})", root)

    # -- measuring ------------------------------------------------------------------------

    def measure(self, node: Node) -> Measure:
        """A condition's size once expanded (its lists and macros are measured already);
        raises, where it names one, the problem of a bad list or macro."""
        done: dict[int, Measure] = {}
        stack: list[tuple[Node, bool]] = [(node, False)]
        while stack:
            n, expanded = stack.pop()
            kids = children(n)
            if kids and not expanded:
                stack.append((n, True))
                stack.extend((k, False) for k in kids)
                continue
            if kids:
                parts = [done.pop(id(k)) for k in kids]
                terms = sum(p.terms for p in parts)
                done[id(n)] = Measure(terms, 1 + max(p.levels for p in parts))
            else:
                done[id(n)] = self._leaf(n)
        return done[id(node)]

    def _leaf(self, node: Node) -> Measure:
        if isinstance(node, MacroRef):
            cause = self.bad_macros.get(node.name)
            if cause is not None:
                raise self._through("macro", node.name, cause, node.loc.where())
            inner = self.macro_sizes.get(node.name)  # unknown: the compiler says so
            return Measure(inner.terms, inner.levels + 1) if inner else Measure(0, 1)
        if isinstance(node, Cmp) and node.is_list:
            terms = 0
            for v in node.values:
                cause = None if v.quoted else self.bad_lists.get(v.text)
                if cause is not None:
                    raise self._through("list", v.text, cause, v.loc.where())
                terms += 1 if v.quoted else self.list_sizes.get(v.text, 1)
            return Measure(max(terms, 1), 1)
        if isinstance(node, Cmp):
            return Measure(max(len(node.values), 1), 1)
        return Measure(1, 1)  # a constant too: expansion visits it (`m1: (m0 or m0)`, m0 true)

    @staticmethod
    def _over(kind: str, name: str, size: Measure, where: str) -> SyntaxProblem:
        if size.levels > LEVELS:
            return SyntaxProblem(where, f"{kind} {name!r} nests {size.levels} levels deep "
                                 f"(and, or, not, macros) once expanded; the budget is {LEVELS}",
                                 CODE_LEVELS)  # fmt: skip
        return SyntaxProblem(where, f"{kind} {name!r} compares {size.terms} values once its "
                             f"macros and lists are expanded; the budget is {TERMS_PER_RULE} "
                             "per rule", CODE_TERMS)  # fmt: skip

    # -- what the compiler asks -----------------------------------------------------------

    def check_list(self, name: str) -> None:
        """Raise the list's own problem (a cycle, over the budget), where it is."""
        if name in self.own_lists:
            raise self.bad_lists[name]

    def check_macro(self, name: str) -> None:
        """Raise the macro's own problem (a cycle, over the budget), where it is."""
        if name in self.own_macros:
            raise self.bad_macros[name]

    def check_rule(self, name: str, condition: Node, where: str) -> None:
        """Raise when the rule, expanded, would be over a budget; else count its terms."""
        size = self.measure(condition)
        at = first_loc(condition)
        place = at.where() if at is not None else where
        if size.levels > LEVELS or size.terms > TERMS_PER_RULE:
            raise self._over("rule", name, size, place)
        if self.total + size.terms > TERMS_PER_LOAD:
            raise SyntaxProblem(
                place,
                f"rule {name!r} takes the rules past {TERMS_PER_LOAD} values compared in all "
                f"(the budget per load): {self.total} before it, {size.terms} in it",
                CODE_LOAD,
            )
        self.total += size.terms
