"""The condition language: a lexer and a recursive-descent parser producing a small AST.

Falco's syntax, read as Falco users expect:
    op in (open, create) and file.path startswith /etc and not proc.comm in (shells)
plus windowed and learned terms, which may only appear as top-level `and` terms:
    count(60s) > 100                      distinct(net.dst_port, 60s) > 50
    sum(net.bytes, 60s) > 1e9             first_seen(net.dns_qname)
    baseline_ratio(kvm.exits_per_s) > 10  baseline_sigma(sum(net.bytes, 60s)) > 6
    baseline_shift(kvm.exits_by_reason) > 0.5

Every node keeps its offset in the text, and the text knows where it sits in its YAML
file, so an error deep inside a macro still points at file:line:col.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

MAX_DEPTH = 64  # nesting; deeper input is an error, never a RecursionError
CODE_DEPTH = "parse.depth"

CMP_OPS = frozenset({"=", "!=", "<", "<=", ">", ">="})
WORD_OPS = frozenset(
    {"in", "contains", "icontains", "startswith", "endswith", "glob", "cidr", "exists"}
)
LIST_OPS = frozenset({"in", "contains", "icontains", "startswith", "endswith", "glob", "cidr"})
KEYWORDS = frozenset({"and", "or", "not"})
_STOP = set(" \t\r\n(),=<>\"'")


class Text:
    """A piece of rule text and where each of its characters is in its file."""

    __slots__ = ("file", "positions", "text")

    def __init__(self, text: str, file: str, positions: Sequence[tuple[int, int]]) -> None:
        self.text = text
        self.file = file
        self.positions = positions  # 1-based (line, col) per character

    @classmethod
    def at(cls, text: str, file: str, line: int, col: int) -> Text:
        """Text that sits on one line from (line, col): tests and the command line."""
        return cls(text, file, [(line, col + i) for i in range(len(text) + 1)])

    def where(self, offset: int) -> str:
        if not self.positions:
            return f"{self.file}:1:1"
        line, col = self.positions[max(0, min(offset, len(self.positions) - 1))]
        return f"{self.file}:{line}:{col}"


class SyntaxProblem(Exception):
    """A rules problem at file:line:col. A `code` (budget.terms, ...) names the kind of
    refusal for scripts; it leads the message in brackets."""

    def __init__(self, where: str, message: str, code: str = "") -> None:
        self.where = where
        self.code = code
        self.detail = message  # without the code
        self.message = f"[{code}] {message}" if code else message
        super().__init__(f"{where}: {self.message}")


@dataclass(slots=True, frozen=True)
class Loc:
    src: Text
    offset: int

    def where(self) -> str:
        return self.src.where(self.offset)


# -- AST ---------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Value:
    text: str
    quoted: bool
    loc: Loc


@dataclass(slots=True, frozen=True)
class FieldRef:
    name: str
    loc: Loc

    def canon(self) -> str:
        return self.name


@dataclass(slots=True, frozen=True)
class Call:
    func: str
    args: tuple[FieldRef | Call | Value, ...]
    loc: Loc

    def canon(self) -> str:
        inner = ", ".join(a.text if isinstance(a, Value) else a.canon() for a in self.args)
        return f"{self.func}({inner})"


Operand = FieldRef | Call


@dataclass(slots=True, frozen=True)
class Cmp:
    left: Operand
    op: str
    values: tuple[Value, ...]
    is_list: bool  # written as a parenthesised list (or a list name)
    loc: Loc


@dataclass(slots=True, frozen=True)
class Term:
    """A boolean function used on its own: first_seen(net.dns_qname)."""

    call: Call


@dataclass(slots=True, frozen=True)
class MacroRef:
    name: str
    loc: Loc


@dataclass(slots=True, frozen=True)
class Const:
    value: bool


@dataclass(slots=True, frozen=True)
class Not:
    item: Node


@dataclass(slots=True, frozen=True)
class And:
    items: tuple[Node, ...]


@dataclass(slots=True, frozen=True)
class Or:
    items: tuple[Node, ...]


Node = Cmp | Term | MacroRef | Const | Not | And | Or


# -- lexer -------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Token:
    kind: str  # "(" ")" "," "op" "word" "str" "end"
    text: str
    offset: int


def tokenize(src: Text) -> list[Token]:
    text, n = src.text, len(src.text)
    tokens: list[Token] = []
    i = 0
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c in "(),":
            tokens.append(Token(c, c, i))
            i += 1
        elif c in "=<>!":
            two = text[i : i + 2]
            if two in ("==", "!=", "<=", ">="):
                tokens.append(Token("op", "=" if two == "==" else two, i))
                i += 2
            elif c == "!":
                raise SyntaxProblem(src.where(i), "'!' must be followed by '=' (use 'not')")
            else:
                tokens.append(Token("op", c, i))
                i += 1
        elif c in "\"'":
            j, out = i + 1, []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                out.append(text[j])
                j += 1
            if j >= n:
                raise SyntaxProblem(src.where(i), "unterminated string")
            tokens.append(Token("str", "".join(out), i))
            i = j + 1
        else:
            j = i
            while j < n and text[j] not in _STOP:
                j += 1
            tokens.append(Token("word", text[i:j], i))
            i = j
    tokens.append(Token("end", "", n))
    return tokens


# -- parser ------------------------------------------------------------------------------


class Parser:
    def __init__(self, src: Text) -> None:
        self.src = src
        self.tokens = tokenize(src)
        self.i = 0
        self.depth = 0

    # helpers
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def peek(self, ahead: int = 1) -> Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def next(self) -> Token:
        tok = self.tokens[self.i]
        self.i = min(self.i + 1, len(self.tokens) - 1)
        return tok

    def loc(self, tok: Token) -> Loc:
        return Loc(self.src, tok.offset)

    def fail(self, tok: Token, message: str) -> SyntaxProblem:
        return SyntaxProblem(self.src.where(tok.offset), message)

    def describe(self, tok: Token) -> str:
        return "end of condition" if tok.kind == "end" else repr(tok.text)

    def expect(self, kind: str) -> Token:
        if self.tok.kind != kind:
            raise self.fail(self.tok, f"expected '{kind}', found {self.describe(self.tok)}")
        return self.next()

    def is_word(self, *words: str) -> bool:
        return self.tok.kind == "word" and self.tok.text in words

    # grammar
    def condition(self) -> Node:
        if self.tok.kind == "end":
            raise self.fail(self.tok, "empty condition")
        node = self.or_expr()
        if self.tok.kind != "end":
            raise self.fail(self.tok, f"unexpected {self.describe(self.tok)}")
        return node

    def or_expr(self) -> Node:
        items = [self.and_expr()]
        while self.is_word("or"):
            self.next()
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def and_expr(self) -> Node:
        items = [self.not_expr()]
        while self.is_word("and"):
            self.next()
            items.append(self.not_expr())
        return items[0] if len(items) == 1 else And(tuple(items))

    def not_expr(self) -> Node:
        if self.is_word("not"):
            self.next()
            return Not(self.nested(self.not_expr))
        return self.primary()

    def nested(self, rule: Callable[[], T]) -> T:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            where = self.src.where(self.tok.offset)
            raise SyntaxProblem(where, f"nested deeper than {MAX_DEPTH} levels", CODE_DEPTH)
        try:
            return rule()
        finally:
            self.depth -= 1

    def primary(self) -> Node:
        tok = self.tok
        if tok.kind == "(":
            self.next()
            node = self.nested(self.or_expr)
            self.expect(")")
            return node
        if tok.kind != "word" or tok.text in KEYWORDS:
            raise self.fail(tok, f"expected a field, macro or '(', found {self.describe(tok)}")
        if self.peek().kind == "(":
            call = self.call()
            if self.at_operator():
                return self.comparison(call)
            return Term(call)
        if self.at_operator(1):
            self.next()
            return self.comparison(FieldRef(tok.text, self.loc(tok)))
        self.next()
        if tok.text in ("true", "false"):
            return Const(tok.text == "true")
        return MacroRef(tok.text, self.loc(tok))

    def at_operator(self, ahead: int = 0) -> bool:
        tok = self.peek(ahead)
        return tok.kind == "op" or (tok.kind == "word" and tok.text in WORD_OPS)

    def call(self) -> Call:
        name = self.next()
        self.expect("(")
        args: list[FieldRef | Call | Value] = []
        while self.tok.kind != ")":
            tok = self.tok
            if tok.kind == "word" and self.peek().kind == "(":
                args.append(self.nested(self.call))
            elif tok.kind == "word" and "." in tok.text:
                self.next()
                args.append(FieldRef(tok.text, self.loc(tok)))
            elif tok.kind in ("word", "str"):
                self.next()
                args.append(Value(tok.text, tok.kind == "str", self.loc(tok)))
            else:
                raise self.fail(tok, f"expected an argument, found {self.describe(tok)}")
            if self.tok.kind == ",":
                self.next()
            elif self.tok.kind != ")":
                raise self.fail(self.tok, f"expected ',' or ')', found {self.describe(self.tok)}")
        self.next()
        return Call(name.text, tuple(args), self.loc(name))

    def comparison(self, left: Operand) -> Node:
        op_tok = self.next()
        op = op_tok.text
        loc = self.loc(op_tok)
        if op == "exists":
            return Cmp(left, op, (), False, loc)
        if self.tok.kind == "(":
            if op not in LIST_OPS:
                raise self.fail(self.tok, f"'{op}' takes one value, not a list")
            self.next()
            values = []
            while True:
                values.append(self.value())
                if self.tok.kind == ",":
                    self.next()
                    continue
                self.expect(")")
                break
            return Cmp(left, op, tuple(values), True, loc)
        value = self.value()
        # `x in shell_binaries`: a bare list name is a list (Falco wants parentheses)
        return Cmp(left, op, (value,), op == "in" and not value.quoted, loc)

    def value(self) -> Value:
        tok = self.tok
        if tok.kind == "str" or (tok.kind == "word" and tok.text not in KEYWORDS):
            self.next()
            return Value(tok.text, tok.kind == "str", self.loc(tok))
        raise self.fail(tok, f"expected a value, found {self.describe(tok)}")


def parse_condition(src: Text) -> Node:
    return Parser(src).condition()


def parse_append(src: Text, previous: Node) -> Node:
    """An appended condition (`override: {condition: append}`): `and ...` or `or ...`."""
    parser = Parser(src)
    tok = parser.tok
    if not parser.is_word("and", "or"):
        raise parser.fail(tok, "an appended condition starts with 'and' or 'or'")
    parser.next()
    rest = parser.condition()
    return And((previous, rest)) if tok.text == "and" else Or((previous, rest))


def parse_operand(src: Text) -> Operand:
    """A field or function as named in an output template's %{...}."""
    parser = Parser(src)
    tok = parser.tok
    if tok.kind == "word" and parser.peek().kind == "(":
        operand: Operand = parser.call()
    elif tok.kind == "word":
        parser.next()
        operand = FieldRef(tok.text, parser.loc(tok))
    else:
        raise parser.fail(tok, "expected a field name")
    if parser.tok.kind != "end":
        raise parser.fail(parser.tok, f"unexpected {parser.describe(parser.tok)}")
    return operand
