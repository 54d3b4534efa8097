"""Read rule files (YAML) into specs, merge them across files, compile them.

Falco's shape: a file is a list of items, each one of
    - required_engine_version: 1
    - list:  NAME   items: [...]
    - macro: NAME   condition: ...
    - rule:  NAME   condition, output, severity (or Falco's priority), desc, tags, enabled,
                    exceptions, and ours: by (key fields), learn, dedup
A later item may change an earlier one: `override: {condition: append, tags: replace}` (or
Falco's older `append: true`); an item with only `rule` and `enabled` switches a rule.

The loader works on yaml.compose nodes, so every error names file:line:col, and collects
all errors instead of stopping at the first.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml
import yaml.reader
from yaml.composer import ComposerError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from zonewatch.model import Severity
from zonewatch.rules.compiler import (
    CompiledRule,
    Compiler,
    ListSpec,
    MacroSpec,
    Problem,
    RuleSpec,
    parse_duration,
)
from zonewatch.rules.fields import FIELDS, Lookups
from zonewatch.rules.parser import (
    And,
    Cmp,
    FieldRef,
    Loc,
    Not,
    Or,
    Text,
    Value,
    parse_append,
    parse_condition,
)
from zonewatch.rules.parser import Node as Cond

T = TypeVar("T")
ENGINE_VERSION = (1, 0, 0)
FALCO_PRIORITIES = {
    "emergency": Severity.CRITICAL,
    "alert": Severity.CRITICAL,
    "critical": Severity.CRITICAL,
    "error": Severity.HIGH,
    "warning": Severity.MEDIUM,
    "notice": Severity.LOW,
    "informational": Severity.INFO,
    "debug": Severity.INFO,
}
RULE_KEYS = frozenset(
    {"rule", "desc", "condition", "output", "severity", "priority", "tags", "enabled",
     "exceptions", "by", "learn", "dedup", "append", "override"}
)  # fmt: skip
# what `override` may do to each key of a rule (Falco's table, plus ours)
RULE_OVERRIDES = {
    "condition": ("append", "replace"),
    "exceptions": ("append", "replace"),
    "tags": ("append", "replace"),
    **dict.fromkeys(
        ("output", "desc", "severity", "priority", "enabled", "by", "learn", "dedup"),
        ("replace",),
    ),
}
EXCEPTION_COMPS = frozenset(
    {"=", "!=", "<", "<=", ">", ">=", "in", "contains", "icontains", "startswith",
     "endswith", "glob", "cidr"}
)  # fmt: skip
DEFAULT_LEARN = "10m"
DEFAULT_DEDUP = "60s"
YAML_LEVELS = 32  # lists and mappings inside each other; a rules file needs about 7


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than YAML_LEVELS: its composer
    recurses once per level, and `[[[[...` a few hundred deep would end in RecursionError."""

    levels = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.levels >= YAML_LEVELS:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise ComposerError(None, None, f"nested deeper than {YAML_LEVELS} levels", mark)
        self.levels += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.levels -= 1


class Source:
    """One rules file's text, for turning YAML marks and offsets into file:line:col."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.line_starts = [0]
        for i, c in enumerate(text):
            if c == "\n":
                self.line_starts.append(i + 1)

    def pos(self, index: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.line_starts, index) - 1
        return line + 1, index - self.line_starts[line] + 1

    def where(self, node: Node) -> str:
        return f"{self.name}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"

    def scalar_text(self, node: Node) -> Text:
        """The scalar's value, each character mapped back to its place in the file (through
        quotes, block headers, indentation and line folding)."""
        value, src = str(node.value), self.text
        j, end = node.start_mark.index, node.end_mark.index
        style = getattr(node, "style", None)
        if style in ("'", '"'):
            j += 1
        elif style in ("|", ">"):
            newline = src.find("\n", j, end)
            j = end if newline < 0 else newline + 1
        positions: list[tuple[int, int]] = []
        for ch in value:
            if ch.isspace():
                positions.append(self.pos(min(j, end)))
                if j < end and src[j] == "\n" and ch == " ":
                    while j < end and src[j].isspace():  # a folded line break
                        j += 1
                elif j < end and src[j].isspace():
                    j += 1
            else:
                while j < end and src[j] != ch:  # indentation, escapes, quotes
                    j += 1
                positions.append(self.pos(min(j, end)))
                j += 1
        positions.append(self.pos(min(j, end)))
        return Text(value, self.name, positions)


@dataclass(slots=True)
class _Exception:
    name: str
    fields: list[FieldRef]
    comps: list[str]
    rows: list[list[list[Value]]]  # row -> per field -> its value(s)
    single: bool  # `fields: one.field` with `values: [a, b]` (Falco's short form)
    where: str


@dataclass(slots=True)
class _Draft:
    """A rule as read so far; later items may change it before it is compiled."""

    name: str
    where: str
    condition: Cond | None = None
    output: Text | None = None
    severity: Severity | None = None
    desc: str = ""
    tags: list[str] = field(default_factory=list)
    enabled: bool = True
    exceptions: dict[str, _Exception] = field(default_factory=dict)
    by: tuple[FieldRef, ...] = ()
    learn_ns: int = parse_duration(DEFAULT_LEARN)
    dedup_ns: int = parse_duration(DEFAULT_DEDUP)


@dataclass(slots=True)
class Loaded:
    files: list[str] = field(default_factory=list)
    lists: dict[str, ListSpec] = field(default_factory=dict)
    macros: dict[str, MacroSpec] = field(default_factory=dict)
    specs: list[RuleSpec] = field(default_factory=list)
    rules: list[CompiledRule] = field(default_factory=list)  # enabled, compiled
    problems: list[Problem] = field(default_factory=list)


def rule_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, and the *.yaml/*.yml directly inside directories named, in name order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml")))
        else:
            out.append(p)
    return out


class Loader:
    def __init__(self) -> None:
        self.lists: dict[str, ListSpec] = {}
        self.macros: dict[str, MacroSpec] = {}
        self.drafts: dict[str, _Draft] = {}
        self.problems: list[Problem] = []
        self.src = Source("", "")

    # -- small readers that know positions -------------------------------------------------

    def fail(self, node: Node, message: str) -> Problem:
        return Problem(self.src.where(node), message)

    def scalar(self, node: Node, what: str) -> str:
        if not isinstance(node, ScalarNode) or node.tag.endswith(":null"):
            raise self.fail(node, f"{what} must be a text value")
        return str(node.value)

    def boolean(self, node: Node, what: str) -> bool:
        if not isinstance(node, ScalarNode) or not node.tag.endswith(":bool"):
            raise self.fail(node, f"{what} must be true or false")
        return str(node.value).lower() in ("true", "yes", "on")

    def strings(self, node: Node, what: str) -> list[str]:
        if not isinstance(node, SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        return [self.scalar(item, f"each of {what}") for item in node.value]

    def duration(self, node: Node, what: str) -> int:
        try:
            return parse_duration(self.scalar(node, what))
        except ValueError as exc:
            raise self.fail(node, f"{what}: {exc}") from None

    def value(self, node: Node, what: str) -> Value:
        text = self.scalar(node, what)
        quoted = getattr(node, "style", None) in ("'", '"')
        return Value(text, quoted, Loc(self.src.scalar_text(node), 0))

    def field_ref(self, node: Node, what: str) -> FieldRef:
        name = self.scalar(node, what)
        if name not in FIELDS:
            raise self.fail(node, f"unknown field {name!r} (see `zonewatch rules fields`)")
        return FieldRef(name, Loc(self.src.scalar_text(node), 0))

    def condition(self, node: Node) -> Cond:
        self.scalar(node, "condition")
        return parse_condition(self.src.scalar_text(node))

    def mapping(self, node: MappingNode) -> dict[str, tuple[Node, Node]]:
        out: dict[str, tuple[Node, Node]] = {}
        for key, value in node.value:
            name = self.scalar(key, "a key")
            if name in out:
                raise self.fail(key, f"duplicate key {name!r}")
            out[name] = (key, value)
        return out

    # -- files and items --------------------------------------------------------------------

    def read_file(self, path: Path) -> None:
        name = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.problems.append(Problem(f"{name}:1:1", f"cannot read: {exc}"))
            return
        self.read_text(text, name)

    def read_text(self, text: str, name: str) -> None:
        self.src = Source(name, text)
        try:
            root = yaml.compose(text, Loader=BoundedLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else f"{name}:1:1"
            message = " ".join(str(exc.problem or exc).split())
            self.problems.append(Problem(where, f"invalid YAML: {message}"))
            return
        except yaml.reader.ReaderError as exc:  # a character YAML does not allow
            line, col = self.src.pos(exc.position)
            self.problems.append(Problem(f"{name}:{line}:{col}", f"invalid YAML: {exc.reason}"))
            return
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.problems.append(Problem(f"{name}:1:1", f"invalid YAML: {first}"))
            return
        if root is None:
            self.problems.append(Problem(f"{name}:1:1", "empty file (expected a list of items)"))
            return
        if not isinstance(root, SequenceNode):
            self.problems.append(self.fail(root, "a rules file is a list of items"))
            return
        versioned = False
        for item in root.value:
            try:
                if not isinstance(item, MappingNode):
                    raise self.fail(item, "each item is a mapping (list, macro, rule, ...)")
                keys = self.mapping(item)
                if "required_engine_version" in keys:
                    self.engine_version(keys)
                    versioned = True
                elif "list" in keys:
                    self.read_list(item, keys)
                elif "macro" in keys:
                    self.read_macro(item, keys)
                elif "rule" in keys:
                    self.read_rule(item, keys)
                else:
                    raise self.fail(
                        item, "unknown item (expected required_engine_version, list, macro, rule)"
                    )
            except Problem as problem:
                self.problems.append(problem)
        if not versioned:
            self.problems.append(
                Problem(f"{name}:1:1", "missing `- required_engine_version: N` item")
            )

    def only(self, keys: dict[str, tuple[Node, Node]], allowed: Iterable[str], kind: str) -> None:
        allowed = set(allowed)
        for name, (key, _) in keys.items():
            if name not in allowed:
                raise self.fail(
                    key, f"unknown key {name!r} in a {kind} ({', '.join(sorted(allowed))})"
                )

    def engine_version(self, keys: dict[str, tuple[Node, Node]]) -> None:
        self.only(keys, ["required_engine_version"], "version item")
        node = keys["required_engine_version"][1]
        text = self.scalar(node, "required_engine_version")
        try:
            wanted = tuple(int(x) for x in text.split("."))
        except ValueError:
            raise self.fail(node, f"required_engine_version: not a version: {text!r}") from None
        wanted = (*wanted, 0, 0, 0)[:3]
        if wanted > ENGINE_VERSION:
            ours = ".".join(map(str, ENGINE_VERSION))
            raise self.fail(node, f"these rules need engine {text}; this engine is {ours}")

    def overrides(
        self, keys: dict[str, tuple[Node, Node]], allowed: dict[str, tuple[str, ...]]
    ) -> dict[str, str] | None:
        """`override: {key: append|replace}` or Falco's `append: true`; None: a definition."""
        if "override" in keys and "append" in keys:
            raise self.fail(keys["append"][0], "use either override or append, not both")
        if "append" in keys:
            if not self.boolean(keys["append"][1], "append"):
                return None
            return {k: "append" for k, modes in allowed.items() if "append" in modes}
        if "override" not in keys:
            return None
        node = keys["override"][1]
        if not isinstance(node, MappingNode):
            raise self.fail(node, "override maps keys to append or replace")
        out: dict[str, str] = {}
        for name, (key, value) in self.mapping(node).items():
            mode = self.scalar(value, f"override of {name}")
            if name not in allowed:
                raise self.fail(key, f"cannot override {name!r} ({', '.join(sorted(allowed))})")
            if mode not in allowed[name]:
                raise self.fail(value, f"{name} can be overridden by: {'|'.join(allowed[name])}")
            if name not in keys:
                raise self.fail(key, f"override of {name!r} without a new {name}")
            out[name] = mode
        return out

    def read_list(self, item: MappingNode, keys: dict[str, tuple[Node, Node]]) -> None:
        self.only(keys, ["list", "items", "append", "override"], "list")
        name = self.scalar(keys["list"][1], "list name")
        if "items" not in keys:
            raise self.fail(item, f"list {name!r} has no items")
        node = keys["items"][1]
        if not isinstance(node, SequenceNode):
            raise self.fail(node, "items must be a list")
        items = [self.value(i, "a list item") for i in node.value]
        mode = self.overrides(keys, {"items": ("append", "replace")})
        if mode is None:
            self.check_new(name, self.lists, item, "list")
            self.lists[name] = ListSpec(name, items, self.src.where(item))
            return
        old = self.existing(name, self.lists, item, "list")
        old.items = old.items + items if mode.get("items") == "append" else items

    def read_macro(self, item: MappingNode, keys: dict[str, tuple[Node, Node]]) -> None:
        self.only(keys, ["macro", "condition", "append", "override"], "macro")
        name = self.scalar(keys["macro"][1], "macro name")
        if "condition" not in keys:
            raise self.fail(item, f"macro {name!r} has no condition")
        mode = self.overrides(keys, {"condition": ("append", "replace")})
        node = keys["condition"][1]
        if mode is None:
            self.check_new(name, self.macros, item, "macro")
            self.macros[name] = MacroSpec(name, self.condition(node), self.src.where(item))
            return
        old = self.existing(name, self.macros, item, "macro")
        if mode.get("condition") == "append":
            self.scalar(node, "condition")
            old.node = parse_append(self.src.scalar_text(node), old.node)
        else:
            old.node = self.condition(node)

    def check_new(self, name: str, table: Mapping[str, object], item: Node, kind: str) -> None:
        if name in table:
            first = table[name]
            raise self.fail(
                item,
                f"{kind} {name!r} is already defined at {getattr(first, 'where', '?')} "
                "(use override: to change it)",
            )

    def existing(self, name: str, table: Mapping[str, T], item: Node, kind: str) -> T:
        if name not in table:
            raise self.fail(item, f"no {kind} {name!r} to override (define it first)")
        return table[name]

    def read_rule(self, item: MappingNode, keys: dict[str, tuple[Node, Node]]) -> None:
        self.only(keys, RULE_KEYS, "rule")
        name = self.scalar(keys["rule"][1], "rule name")
        mode = self.overrides(keys, RULE_OVERRIDES)
        if mode is None and set(keys) == {"rule", "enabled"} and name in self.drafts:
            mode = {"enabled": "replace"}  # Falco: `- rule: X` + `enabled: false` switches X
        if mode is None:
            self.check_new(name, self.drafts, item, "rule")
            draft = _Draft(name, self.src.where(item))
            for key in ("condition", "output"):
                if key not in keys:
                    raise self.fail(item, f"rule {name!r} has no {key}")
            if "severity" not in keys and "priority" not in keys:
                raise self.fail(item, f"rule {name!r} has no severity")
            self.apply(draft, keys, dict.fromkeys(keys, "replace"))
            self.drafts[name] = draft
            return
        draft = self.existing(name, self.drafts, item, "rule")
        self.apply(draft, keys, mode)

    def apply(self, d: _Draft, keys: dict[str, tuple[Node, Node]], mode: dict[str, str]) -> None:
        for name, (_key, node) in keys.items():
            how = mode.get(name)
            if how is None:
                continue
            if name == "condition":
                if how == "append" and d.condition is not None:
                    self.scalar(node, "condition")
                    d.condition = parse_append(self.src.scalar_text(node), d.condition)
                else:
                    d.condition = self.condition(node)
            elif name == "output":
                self.scalar(node, "output")
                d.output = self.src.scalar_text(node)
            elif name in ("severity", "priority"):
                d.severity = self.severity(node, name)
            elif name == "desc":
                d.desc = self.scalar(node, "desc")
            elif name == "tags":
                tags = self.strings(node, "tags")
                d.tags = d.tags + tags if how == "append" else tags
            elif name == "enabled":
                d.enabled = self.boolean(node, "enabled")
            elif name == "by":
                if not isinstance(node, SequenceNode) or not node.value:
                    raise self.fail(node, "by must be a non-empty list of fields")
                d.by = tuple(self.field_ref(f, "a by field") for f in node.value)
            elif name == "learn":
                d.learn_ns = self.duration(node, "learn")
            elif name == "dedup":
                d.dedup_ns = self.duration(node, "dedup")
            elif name == "exceptions":
                self.exceptions(d, node, how)

    def severity(self, node: Node, key: str) -> Severity:
        text = self.scalar(node, key).lower()
        if key == "priority" and text in FALCO_PRIORITIES:
            return FALCO_PRIORITIES[text]
        try:
            return Severity.parse(text)
        except ValueError as exc:
            raise self.fail(node, str(exc)) from None

    def exceptions(self, d: _Draft, node: Node, how: str) -> None:
        if not isinstance(node, SequenceNode):
            raise self.fail(node, "exceptions must be a list")
        if how == "replace":
            d.exceptions = {}
        for item in node.value:
            if not isinstance(item, MappingNode):
                raise self.fail(item, "each exception is a mapping (name, fields, comps, values)")
            keys = self.mapping(item)
            self.only(keys, ["name", "fields", "comps", "values"], "exception")
            if "name" not in keys:
                raise self.fail(item, "an exception needs a name")
            name = self.scalar(keys["name"][1], "exception name")
            old = d.exceptions.get(name)
            if old is None:
                if "fields" not in keys:
                    raise self.fail(item, f"exception {name!r} needs fields")
                old = d.exceptions[name] = self.exception_head(name, item, keys)
            elif "fields" in keys or "comps" in keys:
                raise self.fail(item, f"exception {name!r} exists: append only values to it")
            if "values" in keys:
                old.rows.extend(self.exception_rows(old, keys["values"][1]))

    def exception_head(
        self, name: str, item: Node, keys: dict[str, tuple[Node, Node]]
    ) -> _Exception:
        fnode = keys["fields"][1]
        single = isinstance(fnode, ScalarNode)
        fields = [self.field_ref(fnode, "fields")] if single else None
        if fields is None:
            if not isinstance(fnode, SequenceNode) or not fnode.value:
                raise self.fail(fnode, "fields must be a field or a non-empty list of fields")
            fields = [self.field_ref(f, "a field") for f in fnode.value]
        comps = ["in" if single else "="] * len(fields)
        if "comps" in keys:
            cnode = keys["comps"][1]
            comps = [self.scalar(cnode, "comps")] if single else self.strings(cnode, "comps")
            if len(comps) != len(fields):
                raise self.fail(cnode, f"{len(fields)} field(s) but {len(comps)} comp(s)")
            for comp in comps:
                if comp not in EXCEPTION_COMPS:
                    raise self.fail(cnode, f"unknown comparison {comp!r}")
        return _Exception(name, fields, comps, [], single, self.src.where(item))

    def exception_rows(self, exc: _Exception, node: Node) -> list[list[list[Value]]]:
        if not isinstance(node, SequenceNode):
            raise self.fail(node, "values must be a list")
        if exc.single:  # `values: [a, b]`: one row whose one field takes every value
            return [[[self.value(v, "an exception value") for v in node.value]]]
        rows = []
        for row in node.value:
            if not isinstance(row, SequenceNode) or len(row.value) != len(exc.fields):
                raise self.fail(row, f"each row of values has {len(exc.fields)} item(s)")
            cells = []
            for cell in row.value:
                if isinstance(cell, SequenceNode):
                    cells.append([self.value(v, "an exception value") for v in cell.value])
                else:
                    cells.append([self.value(cell, "an exception value")])
            rows.append(cells)
        return rows

    # -- after every file -------------------------------------------------------------------

    def finish(self) -> list[RuleSpec]:
        specs: list[RuleSpec] = []
        for d in self.drafts.values():
            assert d.condition is not None
            assert d.output is not None
            assert d.severity is not None
            condition = d.condition
            rows: list[Cond] = []
            for exc in d.exceptions.values():
                for row in exc.rows:
                    terms: list[Cond] = []
                    for ref, comp, values in zip(exc.fields, exc.comps, row, strict=True):
                        as_list = len(values) > 1 or comp == "in"
                        loc = values[0].loc if values else ref.loc
                        terms.append(Cmp(ref, comp, tuple(values), as_list, loc))
                    rows.append(terms[0] if len(terms) == 1 else And(tuple(terms)))
            if rows:
                condition = And((condition, Not(rows[0] if len(rows) == 1 else Or(tuple(rows)))))
            specs.append(
                RuleSpec(
                    name=d.name,
                    where=d.where,
                    condition=condition,
                    output=d.output,
                    severity=d.severity,
                    tags=tuple(d.tags),
                    desc=d.desc,
                    enabled=d.enabled,
                    by=d.by,
                    learn_ns=d.learn_ns,
                    dedup_ns=d.dedup_ns,
                )
            )
        return specs


def load(paths: Sequence[str | Path], lookups: Lookups | None = None) -> Loaded:
    """Read, merge and compile; every problem is collected in `problems`, none raised."""
    loader = Loader()
    files = rule_files(paths)
    for path in files:
        loader.read_file(path)
    out = Loaded(files=[str(f) for f in files], lists=loader.lists, macros=loader.macros)
    out.problems.extend(loader.problems)
    out.specs = loader.finish()
    compiler = Compiler(loader.lists, loader.macros, lookups or Lookups())
    for lst in loader.lists.values():
        try:
            compiler.check_list(lst)
        except Problem as problem:
            out.problems.append(problem)
    for macro in loader.macros.values():
        try:
            compiler.check_macro(macro)
        except Problem as problem:
            out.problems.append(problem)
    for spec in out.specs:
        try:
            rule = compiler.compile_rule(spec)
        except Problem as problem:
            out.problems.append(problem)
            continue
        if spec.enabled:
            out.rules.append(rule)
    out.problems.sort(key=_problem_order)
    return out


def _problem_order(p: Problem) -> tuple[str, int, int]:
    file, _, rest = p.where.rpartition(":")
    file, _, line = file.rpartition(":")
    try:
        return file, int(line), int(rest)
    except ValueError:
        return p.where, 0, 0
